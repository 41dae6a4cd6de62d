"""Serving: the model registry, the registered version as an MLflow pyfunc, batch inference."""

from pipeline.serve.registry import (
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
    "champion_lag",
    "latest_version",
    "load_version",
    "promote",
    "register_version",
]
