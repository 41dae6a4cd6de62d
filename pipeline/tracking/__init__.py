from pipeline.tracking.mlflow_run import TrackedRun, flatten, resolve_tracking_uri

__all__ = ["TrackedRun", "flatten", "resolve_tracking_uri"]
