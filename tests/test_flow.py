"""The Prefect flow against a real Prefect server on loopback: cached stages, the data gate, the schedule."""
import os
import subprocess
import sys
import time

import pytest

from flows.pipeline import stage_order
from tests.conftest import ROOT, api, set_params, sh

pytestmark = pytest.mark.slow


def run_flow(repo, env):
    return subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=repo, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(repo),
                               "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})


def task_states(env, flow_run_id):
    runs = api(env, "POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"]: r["state"]["name"] for r in runs}


def last_flow_run(env):
    return api(env, "POST", "/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1})[0]


def test_stage_order_comes_from_dvc():
    order = stage_order(ROOT)
    assert set(order) == {"prepare", "validate", "labels", "train", "export", "evaluate", "prune", "deploy", "triton",
                          "trust", "explain", "report"}
    for before, after in [("prepare", "validate"), ("validate", "labels"), ("labels", "train"), ("train", "export"),
                          ("export", "evaluate"), ("train", "prune"), ("prune", "deploy"), ("export", "deploy"),
                          ("deploy", "triton"), ("deploy", "trust")]:
        assert order.index(before) < order.index(after), (before, after, order)


def test_an_up_to_date_pipeline_runs_as_cached_tasks(clone, server):
    t0 = time.perf_counter()
    r = run_flow(clone, server)
    assert r.returncode == 0, r.stderr[-3000:]
    seconds = time.perf_counter() - t0
    run = last_flow_run(server)
    assert run["state"]["type"] == "COMPLETED"
    assert task_states(server, run["id"]) == {s: "Cached" for s in stage_order(clone)}
    print(f"flow with every stage cached: {seconds:.1f} s")


def test_failing_data_stops_the_flow_before_train(clone, server):
    model = (clone / "outputs/train/model.pt").read_bytes()
    for f in sorted((clone / "data/mini/val/bees").glob("*.jpg"))[1:]:
        f.unlink()
    r = run_flow(clone, server)
    assert r.returncode != 0
    assert "validation failed" in r.stdout + r.stderr and "docs/index.html" in r.stdout + r.stderr
    run = last_flow_run(server)
    assert run["state"]["type"] == "FAILED"
    states = task_states(server, run["id"])
    assert states["prepare"] == "Completed" and states["validate"] == "Failed"
    assert "train" not in states                              # never started
    assert "no orchestrate.webhook set to notify" in r.stdout + r.stderr
    assert (clone / "outputs/train/model.pt").read_bytes() == model
    assert "Traceback" not in r.stdout + r.stderr                 # the stage's one-line error, not the engine's
    assert "error: the flow ended Failed: stage 'validate' failed" in r.stderr


def test_a_bad_param_fails_its_stage_once_not_once_per_retry(clone, server):
    set_params(clone, orchestrate={"retries": 2, "retry_delay_seconds": 0}, export={"batch_size": "32"})
    r = run_flow(clone, server)
    assert r.returncode != 0 and "export.batch_size must be an integer, not the string '32'" in r.stdout + r.stderr
    run = last_flow_run(server)
    runs = {t["name"]: t for t in api(server, "POST", "/task_runs/filter",
                                      json={"flow_runs": {"id": {"any_": [run["id"]]}}})}
    assert runs["export"]["state"]["name"] == "Failed" and runs["export"]["run_count"] == 1
    assert runs["train"]["state"]["name"] == "Cached" and "evaluate" not in runs


def test_scheduled_deployment_runs(clone, server):
    env = {**server, "PYTHONPATH": str(clone), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    runner = subprocess.Popen([sys.executable, "-m", "flows.schedule"], cwd=clone, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        deployments = []
        while not deployments and time.monotonic() < deadline:
            time.sleep(1)
            deployments = api(server, "POST", "/deployments/filter",
                              json={"deployments": {"name": {"any_": ["transfer-pipeline"]}}})
        assert deployments, "the deployment was not registered"
        dep = deployments[0]
        assert dep["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        scheduled = []
        while not scheduled and time.monotonic() < deadline:
            time.sleep(1)
            scheduled = api(server, "POST", "/flow_runs/filter", json={
                "deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        assert scheduled and all(r["expected_start_time"][11:16] == "03:00" for r in scheduled)
        run = api(server, "POST", f"/deployments/{dep['id']}/create_flow_run", json={})
        state = None
        while state not in ("COMPLETED", "FAILED", "CRASHED") and time.monotonic() < deadline + 120:
            time.sleep(2)
            state = api(server, "GET", f"/flow_runs/{run['id']}")["state"]["type"]
        assert state == "COMPLETED"
        assert set(task_states(server, run["id"]).values()) == {"Cached"}
    finally:
        runner.terminate()
        runner.wait(timeout=30)
