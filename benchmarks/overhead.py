"""Part 4: what the orchestration costs when there is nothing to do: `dvc repro` with every stage up to date,
and the Prefect flow (`python -m flows.pipeline`) with every stage Cached, against a local Prefect server that
`flows.server.ensure` starts on a free port with its own PREFECT_HOME (its start time is reported apart).
Each repeat runs one of each, back to back, so that their ratio is taken pair by pair.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.timing import pairwise, spread
from benchmarks.variants import QUICK
from flows import server
from tests.conftest import TINY, project_copy, set_params


def venv_env(**extra):
    """This environment with the venv's tools (dvc, python) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def sh(cwd, *cmd, **env):
    """Run `cmd` with the venv's tools first on PATH; (completed process, wall seconds). Fails loudly."""
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=venv_env(**env))
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed in {cwd}: {(r.stdout + r.stderr)[-1500:]}")
    return r, time.perf_counter() - t


def mini_project(dest, source):
    """A git copy of the project whose pipeline runs on `source` with tiny settings (for --quick)."""
    repo = project_copy(Path(dest))
    shutil.rmtree(repo / "outputs", ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    shutil.copytree(source, repo / "data" / "mini")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    updates = {"prepare": {"source": "data/mini"}, "train": TINY, "orchestrate": {"retries": 0}}
    if "prune" in params:                      # stages the lead may add to dvc.yaml: tiny budgets there too
        updates["prune"] = QUICK["prune"]
    if "deploy" in params:
        d = params["deploy"] or {}
        updates["deploy"] = {**QUICK["deploy"], "int8": {**(d.get("int8") or {}), **QUICK["int8"]},
                             **({"tries": d["tries"][:1]} if d.get("tries") else {})}
    set_params(repo, **updates)
    sh(repo, "git", "init", "-q")
    return repo


def stop(home):
    """Stop the server `flows.server.ensure` started (its pid file is in `home`): the whole process group."""
    pid_file = Path(home) / "server.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())        # started in a session of its own: pid == process group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):   # subprocess may have reaped its forgotten Popen already
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server(home):
    """(API URL, seconds to start) of a local Prefect server with its own PREFECT_HOME; stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    saved, t = os.environ.get("PREFECT_HOME"), time.perf_counter()
    os.environ["PREFECT_HOME"] = str(home)      # where ensure() keeps its SQLite file, log and pid
    try:
        server.ensure(url, timeout=300)
    except SystemExit as e:                     # ensure() exits with a message when the server never answers
        stop(home)
        raise RuntimeError(str(e.code)) from None
    finally:
        os.environ.pop("PREFECT_HOME") if saved is None else os.environ.update(PREFECT_HOME=saved)
    try:
        yield url, time.perf_counter() - t
    finally:
        stop(home)


def last_run_states(url):
    """(flow run state, {task: state}) of the latest flow run."""
    run = httpx.post(f"{url}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30).json()[0]
    tasks = httpx.post(f"{url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}},
                       timeout=30).json()
    return run["state"]["name"], {t["name"]: t["state"]["name"] for t in tasks}


def run(repo, work, repeats, source=None):
    """Part 4 on `repo` (or, with `source`, on a tiny copy of the project that reads it)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    repo = mini_project(work / "project", source) if source else Path(repo).resolve()
    _, bring_up = sh(repo, "dvc", "repro")     # not a result: brings every stage up to date before the timed runs
    dvc_s, flow_s, checks = [], [], []
    with prefect_server(work / "prefect") as (url, start):
        for i in range(repeats):
            r, s = sh(repo, "dvc", "repro")
            dvc_s.append(s)
            checks.append("Running stage" not in r.stdout)
            _, s = sh(repo, sys.executable, "-m", "flows.pipeline", PREFECT_HOME=str(work / "prefect"),
                      PREFECT_API_URL=url, PYTHONPATH=str(repo))
            flow_s.append(s)
            state, tasks = last_run_states(url)
            checks.append(state == "Completed" and set(tasks.values()) == {"Cached"})
            print(f"bench: overhead repeat {i + 1}/{repeats}: dvc repro {dvc_s[-1]:.1f} s, flow {flow_s[-1]:.1f} s")
    return {"repo": "a tiny copy of the project (--quick)" if source else str(repo), "repeats": repeats,
            "bring_up_s": round(bring_up, 1), "server_start_s": round(start, 1), "stages": list(tasks),
            "all_cached": all(checks), "dvc_noop_s": spread(dvc_s), "flow_cached_s": spread(flow_s),
            "flow_minus_dvc_s": spread([f - d for f, d in zip(flow_s, dvc_s)]),
            "ratio_flow_vs_dvc": pairwise(flow_s, dvc_s)}
