"""Where Ray work runs: the user's cluster when `RAY_ADDRESS` is set, else a local Ray on this machine.

One entry point for every stage and tool that uses Ray (prepare, train with `train.workers > 1`, batch
prediction), so that the address, the resources and the logging are decided in one place. Nothing here starts
Ray at import; `train.workers: 1` and serial runs never call it.
"""
import os
from pathlib import Path


def ray_init(num_cpus=None):
    """Connect to Ray, starting a local instance when none is running and no `RAY_ADDRESS` is set.

    Reuses an instance already initialised in this process (the tests share one per session). A local start
    gets explicit resources (`num_cpus`, default every core) and no dashboard: on a small machine the
    dashboard's processes cost more than the work.
    """
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        root = str(Path(__file__).resolve().parents[1])      # importable before Ray adds the driver's path
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 configure_logging=False, runtime_env={
                     "env_vars": {"PYTHONPATH": path},
                     "worker_process_setup_hook": "stages.cluster.without_state_api_warnings"})
    return ray


def without_state_api_warnings():
    """Run in every worker process of a local Ray: Ray Train's placement-group cleaner asks Ray's State API,
    which the dashboard serves, whether the train controller is alive once a second; with no dashboard each
    query fails with a warning (70 lines in one `train.workers: 2` run on the shipped data). Its errors still
    show; a cluster at RAY_ADDRESS keeps its own logging."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
