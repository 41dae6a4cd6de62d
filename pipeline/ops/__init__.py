"""Operating strata: cluster job submission and retraining when new data lands."""

from pipeline.ops.landing import LandedTask, scan
from pipeline.ops.retraining import RetrainReport, retrain, watch

__all__ = ["LandedTask", "RetrainReport", "retrain", "scan", "watch"]
