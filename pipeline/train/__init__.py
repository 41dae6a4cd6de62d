from pipeline.train.driver import init_ray, run

__all__ = ["init_ray", "run"]
