"""The driver side of a run: preflight, the run file, the output directory, one TorchTrainer per run."""

from pipeline.run.driver import run
from pipeline.run.session import init_ray

__all__ = ["init_ray", "run"]
