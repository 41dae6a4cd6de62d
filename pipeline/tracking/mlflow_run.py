"""MLflow tracking with an explicit tracking URI, from the driver and from rank 0.

Ray's MLflow callbacks don't fit Train V2, so strata talks to MLflow's client directly: the
driver creates the run and logs params and artifacts; rank 0 logs per-task metrics to the same
run id. With no URI configured, runs land in ``sqlite:///<cwd>/mlflow.db`` (MLflow 3's own
default, made absolute so workers in other directories write to the same file).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig

MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested config -> dotted keys with string values (MLflow params)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(data, list) and any(isinstance(v, Mapping | list) for v in data):
        for i, value in enumerate(data):
            yield from flatten(value, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), str(data)[:MAX_PARAM_LENGTH]


class TrackedRun:
    """One MLflow run, addressed by (tracking URI, run id); cheap to recreate on a worker."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, cfg: TrackingConfig, tags: Mapping[str, str] | None = None) -> TrackedRun:
        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        run = client.create_run(experiment_id, run_name=cfg.run_name, tags=dict(tags or {}))
        return cls(uri, run.info.run_id)

    def log_params(self, config: Mapping[str, Any]) -> None:
        params = [Param(k, v) for k, v in flatten(config)]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, run_id: str, tasks_done: int) -> TrackedRun | None:
        """The run of an interrupted ``strata run``, RUNNING again; None if the store lost it."""
        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            return None
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "strata.continued_at_task", str(tasks_done))
        return cls(uri, run_id)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED (MLflow's RunStatus names)."""
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
