from pipeline.tune.sweep import SweepConfig, load_sweep, sweep

__all__ = ["SweepConfig", "load_sweep", "sweep"]
