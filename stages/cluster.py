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
        # No job runtime_env: a job that has one gets no worker Ray started beforehand, and every worker starts
        # with the job's environment set up, which cost Ray Data batch prediction 8 % (alternated 2,000-image
        # jobs on 2 cores: 104-118 img/s with the runtime_env, 117-128 without). The workers inherit the
        # raylet's environment instead (the project on PYTHONPATH: importable before Ray adds the driver's
        # path) and import `stages.ray_worker` as they start.
        root = str(Path(__file__).resolve().parents[1])
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, saved]))
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                     configure_logging=False, _system_config={"preload_python_modules": ["stages.ray_worker"]})
        finally:                                    # the raylet has its copy: this process's stays as it was
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return ray

