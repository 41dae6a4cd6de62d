"""Registry versions of the continual model, one per finished task, created idempotently.

A task's version is registered only after its checkpoint has been reported, and a worker group
that starts (after a restart, or in a continued run) first registers every finished task that
has none yet. ``register_version`` returns the existing version when this run already holds
one for the same store version and record checksum, so a retried task never creates a second.
Each version then gets ``@latest-task`` and, when it passes the regression gate against the
current champion on the accuracy it was evaluated with, ``@champion`` (both idempotent).
"""

from __future__ import annotations

import json

from pipeline.backbones import weight_files
from pipeline.config import StrataConfig
from pipeline.data.stream import StreamPlan
from pipeline.serve.pyfunc import LOADER_MODULE
from pipeline.memory import MemoryStore
from pipeline.tracking import TrackedRun
from pipeline.serve import ModelCard, promote, register_version
from pipeline.serve.registry import ACCURACY_TAG
from pipeline.train.progress import Phase, Progress, phase_metrics


def model_card(
    cfg: StrataConfig,
    plan: StreamPlan,
    row: int,
    records_sha256: list[str],
    backbone_id: str,
    image_size: int,
    label_space: str,
    weights: dict[str, str],
) -> ModelCard:
    """The registry card of the model after the task that fills accuracy row ``row``; it pins the
    checksums of the store records and of the backbone's local ``weights`` files it is made of.
    ``image_size`` is the side the workers decoded images to, so serving decodes them alike."""
    num_seen = plan.num_seen(row)
    return ModelCard(
        config=cfg.model_dump(mode="json"),
        backbone_id=backbone_id,
        memory_store=cfg.memory_uri,
        memory_version=len(records_sha256),
        scenario=plan.scenario,
        label_space=label_space,
        image_size=image_size,
        tasks=[{"id": t.id, "classes": list(t.classes), "domain": t.domain} for t in plan.tasks[: row + 1]],
        class_names=list(plan.class_names[:num_seen]),
        records_sha256=records_sha256,
        weights_sha256=weights,
    )


def card_tags(card: ModelCard) -> dict[str, str]:
    return {
        "strata.stream_position": str(len(card.tasks)),
        "strata.task_id": card.tasks[-1]["id"],
        "strata.method": card.config["method"]["name"],
        "strata.backbone_id": card.backbone_id,
        "strata.memory_store": card.memory_store,
        "strata.memory_version": str(card.memory_version),
        "strata.record_sha256": card.records_sha256[-1] if card.records_sha256 else "",
    }


def register_finished(
    run: TrackedRun,
    cfg: StrataConfig,
    plan: StreamPlan,
    phases: tuple[Phase, ...],
    progress: Progress,
    store: MemoryStore,
    backbone_id: str,
    image_size: int,
    label_space: str,
) -> None:
    """Register every finished phase of ``progress`` that has no version yet, and set its aliases
    (rank 0 only)."""
    name = cfg.tracking.model_name
    assert name
    shas = [entry.sha256 for entry in store.entries()]
    weights = weight_files(cfg.backbone)
    for p in range(progress.started_at, progress.phases_done):
        phase = phases[p]
        if progress.model_versions[phase.row] is not None:
            continue
        card = model_card(cfg, plan, phase.row, shas[: p + 1], backbone_id, image_size, label_space, weights)
        row = progress.accuracy_matrix[phase.row]
        accuracy = {plan.tasks[j].id: float(v) for j, v in enumerate(row[: phase.row + 1]) if v is not None}
        tags = card_tags(card) | {f"metric.{k}": f"{v:.6g}" for k, v in phase_metrics(progress, phase).items()}
        tags[ACCURACY_TAG] = json.dumps(accuracy)
        version = register_version(run.tracking_uri, run.run_id, name, card, tags, LOADER_MODULE)
        promote(run.tracking_uri, name, version, accuracy, cfg.tracking.champion_tolerance)
        progress.model_versions[phase.row] = version
