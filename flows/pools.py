"""Stages routed to Prefect work pools (`orchestrate.pools`): each runs on a worker of its pool, in a clone of its own.

A routed stage travels as a git revision and comes back as one; DVC's remote carries every cached artifact:

  flow    dvc push the inputs; commit the workspace as `git add -A` sees it (code, params, dvc.lock and the
          `cache: false` outputs) without touching its branch, and push that commit to refs/pipeline/<run>/<stage>/in
  worker  clone (the deployment's pull step, a fresh temporary folder per run), check that commit out, dvc pull the
          upstream stages' outputs, dvc repro --single-item <stage>, dvc push, then commit and push .../out
  flow    take the stage's dvc.lock entry and git-tracked outputs from .../out, dvc pull its cached outputs

Git carries what DVC leaves to git (`dvc push` never uploads dvc.lock or a `cache: false` output); nothing is
copied by hand. The worker pushes only after its `dvc repro` succeeded, and its result ref only after that push:
a worker that dies mid-stage leaves nothing behind. Its run is marked Crashed when its heartbeats stop (the
automation in `ensure`, after `orchestrate.worker_timeout_s`), and the flow's retry runs the stage again on a
worker of the pool that is still polling.
"""
import os
import socket
import subprocess
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import networkx as nx
import yaml
from prefect import flow, get_run_logger
from prefect.states import Failed

REMOTE = "origin"                 # the git remote the flow and every worker share
FLOW = "stage-on-worker"
ENTRYPOINT = "flows/pools.py:stage_on_worker"
HEARTBEAT_S = 30                  # Prefect's shortest interval between flow run heartbeats
AUTOMATION = "crash-lost-stage-workers"
# DVC commands in the flow's own checkout, one task at a time. Reached as `pools.WORKSPACE`: `flow.serve` pickles
# the flow's functions by value, and a lock among their globals cannot be pickled.
WORKSPACE = threading.Lock()
STAGE_OUTPUT = "the stage failed; its last lines:"   # heads a worker's Failed message: the stage's own failure


def git(*args, cwd=".", env=None):
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def upstream(repo="."):
    """{stage: the stages whose outputs it reads}, from DVC's graph (edges point from a stage to its inputs)."""
    from dvc.repo import Repo

    with Repo(repo) as r:
        g = r.index.graph
        return {s.name: sorted(d.name for d in g.successors(s)) for s in reversed(list(nx.topological_sort(g)))}


def snapshot(repo, message):
    """A commit of the workspace as `git add -A` sees it, on top of HEAD; the branch, index and files stay as
    they are (a temporary index, as `git stash create` does)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": f"{tmp}/index"}
        if subprocess.run(["git", "config", "user.email"], cwd=repo, capture_output=True).returncode:
            env |= {"GIT_AUTHOR_NAME": "pipeline", "GIT_AUTHOR_EMAIL": "pipeline@localhost",
                    "GIT_COMMITTER_NAME": "pipeline", "GIT_COMMITTER_EMAIL": "pipeline@localhost"}
        git("read-tree", "HEAD", cwd=repo, env=env)
        git("add", "-A", cwd=repo, env=env)
        return git("commit-tree", git("write-tree", cwd=repo, env=env), "-p", "HEAD", "-m", message, cwd=repo,
                   env=env)


def dvc(*args, cwd="."):
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)


def checked(r, what):
    if r.returncode:
        raise RuntimeError(f"{what} failed: {(r.stdout + r.stderr).strip()[-2000:]}")
    return r


@flow(name=FLOW, flow_run_name="{stage}")
def stage_on_worker(stage: str, rev: str, ref: str):
    """On a worker, in the deployment's fresh clone: `rev` (published at `ref`/in) in, the result at `ref`/out."""
    log = get_run_logger()
    git("fetch", "-q", REMOTE, f"{ref}/in")
    if git("rev-parse", "FETCH_HEAD") != rev:
        raise RuntimeError(f"{ref}/in is not {rev}: another run published over it")
    git("checkout", "-q", "--force", "--detach", rev)
    log.info(f"{stage}: revision {rev[:12]} in {os.getcwd()} on {socket.gethostname()}")
    inputs = upstream()[stage]
    if inputs:
        checked(dvc("pull", *inputs), f"dvc pull {' '.join(inputs)}")
    r = dvc("repro", "--single-item", stage)
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip() and "%|" not in line:
            log.info(line)
    if r.returncode:      # the flow tells bad input (no retry) from the rest, as for a stage run in-process
        tail = [line for line in (r.stdout + r.stderr).splitlines() if line.strip() and "%|" not in line]
        return Failed(message="\n".join([STAGE_OUTPUT, *tail[-20:]]))
    checked(dvc("push", stage), f"dvc push {stage}")         # only now: a run cut short uploads nothing
    out = snapshot(".", f"{stage} reproduced on {socket.gethostname()} in {os.getcwd()}")
    git("push", "-q", "--force", REMOTE, f"{out}:{ref}/out")
    return out


def ensure(pools, name, worker_timeout_s, repo="."):
    """The deployment of `stage_on_worker` on each pool (`<name>-<pool>`, cloned from this repo's git remote) and
    the automation that marks a routed stage Crashed once its worker stops sending heartbeats; {pool: name}."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.runner.storage import GitRepository

    from stages.config import UserError

    try:
        url = git("remote", "get-url", REMOTE, cwd=repo)
    except RuntimeError:
        raise UserError(f"orchestrate.pools routes stages to workers, which clone this repo from its git remote "
                        f"'{REMOTE}': none is set (git remote add {REMOTE} <url>)") from None
    if not dvc("remote", "default", cwd=repo).stdout.strip():
        raise UserError("orchestrate.pools routes stages to workers, which exchange outputs through DVC's "
                        "remote: none is the default (dvc remote add -d <name> <url>)")
    check_work_pools(set(pools.values()))
    source = stage_on_worker.from_source(source=GitRepository(url=url), entrypoint=ENTRYPOINT)
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    names = {}
    for pool in sorted(set(pools.values())):
        source.deploy(name=f"{name}-{pool}", work_pool_name=pool, job_variables={"env": env},
                      print_next_steps=False, build=False, push=False)
        names[pool] = f"{FLOW}/{name}-{pool}"
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": ["prefect.flow-run.*"]},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW},   # these runs only
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=worker_timeout_s))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat from its worker for {worker_timeout_s} s: the worker is lost")
    try:
        found = Automation.read(name=AUTOMATION)
    except ValueError:
        found = None
    if found is None:
        Automation(name=AUTOMATION, trigger=trigger, actions=[action]).create()
    elif found.trigger.within != trigger.within:
        found.trigger, found.actions = trigger, [action]
        found.update()
    return names


def check_work_pools(names):
    """Each work pool exists (a typo would wait forever for a worker); one with no worker online is logged."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from stages.config import UserError

    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                raise UserError(f"orchestrate.pools names the work pool '{name}', which does not exist: "
                                f"prefect work-pool create {name} --type process") from None
            if not any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(name)):
                get_run_logger().warning(f"no worker of pool '{name}' is online: its stages wait for one "
                                         f"(prefect worker start --pool {name})")


def merge_result(repo, stage, rev, ref):
    """Bring the worker's result (`ref`/out, a commit on top of `rev`) into the workspace: the files it changed
    (the stage's git-tracked outputs), its dvc.lock entry for `stage`, then the cached outputs from the remote."""
    git("fetch", "-q", REMOTE, f"{ref}/out", cwd=repo)
    out = git("rev-parse", "FETCH_HEAD", cwd=repo)
    if git("rev-parse", f"{out}^", cwd=repo) != rev:
        raise RuntimeError(f"{ref}/out is not a result of {rev[:12]}")
    for line in git("diff", "--name-status", "--no-renames", rev, out, cwd=repo).splitlines():
        status, path = line.split("\t", 1)
        if path == "dvc.lock":
            continue
        if status == "D":
            (Path(repo) / path).unlink(missing_ok=True)
        else:
            git("restore", f"--source={out}", "--worktree", "--", path, cwd=repo)
    theirs = git("show", f"{out}:dvc.lock", cwd=repo)
    path = Path(repo) / "dvc.lock"
    if not path.exists():
        path.write_text(theirs + "\n")
    else:
        from dvc.utils.serialize import modify_yaml

        with modify_yaml(path) as d:
            d.setdefault("stages", {})[stage] = yaml.safe_load(theirs)["stages"][stage]
    checked(dvc("pull", stage, cwd=repo), f"dvc pull {stage}")


def publish(repo, stage, run_id, inputs):
    """Push `inputs`' cached outputs and a snapshot of the workspace; (revision, ref) for `stage_on_worker`."""
    if inputs:
        checked(dvc("push", *inputs, cwd=repo), f"dvc push {' '.join(inputs)}")
    rev = snapshot(repo, f"{stage}: the flow's workspace for run {run_id}")
    ref = f"refs/pipeline/{run_id}/{stage}"
    git("push", "-q", "--force", REMOTE, f"{rev}:{ref}/in", cwd=repo)
    return rev, ref


def unpublish(repo, ref):
    subprocess.run(["git", "push", "-q", REMOTE, "--delete", f"{ref}/in", f"{ref}/out"], cwd=repo,
                   capture_output=True)
