"""The DVC pipeline as a Prefect flow: one task per `dvc.yaml` stage, in the order DVC's own graph gives.

DVC stays the single source of truth for the stages, their inputs and their cache: a stage that `dvc status`
finds up to date ends as a `Cached` task without running, and one that is not runs `dvc repro --single-item`.
`python -m flows.pipeline` runs it once; flows/schedule.py serves it on a schedule.
"""
import dataclasses
import json
import subprocess
import sys
import urllib.request

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.states import Completed, Failed

from stages.config import load_section, stage_device


@dataclasses.dataclass(frozen=True)
class Params:
    name: str = "transfer-pipeline"
    cron: str = "0 3 * * *"            # the scheduled deployment's cron (flows/schedule.py)
    retries: int = 2                    # per stage, for transient failures only
    retry_delay_seconds: int = 10
    webhook: str = ""                   # POSTed a JSON message when a run fails; logged when empty


class StageFailed(Exception):
    def __init__(self, stage, output):
        self.stage, self.output = stage, output
        # a stage's own one-line `error: ...` is bad input or broken data: retrying cannot help
        self.user_error = any(line.startswith("error: ") for line in output.splitlines())
        last = [line for line in output.splitlines() if line.strip()][-3:]
        super().__init__(f"stage '{stage}' failed: " + " | ".join(last))


def stage_order(repo="."):
    """Stage names from DVC's graph, dependencies first (no second copy of the DAG in Python)."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        return [s.name for s in reversed(list(nx.topological_sort(r.index.graph)))]


def dvc(*args, cwd="."):
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)


def transient(task, task_run, state):
    """Retry a stage unless it failed on bad input (its one-line `error:`), which would fail again."""
    try:
        state.result()
    except StageFailed as e:
        return not e.user_error
    except Exception:
        return True
    return False


@task(task_run_name="{stage}", retry_condition_fn=transient)
def run_stage(stage, repo="."):
    log = get_run_logger()
    status = dvc("status", "--json", stage, cwd=repo)
    if status.returncode == 0 and json.loads(status.stdout or "{}") == {}:
        log.info(f"{stage}: up to date in DVC, not run")
        return Completed(message=f"{stage} is up to date in DVC's cache", name="Cached")
    try:
        log.info(f"{stage}: device {stage_device(stage, f'{repo}/params.yaml')}")
    except Exception as e:      # the stage itself reports a bad device setting, as a stage error
        log.warning(f"{stage}: {e}")
    r = dvc("repro", "--single-item", stage, cwd=repo)
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip() and "%|" not in line:       # progress bars stay out of Prefect's log
            log.info(line)
    if r.returncode:    # a Failed state, not a raise: Prefect would log its own traceback over the stage's error
        e = StageFailed(stage, r.stdout + r.stderr)
        return Failed(message=str(e), data=e)
    return f"{stage} reproduced"


def notify(flow, flow_run, state):
    """Failure hook: POST to the webhook from params.yaml, or log that none is set."""
    p = load_section(Params, "orchestrate", f"{flow_run.parameters.get('repo', '.')}/params.yaml")
    message = {"flow": flow.name, "run": flow_run.name, "state": state.name, "message": state.message}
    if not p.webhook:
        get_run_logger().warning(f"run failed; no orchestrate.webhook set to notify: {message}")
        return
    req = urllib.request.Request(p.webhook, data=json.dumps(message).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


@flow(name="transfer-pipeline", on_failure=[notify])
def pipeline(repo="."):
    """Every DVC stage in order; the first failure (the data gate, say) stops the ones after it.

    A failed stage fails the flow with the stage's own message as a state, not as a re-raised exception:
    the stage's output is in the log already, and a traceback of Prefect's engine would only bury it."""
    p = load_section(Params, "orchestrate", f"{repo}/params.yaml")
    stage = run_stage.with_options(retries=p.retries, retry_delay_seconds=p.retry_delay_seconds)
    done = {}
    for name in stage_order(repo):
        state = stage(name, repo, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        done[name] = state.message
    return done


if __name__ == "__main__":
    final = pipeline(return_state=True)
    if not final.is_completed():
        print(f"error: the flow ended {final.name}: {final.message}", file=sys.stderr)
        sys.exit(1)
