"""The schedule: the pipeline flow served as a Prefect deployment (cron from params.yaml's `orchestrate`).

Named `schedule`, not `deploy`: "deploy" is the DVC stage that chooses the shipped variant (stages/deploy.py).

This process is the runner: it registers the deployment, and runs the flow whenever the server schedules
one. `make schedule` starts a local server first when none is running.
"""
from flows.pipeline import Params, pipeline
from stages.config import cli, load_section


def main():
    p = load_section(Params, "orchestrate")
    pipeline.serve(name=p.name, cron=p.cron)


if __name__ == "__main__":
    cli(main)
