"""The continual model in MLflow's model registry.

A registered version is not a copy of any weights: it is a small JSON card that names the frozen
backbone (its config and the id every record was made with) and the memory store (URI and
version). Backbone + the first ``memory_version`` records of the store is the whole model, so a
version costs a few kilobytes however large the backbone is. The card is packaged as an MLflow
pyfunc model that holds data only: its ``MLmodel`` names an installed strata module as the
``loader_module`` and the card is its data (no code file, nothing pickled). ``verify_model_dir``
refuses a downloaded version that holds anything else, so a registry writer cannot make a
consumer that loads through strata import code. Versions carry the stream position, the task's
metrics and the accuracy on every task learned so far as tags.

Aliases: ``@latest-task`` follows every new version; ``@champion`` moves to a new version only
when it passes the regression gate -- its mean accuracy on the tasks the current champion knows
has not dropped by more than ``tolerance`` points below the champion's own on those tasks. A
version that fails keeps the old champion and says why in its ``strata.champion_gate`` tag.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, requires
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import yaml
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import refuse_code
from pipeline.errors import ConfigError

log = logging.getLogger("strata")
CARD_FORMAT = "strata-model/2"
CARD_FILE = "continual_model.json"
CARD_DATA = f"data/{CARD_FILE}"  # where mlflow.pyfunc.save_model(data_path=card) puts it
LATEST_ALIAS = "latest-task"
CHAMPION_ALIAS = "champion"
ACCURACY_TAG = "strata.accuracy"  # {task id: accuracy} of the version, on every task it has learned
GATE_TAG = "strata.champion_gate"


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
    records_sha256: list[str]  # the store records it is made of, one per memory version
    weights_sha256: dict[str, str]  # every local file the backbone is built from (path -> sha256), checked before it is read
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
            card = cls(**data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: not a strata model card ({exc})") from None
        if len(card.records_sha256) != card.memory_version:
            raise ConfigError(f"{origin}: pins {len(card.records_sha256)} records for memory_version {card.memory_version}")
        return card


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


def _pyfunc_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "pred"), ColSpec("string", "pred_class"), ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec("task", "string", None)]),
    )


def _requirements() -> list[str]:
    """strata's own runtime requirements: loading the pyfunc needs strata installed beside them."""
    try:
        return [r for r in requires("strata") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


def register_version(tracking_uri: str, run_id: str, name: str, card: ModelCard, tags: dict[str, str], loader_module: str) -> str:
    """Log ``card`` to the run as a pyfunc model loaded by the installed ``loader_module`` and
    register it as the next version of model ``name``; returns the version. Idempotent: a version
    this run registered for the same record is returned as it is."""
    import mlflow.pyfunc

    client = MlflowClient(tracking_uri)
    existing = _existing_version(client, run_id, name, tags)
    if existing is not None:
        return existing
    artifact_path = f"continual_model/v{card.memory_version:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(card.to_json())
        model_dir = Path(tmp) / "model"
        with warnings.catch_warnings():  # an input example would be an image MLflow runs the model on at every registration
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                loader_module=loader_module,
                data_path=str(path),
                signature=_pyfunc_signature(),
                pip_requirements=_requirements(),
            )
        client.log_artifacts(run_id, str(model_dir), artifact_path)
    try:
        client.create_registered_model(name, description="strata continual model: a frozen backbone plus a memory store")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def gate(champion: Mapping[str, float], candidate: Mapping[str, float], tolerance: float) -> tuple[bool, str]:
    """Does ``candidate`` (task id -> accuracy in [0, 1]) keep the champion's tasks within
    ``tolerance`` accuracy points of the champion's own mean on them? And why, in one line."""
    tasks = list(champion)
    if not tasks:
        return True, "passed: the champion has no recorded accuracy to compare with"
    missing = [t for t in tasks if t not in candidate]
    if missing:
        return False, f"failed: no accuracy on the champion's task(s) {', '.join(missing)}"
    old, new = _mean([champion[t] for t in tasks]), _mean([candidate[t] for t in tasks])
    verdict = "passed" if new >= old - tolerance / 100 - 1e-12 else "failed"
    return verdict == "passed", (
        f"{verdict}: mean accuracy on the champion's {len(tasks)} task(s) {100 * new:.2f} vs {100 * old:.2f} "
        f"(tolerance {tolerance:g} points)"
    )


def promote(tracking_uri: str, name: str, version: str, accuracy: Mapping[str, float], tolerance: float) -> bool:
    """Point ``@latest-task`` at ``version``, and ``@champion`` too when it passes the gate
    against the current champion (a first version always does). Returns whether it is champion."""
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(name, LATEST_ALIAS, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == version:
        return True
    if champion is None:
        passed, why = True, "passed: the first version"
    else:
        passed, why = gate(json.loads(champion.tags.get(ACCURACY_TAG, "{}")), accuracy, tolerance)
        why += f" of version {champion.version}"
    client.set_model_version_tag(name, version, GATE_TAG, why)
    if passed:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    log.info("model %s version %s: champion gate %s", name, version, why)
    return passed


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
    """The version ``spec`` names, with its card: NAME/VERSION, NAME@ALIAS, or NAME for its
    ``@champion`` (the newest version in a registry from before champions)."""
    client = MlflowClient(tracking_uri)
    name, version, alias = _parse_spec(spec)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            mv = _champion_or_newest(client, name, spec, tracking_uri)
    except MlflowException as exc:
        raise ConfigError(f"--model {spec}: {exc.message.splitlines()[0]} ({tracking_uri})") from None
    card = ModelCard.from_json(_card_text(mv.source, tracking_uri), f"{name}/{mv.version} {CARD_DATA}")
    return RegisteredVersion(name, str(mv.version), mv.run_id, dict(mv.tags), card)


def _champion_or_newest(client: MlflowClient, name: str, spec: str, tracking_uri: str) -> Any:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ConfigError(f"--model {spec}: no registered model {name!r} in {tracking_uri}")
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return max(versions, key=lambda v: int(v.version))


def _card_text(source: str, tracking_uri: str) -> str:
    """The card of a version: its pyfunc model's data file (read as data, never run)."""
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{CARD_DATA}", dst_path=tmp, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError):
            raise ConfigError(f"{source}: holds no {CARD_DATA}") from None
        return Path(local).read_text()


# What a registered version's directory holds: the pyfunc's metadata, its environment files, the
# card, and the name and version MLflow writes beside a model it downloads from the registry.
MODEL_FILES = frozenset({"MLmodel", CARD_DATA, "conda.yaml", "python_env.yaml", "requirements.txt", "registered_model_meta"})
PYFUNC_KEYS = frozenset({"loader_module", "data", "env", "python_version", "streamable"})


def download_model(model_uri: str, dst: str, tracking_uri: str | None = None) -> Path:
    """A registered version's model directory (``models:/NAME@ALIAS``, ``runs:/``, a path), copied into ``dst``."""
    with _no_progress_bar():
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst, tracking_uri=tracking_uri))
        except MlflowException as exc:
            raise ConfigError(f"{model_uri}: {exc.message.splitlines()[0]}") from None


def verify_model_dir(path: Path, loader_module: str, origin: str) -> None:
    """Refuse a model directory that is not exactly what ``register_version`` writes: the pyfunc
    flavor alone, loaded by ``loader_module`` from the installed package, its data the card, and
    no other file (no code directory, no pickled model, no other flavor to load it through)."""
    try:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{origin}: no readable MLmodel ({exc.__class__.__name__})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict) or set(flavors) != {"python_function"}:
        raise ConfigError(f"{origin}: MLmodel has flavors {sorted(flavors or {})}; a strata version has python_function only")
    if pyfunc.get("loader_module") != loader_module or pyfunc.get("data") != CARD_DATA:
        raise ConfigError(
            f"{origin}: MLmodel loads {pyfunc.get('loader_module')!r} with {pyfunc.get('data')!r}; "
            f"a strata version loads {loader_module!r} with {CARD_DATA!r}"
        )
    extra = sorted(k for k, v in pyfunc.items() if k not in PYFUNC_KEYS and v is not None)
    if extra:
        raise ConfigError(f"{origin}: MLmodel's python_function has {', '.join(extra)}, which a strata version never has")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    unknown = [f for f in files if f not in MODEL_FILES]
    if unknown:
        raise ConfigError(f"{origin}: holds {', '.join(unknown[:5])}, which a strata version never holds")


def champion_lag(tracking_uri: str, champion: RegisteredVersion) -> str | None:
    """One line when newer versions than ``champion`` exist (they failed the gate); else None."""
    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{champion.name}'")
    newest = max(versions, key=lambda v: int(v.version))
    if int(newest.version) <= int(champion.version):
        return None
    why = newest.tags.get(GATE_TAG, "no gate verdict")
    return (
        f"{champion.name}@{CHAMPION_ALIAS} is version {champion.version} ({len(champion.card.tasks)} tasks); the newest, "
        f"version {newest.version} (@{LATEST_ALIAS}), is not champion: {why}"
    )


def latest_version(tracking_uri: str, name: str) -> RegisteredVersion | None:
    """The newest version of ``name``; None while it has none (or does not exist yet)."""
    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    if not versions:
        return None
    return load_version(tracking_uri, f"{name}/{max(int(v.version) for v in versions)}")
