"""Pipeline stages: one module per `dvc.yaml` stage, each a pure `run(...)` and a thin `main()`."""
