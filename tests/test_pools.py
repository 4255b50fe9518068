"""Stages routed to Prefect work pools: a real server, process workers each in a folder of its own (a machine),
a bare git repo and a local-directory DVC remote between them."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, api, set_params, sh

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)

# A stage of the tiny pipeline: half its output, then `seconds` of waiting, then the rest (a kill leaves half a
# file); `signal`, when set, is touched once the half is written.
WORK = '''import hashlib, json, sys, time
from pathlib import Path
import yaml
name, out, *inputs = sys.argv[1:]
p = yaml.safe_load(open("params.yaml"))[name]
data = hashlib.sha256(b"".join(Path(f).read_bytes() for f in inputs) + name.encode()).digest() * 4096
Path(out).mkdir(parents=True, exist_ok=True)
with open(f"{out}/r.bin", "wb") as f:
    f.write(data[:len(data) // 2])
    f.flush()
    if p.get("signal"):
        Path(p["signal"]).touch()
    time.sleep(p["seconds"])
    f.write(data[len(data) // 2:])
Path(f"{out}/m.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
'''


def tiny_stage(name, inputs):
    return {"cmd": f"python work.py {name} out/{name} {' '.join(inputs)}", "deps": ["work.py", *inputs],
            "params": [name], "outs": [f"out/{name}/r.bin"], "metrics": [{f"out/{name}/m.json": {"cache": False}}]}


def shared(repo, tmp):
    """Give `repo` a bare git remote (`origin`, default branch main) and a default local DVC remote."""
    sh(tmp, "git", "init", "-q", "--bare", "-b", "main", str(tmp / "origin.git"))
    sh(repo, "dvc", "remote", "add", "-d", "store", str(tmp / "dvc-remote"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shared remotes")
    sh(repo, "git", "remote", "add", "origin", str(tmp / "origin.git"))
    sh(repo, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    return repo


def tiny_repo(tmp, **params):
    """flows/ and stages/config.py with a three-stage pipeline: `make`, then `left` and `right` (both read make)."""
    repo = tmp / "flow"
    for f in ["flows/__init__.py", "flows/pipeline.py", "flows/pools.py", "stages/__init__.py", "stages/config.py"]:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    (repo / "work.py").write_text(WORK)
    (repo / "data.txt").write_text("the data\n")
    stages = {"make": tiny_stage("make", ["data.txt"]),
              "left": tiny_stage("left", ["out/make/r.bin", "out/make/m.json"]),
              "right": tiny_stage("right", ["out/make/r.bin", "out/make/m.json"])}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    sections = {"make": {"seconds": 0}, "left": {"seconds": 6}, "right": {"seconds": 6},
                "orchestrate": {"retries": 0, "retry_delay_seconds": 0, "worker_timeout_s": 45}}
    for section, values in params.items():
        sections[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    return shared(repo, tmp)


def start_worker(server, pool, machine):
    """`prefect worker start` for `pool` in the folder `machine`, its runs' clones under machine/tmp."""
    (machine / "tmp").mkdir(parents=True)
    env = {**server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(machine / "prefect"),
           "TMPDIR": str(machine / "tmp"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(machine / "worker.log", "w")
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                             "process", "--name", machine.name], cwd=machine, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def descendants(pid):
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def kill_machine(proc):
    """SIGKILL a worker and every process under it, all at once: the machine is gone."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_machine(proc)


@pytest.fixture(scope="module")
def workers(server, tmp_path_factory):
    """One process worker on each of the pools `a` and `b`, each in a folder of its own."""
    procs = [start_worker(server, pool, tmp_path_factory.mktemp(f"machine-{pool}")) for pool in "ab"]
    yield server
    for p in procs:
        stop(p)


def run_flow(repo, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONPATH": str(repo), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})


def finish(flow, timeout=600):
    out, _ = flow.communicate(timeout=timeout)
    assert flow.returncode == 0, out[-4000:]
    return out


def stage_runs(env):
    """{stage: [its stage-on-worker runs, oldest first]}."""
    runs = api(env, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["stage-on-worker"]}},
                                                        "sort": "EXPECTED_START_TIME_ASC"})
    out = {}
    for r in runs:
        out.setdefault(r["parameters"]["stage"], []).append(r)
    return out


def remote_objects(remote):
    """{md5: bytes} of every file in a DVC remote, each checked against its own name (content-addressed)."""
    objs = {}
    for f in (remote / "files/md5").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert hashlib.md5(data).hexdigest() == f.parent.name + f.name, f"damaged object {f}"
            objs[f.parent.name + f.name] = data
    return objs


def lock(repo):
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def test_independent_routed_stages_run_at_once_and_match_a_local_repro(workers, tmp_path):
    repo = tiny_repo(tmp_path)
    local = Path(shutil.copytree(repo, tmp_path / "local", symlinks=True))
    sh(local, "dvc", "repro")
    set_params(repo, orchestrate={"pools": {"left": "a", "right": "b"}})
    t0 = time.perf_counter()
    out = finish(run_flow(repo, workers))
    wall = time.perf_counter() - t0
    runs = stage_runs(workers)
    left, right = runs["left"][-1], runs["right"][-1]
    assert left["state_type"] == right["state_type"] == "COMPLETED"
    assert {left["work_pool_name"], right["work_pool_name"]} == {"a", "b"}
    assert left["start_time"] < right["end_time"] and right["start_time"] < left["end_time"], "not at once"
    assert lock(repo) == lock(local)                 # same hashes of every dependency and output
    for f in ["out/left/r.bin", "out/left/m.json", "out/right/r.bin", "out/right/m.json"]:
        assert (repo / f).read_bytes() == (local / f).read_bytes(), f
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    assert sh(repo, "git", "ls-remote", "origin", "refs/pipeline/*").stdout == ""     # hand-over refs dropped
    remote_objects(tmp_path / "dvc-remote")
    overlap = min(t["end_time"] for t in (left, right)) > max(t["start_time"] for t in (left, right))
    print(f"flow wall time {wall:.1f} s with left and right (6 s each) on two pools; overlapped: {overlap}")
    assert "Traceback" not in out
