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
        raise RuntimeError(str(e.code)) from None
    finally:
        os.environ.pop("PREFECT_HOME") if saved is None else os.environ.update(PREFECT_HOME=saved)
    start = time.perf_counter() - t
    pid = int((Path(home) / "server.pid").read_text())
    try:
        yield url, start
    finally:
        os.killpg(pid, signal.SIGTERM)          # ensure() started it in a session of its own: pid == group id
        for _ in range(60):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def last_run_states(url):
    """(flow run state, {task: state}) of the latest flow run."""
    run = httpx.post(f"{url}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30).json()[0]
    tasks = httpx.post(f"{url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}},
                       timeout=30).json()
    return run["state"]["name"], {t["name"]: t["state"]["name"] for t in tasks}


def start(repo, work, source=None):
    """Start the first `dvc repro` on `repo` (with `source`: on a tiny copy of the project that reads it) in the
    background; it brings every stage up to date before the timed runs. A handle for `run`."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    repo = mini_project(work / "project", source) if source else Path(repo)
    log = work / "bring_up.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=f, stderr=subprocess.STDOUT, env=venv_env())
    return {"repo": repo, "proc": proc, "t0": time.perf_counter(), "log": log, "tiny": bool(source)}


def run(pending, work, repeats):
    """Part 4 on the project `start` brought up (an exception from `start` is raised here, as this part's)."""
    if isinstance(pending, Exception):
        raise pending
    repo, work = pending["repo"], Path(work)
    if pending["proc"].wait():
        raise RuntimeError(f"dvc repro failed in {repo}: {pending['log'].read_text()[-1500:]}")
    bring_up = time.perf_counter() - pending["t0"]
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
    return {"repo": "a tiny copy of the project (--quick)" if pending["tiny"] else str(repo), "repeats": repeats,
            "bring_up_s": round(bring_up, 1), "server_start_s": round(start, 1), "stages": list(tasks),
            "all_cached": all(checks), "dvc_noop_s": spread(dvc_s), "flow_cached_s": spread(flow_s),
            "flow_minus_dvc_s": spread([f - d for f, d in zip(flow_s, dvc_s)]),
            "ratio_flow_vs_dvc": pairwise(flow_s, dvc_s)}
