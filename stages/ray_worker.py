"""Imported by every worker process of a local Ray as it starts (stages.cluster: Ray's `preload_python_modules`).

Ray Train's placement-group cleaner asks Ray's State API, which the dashboard serves, whether the train controller
is alive once a second; a local Ray here has no dashboard, so each query failed with a warning (70 lines in one
`train.workers: 2` run on the shipped data). That one logger is raised to ERROR: its errors still show. A cluster
at RAY_ADDRESS keeps its own logging.
"""
import logging

logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
