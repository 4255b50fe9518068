"""The DVC pipeline as a Prefect flow: one task per `dvc.yaml` stage, in the order DVC's own graph gives.

DVC stays the single source of truth for the stages, their inputs and their cache: a stage that `dvc status`
finds up to date ends as a `Cached` task without running, and one that is not runs `dvc repro --single-item`.
`python -m flows.pipeline` runs it once; flows/schedule.py serves it on a schedule.

With `orchestrate.pools` set, the stages it names run on workers of those Prefect work pools (flows/pools.py)
and every stage starts as soon as the stages it reads from are done: export and prune, which both need only
train, run at the same time. Each worker has a clone of its own, so DVC's lock is never contended there; the
flow's own workspace (its in-process stages, and bringing a worker's results in) is used by one task at a time.
"""
import dataclasses
import difflib
import json
import sys
import urllib.request

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows import pools
from flows.pools import HEARTBEAT_S, dvc
from stages.config import UserError, load_section, stage_device


@dataclasses.dataclass(frozen=True)
class Params:
    name: str = "transfer-pipeline"
    cron: str = "0 3 * * *"            # the scheduled deployment's cron (flows/schedule.py)
    retries: int = 2                    # per stage, for transient failures only
    retry_delay_seconds: int = 10
    webhook: str = ""                   # POSTed a JSON message when a run fails; logged when empty
    pools: dict = dataclasses.field(default_factory=dict)   # stage -> Prefect work pool; {}: all in this process
    worker_timeout_s: int = 90          # a routed stage's worker silent this long (no heartbeat) is lost

    def __post_init__(self):
        if self.worker_timeout_s <= HEARTBEAT_S:
            raise ValueError(f"worker_timeout_s must exceed the {HEARTBEAT_S} s between heartbeats")
        for stage, pool in self.pools.items():
            if not isinstance(pool, str) or not pool:
                raise ValueError(f"pools.{stage} must be a work pool's name, not {pool!r}")


def check_pools(p, stages, path):
    """Every stage `orchestrate.pools` names is a stage of dvc.yaml; a typo names the stage it resembles."""
    for stage in p.pools:
        if stage not in stages:
            close = difflib.get_close_matches(str(stage), stages, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the stages: {', '.join(stages)}"
            raise UserError(f"{path}: orchestrate.pools names '{stage}', which is not a stage of dvc.yaml{hint}")


class StageFailed(Exception):
    def __init__(self, stage, output):
        self.stage, self.output = stage, output
        # a stage's own one-line `error: ...` is bad input or broken data: retrying cannot help
        self.user_error = any(line.startswith("error: ") for line in output.splitlines())
        last = [line for line in output.splitlines() if line.strip()][-3:]
        super().__init__(f"stage '{stage}' failed: " + " | ".join(last))


def stage_order(repo="."):
    """Stage names from DVC's graph, dependencies first (no second copy of the DAG in Python)."""
    return list(pools.upstream(repo))


def transient(task, task_run, state):
    """Retry a stage unless it failed on bad input (its one-line `error:`), which would fail again."""
    try:
        state.result()
    except StageFailed as e:
        return not e.user_error
    except Exception:
        return True
    return False


def cached(stage, repo):
    """A `Cached` state when `dvc status` finds the stage up to date, else None."""
    status = dvc("status", "--json", stage, cwd=repo)
    if status.returncode == 0 and json.loads(status.stdout or "{}") == {}:
        get_run_logger().info(f"{stage}: up to date in DVC, not run")
        return Completed(message=f"{stage} is up to date in DVC's cache", name="Cached")
    return None


@task(task_run_name="{stage}", retry_condition_fn=transient)
def run_stage(stage, repo="."):
    with pools.WORKSPACE:
        return cached(stage, repo) or reproduce(stage, repo)


def reproduce(stage, repo):
    log = get_run_logger()
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


@task(task_run_name="{stage}", retry_condition_fn=transient)
def run_routed(stage, repo, deployment, inputs):
    """`stage` on a worker of its pool (flows/pools.py), its results then brought into this workspace."""
    with pools.WORKSPACE:
        if state := cached(stage, repo):
            return state
        rev, ref = pools.publish(repo, stage, flow_run.id, inputs)
    try:
        run = run_deployment(deployment, parameters={"stage": stage, "rev": rev, "ref": ref}, timeout=None,
                             poll_interval=2)
        message = run.state.message or ""
        if message.startswith(pools.STAGE_OUTPUT):   # the stage's own failure: retried unless bad input
            e = StageFailed(stage, message.removeprefix(pools.STAGE_OUTPUT))
            return Failed(message=str(e), data=e)
        if not run.state.is_completed():             # a lost worker (Crashed), a failed clone, push or pull
            raise RuntimeError(f"stage '{stage}': {deployment} run '{run.name}' ended {run.state.name}: {message}")
        with pools.WORKSPACE:
            pools.merge_result(repo, stage, rev, ref)
    finally:
        pools.unpublish(repo, ref)
    return f"{stage} reproduced on {deployment}"


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
    try:
        p = load_section(Params, "orchestrate", f"{repo}/params.yaml")
    except UserError as e:
        return Failed(message=str(e))
    stage = run_stage.with_options(retries=p.retries, retry_delay_seconds=p.retry_delay_seconds)
    if p.pools:
        return routed(p, repo, stage)
    done = {}
    for name in stage_order(repo):
        state = stage(name, repo, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        done[name] = state.message
    return done


def routed(p, repo, stage):
    """Each stage submitted once the stages it reads from are done; routed ones to their pool's deployment."""
    inputs = pools.upstream(repo)
    try:
        check_pools(p, list(inputs), f"{repo}/params.yaml")
        deployments = pools.ensure(p.pools, p.name, p.worker_timeout_s, repo)
    except UserError as e:
        return Failed(message=str(e))
    remote = run_routed.with_options(retries=p.retries, retry_delay_seconds=p.retry_delay_seconds)
    futures = {}
    for name, ups in inputs.items():
        wait = [futures[u] for u in ups]
        futures[name] = (remote.submit(name, repo, deployments[p.pools[name]], ups, wait_for=wait)
                         if name in p.pools else stage.submit(name, repo, wait_for=wait))
    done = {}
    for name, future in futures.items():
        future.wait()
        if not future.state.is_completed():    # failed, or never started (NotReady) after an upstream failure
            return Failed(message=future.state.message)
        done[name] = future.state.message
    return done


if __name__ == "__main__":
    final = pipeline(return_state=True)
    if not final.is_completed():
        print(f"error: the flow ended {final.name}: {final.message}", file=sys.stderr)
        sys.exit(1)
