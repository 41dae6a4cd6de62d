"""The driver side of a run: preflight, the run file, the output directory, one TorchTrainer per run."""

from pipeline.run.driver import init_ray, run

__all__ = ["init_ray", "run"]
