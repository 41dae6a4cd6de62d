"""Retraining when new data lands: learn each complete landed task once, in arrival order.

The continual model is the one its config describes (backbone, method, memory store); its
stream is the sequence of landed tasks learned so far, kept in the ledger in the memory store.
A new task is learned by the ordinary run of that stream plus the task with ``memory.resume``:
the earlier tasks are restored from the store, not trained again, and evaluated again, so the
new version's accuracy row covers every task. Every task registers a model version.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import StrataConfig, validate_config, with_absolute_paths
from pipeline.errors import ConfigError, StoreError
from pipeline.memory import Ledger, MemoryStore
from pipeline.memory.ledger import DEFAULT_LEASE_S, LeaseLost
from pipeline.ops.landing import scan
from pipeline.tracking import resolve_tracking_uri
from pipeline.serve import latest_version
from pipeline.run import run

log = logging.getLogger("strata")


@dataclass
class RetrainReport:
    trained: list[dict[str, Any]] = field(default_factory=list)  # ledger records written by this call
    learned_before: list[str] = field(default_factory=list)  # complete tasks already in the ledger
    incomplete: list[str] = field(default_factory=list)  # folders without _READY
    busy: str | None = None  # a task claimed by another retrainer (this call stopped there)
    busy_reason: str | None = None  # who holds it, until when

    @property
    def stalled(self) -> bool:
        """Whether this call stopped at a task another retrainer holds: the model did not advance
        past it, which a scheduler must hear about (``strata retrain`` exits 3)."""
        return self.busy is not None


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _model_config(cfg: StrataConfig, model: str) -> StrataConfig:
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled: retraining registers every task in MLflow's model registry; it must be true")
    absolute = with_absolute_paths(cfg)
    data = absolute.model_dump(mode="json")
    data["tracking"] |= {"uri": resolve_tracking_uri(cfg.tracking), "model_name": model}
    data["memory"] = {"uri": absolute.memory_uri, "resume": True}
    return validate_config(data, "retrain config")


def _check_position(cfg: StrataConfig, model: str, learned: list[dict[str, Any]]) -> None:
    """The latest registered version must be the ledger's last one: retraining continues it."""
    latest = latest_version(cfg.tracking.uri or "", model)
    expected = learned[-1]["model_version"] if learned else None
    if latest is None and expected is None:
        return
    if latest is None or latest.version != expected or latest.card.memory_store != cfg.memory_uri:
        found = f"version {latest.version} on {latest.card.memory_store}" if latest else "no version"
        raise StoreError(
            f"{cfg.memory_uri}: its ledger ends at {model} version {expected}, but the registry's latest is {found}; "
            "retrain continues only the latest registered version"
        )


def retrain(
    cfg: StrataConfig,
    landing: str,
    model: str,
    *,
    owner: str | None = None,
    max_tasks: int | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> RetrainReport:
    """Learn the complete landed tasks the ledger does not hold yet, oldest first. Each task is
    claimed with a lease of ``lease_s`` seconds, renewed while it trains; a claim whose retrainer
    died is taken over once its lease has expired."""
    cfg = _model_config(cfg, model)
    owner = owner or default_owner()
    ledger, store = Ledger(cfg.memory_uri, lease_s=lease_s), MemoryStore(cfg.memory_uri)
    complete, incomplete = scan(landing)
    report = RetrainReport(incomplete=incomplete)
    done_ids = {r["task_id"] for r in ledger.learned()}
    for landed in complete:
        task = landed.task
        if task.id in done_ids:
            report.learned_before.append(task.id)
            continue
        if max_tasks is not None and len(report.trained) >= max_tasks:
            break
        if not ledger.claim(task.id, owner):
            holder = ledger.claim_of(task.id) or {}
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("expires", 0)))
            report.busy = task.id
            report.busy_reason = (
                f"task {task.id} is claimed by {holder.get('owner')} (lease until {until}); tasks are learned in order"
            )
            log.info("%s", report.busy_reason)
            break
        try:
            with ledger.hold(task.id, owner):
                learned = ledger.learned()  # as of the claim: what other retrainers finished meanwhile counts
                _check_position(cfg, model, learned)
                if store.version > len(learned):  # records of an attempt that failed after writing; the ledger decides
                    store.truncate(len(learned))
                record = _learn(cfg, landing, landed.folder, task.model_dump(mode="json"), learned, owner)
        except LeaseLost:
            raise  # the claim is someone else's now: not ours to release
        except BaseException:
            ledger.release(task.id)
            raise
        ledger.complete(task.id, record)
        report.trained.append({"task_id": task.id, **record})
    return report


def _learn(
    cfg: StrataConfig, landing: str, folder: str, task: dict[str, Any], learned: list[dict[str, Any]], owner: str
) -> dict[str, Any]:
    position = len(learned)
    data = cfg.model_dump(mode="json")
    data["stream"] = {"scenario": cfg.stream.scenario, "tasks": [r["task"] for r in learned] + [task]}
    data["output_dir"] = f"{cfg.output_dir.rstrip('/')}/{position:04d}-{task['id']}"
    data["tracking"]["run_name"] = f"retrain {cfg.tracking.model_name}: {task['id']}"
    started = time.time()
    summary = run(
        validate_config(data, f"{folder} as task {position} of {cfg.tracking.model_name}"),
        tracking_tags={"strata.retrain.task": task["id"], "strata.retrain.landing": landing, "strata.retrain.owner": owner},
        prior_accuracy=[r["accuracy_row"] for r in learned],
    )
    return {
        "position": position,
        "folder": folder,
        "task": task,
        "accuracy_row": summary.accuracy_matrix[position],
        "model_version": summary.model_versions[position],
        "memory_version": position + 1,
        "mlflow_run_id": summary.mlflow_run_id,
        "owner": owner,
        "learned_at": time.time(),
        "wall_s": time.time() - started,
    }


def watch(
    cfg: StrataConfig,
    landing: str,
    model: str,
    *,
    interval_s: float,
    iterations: int | None = None,
    on_report: Callable[[RetrainReport], None] | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> None:
    """``retrain`` every ``interval_s`` seconds (``iterations`` times, or forever)."""
    owner = default_owner()
    done = 0
    while iterations is None or done < iterations:
        report = retrain(cfg, landing, model, owner=owner, lease_s=lease_s)
        if on_report:
            on_report(report)
        done += 1
        if iterations is None or done < iterations:
            time.sleep(interval_s)
