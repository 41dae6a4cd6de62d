"""The continual model in MLflow's model registry.

A registered version is not a copy of any weights: it is a small JSON card, logged as a run
artifact, that names the frozen backbone (its config and the id every record was made with)
and the memory store (URI and version). Backbone + the first ``memory_version`` records of the
store is the whole model, so a version costs a few kilobytes however large the backbone is.
Versions carry the stream position and the task's metrics as tags.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import refuse_code
from pipeline.errors import ConfigError

CARD_FORMAT = "strata-model/1"
CARD_FILE = "continual_model.json"


@dataclass(frozen=True)
class ModelCard:
    """What one registered version is: enough to rebuild the model for inference."""

    config: dict[str, Any]  # the run's resolved config (backbone, method, data, eval sections)
    backbone_id: str
    memory_store: str
    memory_version: int  # the model = the store's first memory_version records
    scenario: str
    label_space: str  # "seen" or "task", as evaluated
    image_size: int
    tasks: list[dict[str, Any]]  # learned so far, in order: {"id", "classes" (stream ids), "domain"}
    class_names: list[str]  # seen classes by stream id
    records_sha256: list[str] = field(default_factory=list)  # the store records it is made of (absent in older cards)
    format: str = CARD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, origin: str) -> ModelCard:
        try:
            data = json.loads(text)
            if data.get("format") != CARD_FORMAT:
                raise ConfigError(f"{origin}: format {data.get('format')!r}, expected {CARD_FORMAT!r}")
            refuse_code(data.get("config"), origin)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: not a strata model card ({exc})") from None


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    card: ModelCard


def _existing_version(client: MlflowClient, run_id: str, name: str, tags: dict[str, str]) -> str | None:
    """This run's version of ``name`` with the same store version and record checksum, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    keys = ("strata.memory_store", "strata.memory_version", "strata.record_sha256")
    for mv in versions:
        if all(mv.tags.get(k) == tags.get(k) for k in keys):
            return str(mv.version)
    return None


def register_version(tracking_uri: str, run_id: str, name: str, card: ModelCard, tags: dict[str, str]) -> str:
    """Log ``card`` to the run and register it as the next version of model ``name``; returns the
    version. Idempotent: a version this run registered for the same record is returned as it is."""
    client = MlflowClient(tracking_uri)
    existing = _existing_version(client, run_id, name, tags)
    if existing is not None:
        return existing
    artifact_path = f"continual_model/v{card.memory_version:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(card.to_json())
        client.log_artifact(run_id, str(path), artifact_path)
    try:
        client.create_registered_model(name, description="strata continual model: a frozen backbone plus a memory store")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """A one-file download needs no progress bar on the user's terminal."""
    previous = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name]
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = previous


def _parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """NAME, NAME/VERSION or NAME@ALIAS -> (name, version, alias)."""
    if "@" in spec:
        name, _, alias = spec.partition("@")
        return name, None, alias
    name, _, version = spec.partition("/")
    if version and not version.isdigit():
        raise ConfigError(f"--model {spec}: the version after '/' must be a number")
    return name, version or None, None


def load_version(tracking_uri: str, spec: str) -> RegisteredVersion:
    """The version ``spec`` names (NAME = its latest version), with its card."""
    client = MlflowClient(tracking_uri)
    name, version, alias = _parse_spec(spec)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ConfigError(f"--model {spec}: no registered model {name!r} in {tracking_uri}")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise ConfigError(f"--model {spec}: {exc.message.splitlines()[0]} ({tracking_uri})") from None
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{CARD_FILE}", dst_path=tmp, tracking_uri=tracking_uri)
        card = ModelCard.from_json(Path(local).read_text(), f"{name}/{mv.version} {CARD_FILE}")
    return RegisteredVersion(name, str(mv.version), mv.run_id, dict(mv.tags), card)


def latest_version(tracking_uri: str, name: str) -> RegisteredVersion | None:
    """The newest version of ``name``; None while it has none (or does not exist yet)."""
    if not MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'"):
        return None
    return load_version(tracking_uri, name)
