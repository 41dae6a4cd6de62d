from pipeline.tracking.mlflow_run import TrackedRun, flatten, resolve_tracking_uri
from pipeline.tracking.registry import (
    ModelCard,
    RegisteredVersion,
    champion_lag,
    latest_version,
    load_version,
    promote,
    register_version,
)

__all__ = [
    "ModelCard",
    "RegisteredVersion",
    "TrackedRun",
    "champion_lag",
    "flatten",
    "latest_version",
    "load_version",
    "promote",
    "register_version",
    "resolve_tracking_uri",
]
