"""What a run reports: summary.json, the memory manifest, the accuracy matrix (CSV, heatmap),
and the same in the MLflow run with the final metrics."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline import jsonout
from pipeline.config import StrataConfig
from pipeline.data.stream import StreamPlan
from pipeline.eval import metrics
from pipeline.eval.report import write_heatmap, write_matrix_csv
from pipeline.memory import MemoryStore
from pipeline.run.outputs import OutputDir
from pipeline.tracking import TrackedRun
from pipeline.train.progress import Progress


Matrix = list[list[float | None]]


class EvalStatSummary(BaseModel):
    """A statistic a method reports while scoring (DIKI's gate), per test set like the accuracy
    matrix, and its means over learned (j <= i) and not yet learned (j > i) tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    matrix: Matrix
    learned_mean: float | None
    unlearned_mean: float | None

    @classmethod
    def of(cls, matrix: Matrix) -> EvalStatSummary:
        learned = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None and j <= i]
        future = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None and j > i]
        return cls(
            matrix=matrix,
            learned_mean=sum(learned) / len(learned) if learned else None,
            unlearned_mean=sum(future) / len(future) if future else None,
        )


class TaskInferenceSummary(BaseModel):
    """For til methods that also infer tasks: the accuracy with the task inferred, and how often
    the task itself was inferred right."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cil_accuracy_matrix: Matrix
    cil_avg_acc: float | None
    cil_last_acc: float | None
    task_inference_matrix: Matrix
    task_inference_acc: float | None


class RunSummary(BaseModel):
    """What a run reports, once: ``to_json`` is summary.json (the contract docs/architecture.md
    gives under "summary.json"), ``final_metrics`` what MLflow gets at the end, and the CLI prints
    its table from the same object. ``from_json`` reads a summary.json back."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: list[str]
    accuracy_matrix: Matrix
    scored_rows: list[int]  # the rows the metrics read (eval.every); the others stay null
    avg_acc: float | None
    last_acc: float | None
    forgetting: float | None
    bwt: float | None
    transfer: float | None
    mtil_average: float | None
    transfer_per_task: list[float | None] | None  # None where the upper triangle is not evaluated
    samples_seen: list[int]
    memory_bytes: list[int | None]
    memory_store: str
    wall_s: float
    mlflow_run_id: str | None
    config: dict[str, Any]
    method: str
    scenario: str
    backbone_id: str | None
    class_names: list[str]
    train_loss: list[float | None]
    phase_wall_s: list[float]
    train_wall_s: list[float]
    model_name: str | None
    model_versions: list[str | None]
    steps: list[int | None]
    resumes: int  # worker-group starts from a checkpoint (restarts after failures, continued runs)
    task_stats: list[dict[str, Any] | None]
    eval_stats: dict[str, EvalStatSummary] = {}  # in summary.json as NAME_matrix, NAME_learned_mean, NAME_unlearned_mean
    task_inference: TaskInferenceSummary | None = None  # in summary.json as its fields, at the top level

    @classmethod
    def build(
        cls, cfg: StrataConfig, plan: StreamPlan, progress: Progress, store: MemoryStore, run: TrackedRun | None, wall_s: float
    ) -> RunSummary:
        matrix = progress.accuracy_matrix
        every = cfg.eval.every
        rows = metrics.scored_rows(len(plan.tasks), every)
        read = None if every == 1 else rows
        memory_bytes: list[int | None] = [None] * len(plan.tasks)
        backbone_id = None
        for entry in store.entries():
            memory_bytes[entry.task_index] = entry.memory_bytes
            backbone_id = entry.backbone_id
        return cls(
            tasks=[t.id for t in plan.tasks], accuracy_matrix=matrix, scored_rows=rows, **metrics.summarize(matrix, read),
            transfer_per_task=metrics.transfer_per_task(matrix, read), samples_seen=progress.samples_seen,
            memory_bytes=memory_bytes, memory_store=store.uri, wall_s=wall_s, mlflow_run_id=run.run_id if run else None,
            config=cfg.model_dump(mode="json"), method=cfg.method.name, scenario=plan.scenario, backbone_id=backbone_id,
            class_names=list(plan.class_names), train_loss=progress.train_loss, phase_wall_s=progress.phase_wall_s,
            train_wall_s=progress.train_wall_s, model_name=cfg.tracking.model_name, model_versions=progress.model_versions,
            steps=progress.steps, resumes=progress.resumes, task_stats=progress.task_stats,
            eval_stats={name: EvalStatSummary.of(m) for name, m in progress.eval_stats.items()},
            task_inference=_task_inference(progress, read),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """summary.json's fields: the eval stats and the task-inference fields flat at the top level."""
        data = self.model_dump(mode="json", exclude={"eval_stats", "task_inference"})
        for name, stat in self.eval_stats.items():
            data |= {f"{name}_{key}": value for key, value in stat.model_dump(mode="json").items()}
        if self.task_inference is not None:
            data |= self.task_inference.model_dump(mode="json")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        fields = dict(data)
        names = [k.removesuffix("_learned_mean") for k in data if k.endswith("_learned_mean")]
        stats = {n: EvalStatSummary(**{key: fields.pop(f"{n}_{key}") for key in EvalStatSummary.model_fields}) for n in names}
        inference = (
            TaskInferenceSummary(**{key: fields.pop(key) for key in TaskInferenceSummary.model_fields})
            if "task_inference_matrix" in fields
            else None
        )
        return cls(**fields, eval_stats=stats, task_inference=inference)

    def headline(self) -> dict[str, float | str | None]:
        """The line a sweep's report and a job's last output give of the run."""
        return {k: getattr(self, k) for k in ("avg_acc", "last_acc", "forgetting", "bwt", "mlflow_run_id")}

    def final_metrics(self) -> dict[str, float | None]:
        """The run's metrics for MLflow at its end (per-task metrics were logged as tasks finished)."""
        out = {k: getattr(self, k) for k in ("avg_acc", "last_acc", "forgetting", "bwt", "transfer", "mtil_average", "wall_s")}
        out |= {
            "cil_last_acc": self.task_inference.cil_last_acc if self.task_inference else None,
            "task_inference_acc": self.task_inference.task_inference_acc if self.task_inference else None,
        }
        for name, stat in self.eval_stats.items():
            out |= {f"{name}_learned_mean": stat.learned_mean, f"{name}_unlearned_mean": stat.unlearned_mean}
        return out


def _task_inference(progress: Progress, rows: list[int] | None) -> TaskInferenceSummary | None:
    if progress.cil_accuracy_matrix is None or progress.task_inference_matrix is None:
        return None
    cil = metrics.summarize(progress.cil_accuracy_matrix, rows)
    return TaskInferenceSummary(
        cil_accuracy_matrix=progress.cil_accuracy_matrix,
        cil_avg_acc=cil["avg_acc"],
        cil_last_acc=cil["last_acc"],
        task_inference_matrix=progress.task_inference_matrix,
        task_inference_acc=metrics.last_acc(progress.task_inference_matrix),
    )


def write_outputs(summary: RunSummary, store: MemoryStore, out: OutputDir, run_: TrackedRun | None) -> None:
    """summary.json, the memory manifest and the accuracy matrix (CSV, heatmap) in OUTPUT_DIR and,
    with tracking, in the MLflow run with the final metrics."""
    out.write_text("summary.json", jsonout.dumps(summary.to_json(), indent=2))
    out.write_text("memory_manifest.json", json.dumps([e.to_dict() for e in store.entries()], indent=1))
    write_matrix_csv(out.local / "accuracy_matrix.csv", summary.tasks, summary.accuracy_matrix)
    write_heatmap(
        out.local / "accuracy_matrix.png", summary.tasks, summary.accuracy_matrix, f"{summary.method} on {summary.scenario}"
    )
    out.publish("accuracy_matrix.csv")
    out.publish("accuracy_matrix.png")
    if run_:
        run_.log_metrics(summary.final_metrics())
        for name in ("summary.json", "accuracy_matrix.csv", "accuracy_matrix.png", "memory_manifest.json"):
            run_.log_artifact(out.local / name)
