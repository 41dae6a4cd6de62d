"""What a run reports: summary.json, the memory manifest, the accuracy matrix (CSV, heatmap),
and the same in the MLflow run with the final metrics."""

from __future__ import annotations

import json
from typing import Any

from pipeline import jsonout
from pipeline.config import StrataConfig
from pipeline.data.stream import StreamPlan
from pipeline.eval import metrics
from pipeline.eval.report import write_heatmap, write_matrix_csv
from pipeline.memory import MemoryStore
from pipeline.run.outputs import OutputDir
from pipeline.tracking import TrackedRun
from pipeline.train.progress import Progress


def run_summary(
    cfg: StrataConfig, plan: StreamPlan, progress: Progress, store: MemoryStore, run: TrackedRun | None, wall_s: float
) -> dict[str, Any]:
    """summary.json's fields (the contract docs/architecture.md gives under "summary.json")."""
    matrix = progress.accuracy_matrix
    rows = metrics.scored_rows(len(plan.tasks), cfg.eval.every)
    memory_bytes: list[int | None] = [None] * len(plan.tasks)
    backbone_id = None
    for entry in store.entries():
        memory_bytes[entry.task_index] = entry.memory_bytes
        backbone_id = entry.backbone_id
    return {
        "tasks": [t.id for t in plan.tasks],
        "accuracy_matrix": matrix,
        "scored_rows": rows,  # the rows the metrics read (eval.every); the others stay null
        **metrics.summarize(matrix, None if cfg.eval.every == 1 else rows),
        "transfer_per_task": metrics.transfer_per_task(matrix, None if cfg.eval.every == 1 else rows),
        "samples_seen": progress.samples_seen,
        "memory_bytes": memory_bytes,
        "memory_store": store.uri,
        "wall_s": wall_s,
        "mlflow_run_id": run.run_id if run else None,
        "config": cfg.model_dump(mode="json"),
        "method": cfg.method.name,
        "scenario": plan.scenario,
        "backbone_id": backbone_id,
        "class_names": list(plan.class_names),
        "train_loss": progress.train_loss,
        "phase_wall_s": progress.phase_wall_s,
        "train_wall_s": progress.train_wall_s,
        "model_name": cfg.tracking.model_name,
        "model_versions": progress.model_versions,
        "steps": progress.steps,
        "resumes": progress.resumes,  # worker-group starts from a checkpoint (restarts after failures, continued runs)
        "task_stats": progress.task_stats,
        **_eval_stats_summary(progress),
        **_task_inference_summary(progress, None if cfg.eval.every == 1 else rows),
    }


def _eval_stats_summary(progress: Progress) -> dict[str, Any]:
    """Per-test-set means a method reports while scoring (DIKI's gate), as matrices like the
    accuracy matrix, plus their means over learned (j <= i) and not yet learned (j > i) tasks."""
    out: dict[str, Any] = {}
    for name, matrix in progress.eval_stats.items():
        learned = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None and j <= i]
        future = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None and j > i]
        out[f"{name}_matrix"] = matrix
        out[f"{name}_learned_mean"] = sum(learned) / len(learned) if learned else None
        out[f"{name}_unlearned_mean"] = sum(future) / len(future) if future else None
    return out


def _task_inference_summary(progress: Progress, rows: list[int] | None) -> dict[str, Any]:
    """For til methods that also infer tasks: cil accuracy (task inferred) and inference accuracy."""
    if progress.cil_accuracy_matrix is None or progress.task_inference_matrix is None:
        return {}
    cil = metrics.summarize(progress.cil_accuracy_matrix, rows)
    return {
        "cil_accuracy_matrix": progress.cil_accuracy_matrix,
        "cil_avg_acc": cil["avg_acc"],
        "cil_last_acc": cil["last_acc"],
        "task_inference_matrix": progress.task_inference_matrix,
        "task_inference_acc": metrics.last_acc(progress.task_inference_matrix),
    }


def write_outputs(
    cfg: StrataConfig, plan: StreamPlan, summary: dict[str, Any], store: MemoryStore, out: OutputDir, run_: TrackedRun | None
) -> None:
    """summary.json, the memory manifest and the accuracy matrix (CSV, heatmap) in OUTPUT_DIR and,
    with tracking, in the MLflow run with the final metrics."""
    out.write_text("summary.json", jsonout.dumps(summary, indent=2))
    out.write_text("memory_manifest.json", json.dumps([e.to_dict() for e in store.entries()], indent=1))
    write_matrix_csv(out.local / "accuracy_matrix.csv", summary["tasks"], summary["accuracy_matrix"])
    write_heatmap(
        out.local / "accuracy_matrix.png", summary["tasks"], summary["accuracy_matrix"], f"{cfg.method.name} on {plan.scenario}"
    )
    out.publish("accuracy_matrix.csv")
    out.publish("accuracy_matrix.png")
    if run_:
        final = (
            "avg_acc",
            "last_acc",
            "forgetting",
            "bwt",
            "transfer",
            "mtil_average",
            "wall_s",
            "cil_last_acc",
            "task_inference_acc",
        )
        final += tuple(k for k in summary if k.endswith(("_learned_mean", "_unlearned_mean")))
        run_.log_metrics({k: summary.get(k) for k in final})
        for name in ("summary.json", "accuracy_matrix.csv", "accuracy_matrix.png"):
            run_.log_artifact(out.local / name)
        run_.log_artifact(out.local / "memory_manifest.json")
