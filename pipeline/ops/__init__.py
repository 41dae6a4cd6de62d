"""Operating strata: cluster job submission and retraining when new data lands."""

from pipeline.ops.landing import LandedTask, land_task, scan
from pipeline.ops.retraining import RetrainReport, retrain, watch

__all__ = ["LandedTask", "RetrainReport", "land_task", "retrain", "scan", "watch"]
