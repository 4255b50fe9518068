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

from flows.pipeline import Params, check_pools
from stages.config import UserError, load_section
from tests.conftest import ROOT, api, descendants, set_params, sh

BIN = os.path.dirname(sys.executable)

# A stage of the tiny pipeline: half its output, then `seconds` of waiting, then the rest (a kill leaves half a
# file). With `signal` set, it is touched once the half is written, and only the first attempt waits.
WORK = '''import hashlib, json, sys, time
from pathlib import Path
import yaml
name, out, *inputs = sys.argv[1:]
p = yaml.safe_load(open("params.yaml"))[name]
data = hashlib.sha256(b"".join(Path(f).read_bytes() for f in inputs) + name.encode()).digest() * 4096
if p.get("fail"):
    sys.exit(f"error: {name}.fail is set")
Path(out).mkdir(parents=True, exist_ok=True)
with open(f"{out}/r.bin", "wb") as f:
    f.write(data[:len(data) // 2])
    f.flush()
    wait = True
    if p.get("signal"):
        wait = not Path(p["signal"]).exists()
        Path(p["signal"]).touch()
    time.sleep(p["seconds"] if wait else 0)
    f.write(data[len(data) // 2:])
Path(f"{out}/m.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
'''


@pytest.mark.parametrize("pools, error", [
    (["train"], "orchestrate.pools must be a mapping, not ['train'] (list)"),
    ({"train": 3}, "pools.train must be a work pool's name, not 3"),
    ({"trian": "gpu"}, "orchestrate.pools names 'trian', which is not a stage of dvc.yaml; did you mean 'train'?"),
])
def test_pools_must_map_stages_to_pool_names(tmp_path, pools, error):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"orchestrate": {"pools": pools}}))
    with pytest.raises(UserError) as e:
        check_pools(load_section(Params, "orchestrate", tmp_path / "params.yaml"), ["prepare", "train"], "params.yaml")
    assert error in str(e.value)


def test_a_worker_timeout_must_outlast_a_heartbeat(tmp_path):
    (tmp_path / "params.yaml").write_text("orchestrate:\n  worker_timeout_s: 30\n")
    with pytest.raises(UserError, match="worker_timeout_s must exceed the 30 s between heartbeats"):
        load_section(Params, "orchestrate", tmp_path / "params.yaml")


def test_no_pools_is_the_in_process_default(tmp_path):
    (tmp_path / "params.yaml").write_text("orchestrate:\n  pools:\n")
    assert load_section(Params, "orchestrate", tmp_path / "params.yaml").pools == {}
    assert load_section(Params, "orchestrate", ROOT / "params.yaml").pools == {}


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
    sections = {"make": {"seconds": 0}, "left": {"seconds": 4}, "right": {"seconds": 4},
                "orchestrate": {"retries": 0, "retry_delay_seconds": 0, "worker_timeout_s": 45}}
    for section, values in params.items():
        sections[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    return shared(repo, tmp)


def start_worker(server, pool, machine):
    """`prefect worker start` for `pool` (created first) in the folder `machine`, its runs' clones under
    machine/tmp."""
    pools = [p["name"] for p in api(server, "POST", "/work_pools/filter", json={})]
    if pool not in pools:
        api(server, "POST", "/work_pools/", json={"name": pool, "type": "process"})
    (machine / "tmp").mkdir(parents=True)
    env = {**server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(machine / "prefect"),
           "TMPDIR": str(machine / "tmp"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(machine / "worker.log", "w")
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                             "process", "--name", machine.name], cwd=machine, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


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


def last_flow_run(env):
    return api(env, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["transfer-pipeline"]}},
                                                       "sort": "START_TIME_DESC", "limit": 1})[0]


def stage_runs(env):
    """{stage: [its stage-on-worker runs, oldest first]} of the last pipeline run."""
    parent = last_flow_run(env)["id"]
    runs = api(env, "POST", "/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [parent]}},
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


def timeless(stages):
    """dvc.lock's stages without train's history.csv, the one output that records seconds."""
    return {name: {k: [o for o in v if o["path"] != "outputs/train/history.csv"] if k == "outs" else v
                   for k, v in s.items()} for name, s in stages.items()}


@pytest.mark.slow
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
    print(f"flow wall time {wall:.1f} s with left and right (4 s each) on two pools; overlapped: {overlap}")
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_worker_lost_mid_stage_is_retried_on_another_and_leaves_nothing_in_the_remote(server, tmp_path):
    signal_file = tmp_path / "started"
    repo = tiny_repo(tmp_path, left={"seconds": 120, "signal": str(signal_file)}, right={"seconds": 0},
                     orchestrate={"pools": {"left": "c"}, "retries": 1})
    first = start_worker(server, "c", tmp_path / "machine-c1")
    flow = run_flow(repo, server)
    second = None
    try:
        deadline = time.monotonic() + 180
        while not signal_file.exists():
            assert flow.poll() is None and time.monotonic() < deadline, "left never started on machine-c1"
            time.sleep(0.5)
        t_kill = time.perf_counter()
        kill_machine(first)
        second = start_worker(server, "c", tmp_path / "machine-c2")
        out = finish(flow)
        recovered = time.perf_counter() - t_kill
    finally:
        for p in (first, second, flow):
            if p is not None and p.poll() is None:
                kill_machine(p)
    lost, retry = stage_runs(server)["left"]
    assert lost["state_type"] == "CRASHED" and "no heartbeat" in lost["state"]["message"]
    assert retry["state_type"] == "COMPLETED"
    logs = api(server, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [retry["id"]]}}})
    assert any("machine-c2" in log["message"] for log in logs), "the retry did not run on machine-c2"
    half = list((tmp_path / "machine-c1/tmp").rglob("out/left/r.bin"))
    full = (repo / "out/left/r.bin").read_bytes()
    assert len(half) == 1 and half[0].read_bytes() == full[:len(full) // 2]    # the dead run's partial output
    objects = remote_objects(tmp_path / "dvc-remote")
    assert hashlib.md5(full).hexdigest() in objects and hashlib.md5(full[:len(full) // 2]).hexdigest() not in objects
    assert {o["path"]: o["md5"] for o in lock(repo)["left"]["outs"]}["out/left/r.bin"] == hashlib.md5(full).hexdigest()
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    print(f"machine-c1 killed mid-stage; the flow finished {recovered:.1f} s later on machine-c2")
    assert "Traceback" not in out


@pytest.mark.slow
def test_train_and_evaluate_on_two_pools_equal_a_local_repro(workers, clone, tmp_path):
    """The real stages on the mini photos: train on pool a, evaluate on pool b, the rest in the flow's process."""
    repo = shared(clone, tmp_path)
    before = lock(repo)
    metrics = (repo / "outputs/evaluate/metrics.json").read_bytes()
    predictions = (repo / "outputs/evaluate/predictions.csv").read_bytes()
    for f in ["train/model.pt", "evaluate/metrics.json", "evaluate/predictions.csv", "evaluate/summary.txt",
              "evaluate/confusion.png"]:
        (repo / "outputs" / f).unlink()
    set_params(repo, orchestrate={"pools": {"train": "a", "evaluate": "b"}})
    t0 = time.perf_counter()
    finish(run_flow(repo, workers))
    wall = time.perf_counter() - t0
    run = last_flow_run(workers)
    tasks = {t["name"]: t["state"] for t in api(workers, "POST", "/task_runs/filter",
                                                  json={"flow_runs": {"id": {"any_": [run["id"]]}}})}
    assert tasks.keys() >= set(lock(repo))           # and one task run per routed stage's child flow run
    assert {n for n in lock(repo) if tasks[n]["name"] != "Cached"} == {"train", "evaluate"}
    runs = stage_runs(workers)
    assert runs["train"][-1]["work_pool_name"] == "a" and runs["evaluate"][-1]["work_pool_name"] == "b"
    assert runs["train"][-1]["state_type"] == runs["evaluate"][-1]["state_type"] == "COMPLETED"
    assert timeless(lock(repo)) == timeless(before)      # model.pt byte for byte, and every other hash
    assert (repo / "outputs/evaluate/metrics.json").read_bytes() == metrics
    assert (repo / "outputs/evaluate/predictions.csv").read_bytes() == predictions
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    print(f"train on pool a, evaluate on pool b, the rest cached: {wall:.1f} s")


@pytest.mark.slow
def test_a_routed_stage_on_bad_input_fails_once_and_stops_what_reads_it(workers, tmp_path):
    repo = tiny_repo(tmp_path, orchestrate={"pools": {"make": "a"}, "retries": 2})
    set_params(repo, make={"fail": True})
    flow = run_flow(repo, workers)
    out, _ = flow.communicate(timeout=300)
    assert flow.returncode == 1 and "error: the flow ended Failed: stage 'make' failed" in out
    assert "error: make.fail is set" in out and "Traceback" not in out
    assert len(stage_runs(workers)["make"]) == 1                    # bad input: not retried
    assert "left" not in stage_runs(workers) and not (repo / "out").exists()
    set_params(repo, make={"fail": False}, orchestrate={"pools": {"left": "nosuch"}})
    flow = run_flow(repo, workers)
    out, _ = flow.communicate(timeout=300)
    assert flow.returncode == 1 and "work pool 'nosuch', which does not exist" in out and "Traceback" not in out
