"""The Ray Train worker loop: every task of the stream in one ``TorchTrainer.fit``.

Per phase (one task, or every task at once for a joint method): train the method's adapters
on this worker's shard, let the method reduce its statistics, have rank 0 append the task
record to the memory store, evaluate every seen task's test set, report a checkpoint of the
stream's progress. A restarted worker group resumes at the first unfinished phase from that
checkpoint plus the memory store.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.execution import context as train_context

from pipeline.backbones import Backbone, create_backbone
from pipeline import jsonout
from pipeline.config import StrataConfig
from pipeline.data.stream import StreamPlan
from pipeline.eval.evaluate import candidate_classes, evaluate_inferred, evaluate_task, reduce_eval_stats
from pipeline.memory import MemoryStore
from pipeline.methods import Batch, MethodParams, TaskInfo, create_method
from pipeline.tracking import ModelCard, TrackedRun, register_version
from pipeline.train.collective import current_collective
from pipeline.train.loop import broadcast_parameters, train_phase

log = logging.getLogger("strata")
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class Phase:
    tasks: tuple[int, ...]  # whose training data this phase consumes
    row: int  # the accuracy-matrix row it fills


def make_phases(num_tasks: int, joint: bool) -> tuple[Phase, ...]:
    if joint:
        return (Phase(tuple(range(num_tasks)), num_tasks - 1),)
    return tuple(Phase((i,), i) for i in range(num_tasks))


@dataclass(frozen=True)
class WorkerJob:
    cfg: StrataConfig
    method: MethodParams
    plan: StreamPlan
    phases: tuple[Phase, ...]
    start: Progress  # where the stream starts when there is no checkpoint yet (later than 0 with memory.resume)
    tracking_uri: str | None = None
    run_id: str | None = None


@dataclass
class Progress:
    """The stream's position and results so far; the checkpoint of a run."""

    num_tasks: int
    phases_done: int = 0
    records: int = 0
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    samples_seen: list[int] = field(default_factory=list)  # by this run (0 for tasks learned by an earlier run)
    train_loss: list[float | None] = field(default_factory=list)
    phase_wall_s: list[float] = field(default_factory=list)  # of each phase this run trained
    train_wall_s: list[float] = field(default_factory=list)  # of each phase: the pass and end_task, no evaluation
    model_versions: list[str | None] = field(default_factory=list)  # registered after each task (tracking.model_name)
    steps: list[int | None] = field(default_factory=list)  # optimizer steps of each phase this run trained
    task_stats: list[dict[str, Any] | None] = field(default_factory=list)  # Method.task_stats() after each phase
    eval_stats: dict[str, list[list[float | None]]] = field(default_factory=dict)  # Method.take_eval_stats(), by name
    # Methods that infer tasks (til methods with task_inference): the same rows without task ids.
    cil_accuracy_matrix: list[list[float | None]] | None = None
    task_inference_matrix: list[list[float | None]] | None = None

    def __post_init__(self) -> None:
        t = self.num_tasks
        self.accuracy_matrix = self.accuracy_matrix or [[None] * t for _ in range(t)]
        self.samples_seen = self.samples_seen or [0] * t
        self.train_loss = self.train_loss or [None] * t
        self.model_versions = self.model_versions or [None] * t
        self.steps = self.steps or [None] * t
        self.task_stats = self.task_stats or [None] * t

    def record_eval_stats(self, row: int, column: int, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            matrix = self.eval_stats.setdefault(name, [[None] * self.num_tasks for _ in range(self.num_tasks)])
            matrix[row][column] = value

    @classmethod
    def resumed(cls, num_tasks: int, learned: int, prior_accuracy: Sequence[Sequence[float | None]] = ()) -> Progress:
        """The start of a stream whose first ``learned`` tasks an earlier run put in the memory store."""
        progress = cls(num_tasks, phases_done=learned, records=learned)
        for i, row in enumerate(prior_accuracy[:learned]):
            progress.accuracy_matrix[i][: len(row)] = list(row)[:num_tasks]
        return progress

    @classmethod
    def from_checkpoint(cls, checkpoint: ray.train.Checkpoint | None, start: Progress) -> Progress:
        if checkpoint is None:
            return start
        with checkpoint.as_directory() as path:
            return cls(**json.loads((Path(path) / PROGRESS_FILE).read_text()))

    def write(self, directory: Path) -> None:
        (directory / PROGRESS_FILE).write_text(jsonout.dumps(asdict(self)))


def phase_task_info(plan: StreamPlan, phase: Phase) -> TaskInfo:
    last = max(phase.tasks)
    tasks = [plan.tasks[i] for i in phase.tasks]
    num_seen = plan.num_seen(last)
    return TaskInfo(
        index=phase.row,
        id=tasks[0].id if len(tasks) == 1 else "joint",
        classes=tuple(sorted({c for t in tasks for c in t.classes})),
        num_seen_classes=num_seen,
        class_names=plan.class_names[:num_seen],
        domain=tasks[0].domain if len(tasks) == 1 else None,
    )


def model_card(cfg: StrataConfig, plan: StreamPlan, row: int, records: int, backbone: Backbone, label_space: str) -> ModelCard:
    """The registry card of the model after the task that fills accuracy row ``row``."""
    num_seen = plan.num_seen(row)
    return ModelCard(
        config=cfg.model_dump(mode="json"),
        backbone_id=backbone.backbone_id,
        memory_store=cfg.memory_uri,
        memory_version=records,
        scenario=plan.scenario,
        label_space=label_space,
        image_size=cfg.data.image_size or backbone.input_spec.size,
        tasks=[{"id": t.id, "classes": list(t.classes), "domain": t.domain} for t in plan.tasks[: row + 1]],
        class_names=list(plan.class_names[:num_seen]),
    )


def card_tags(card: ModelCard) -> dict[str, str]:
    return {
        "strata.stream_position": str(len(card.tasks)),
        "strata.task_id": card.tasks[-1]["id"],
        "strata.method": card.config["method"]["name"],
        "strata.backbone_id": card.backbone_id,
        "strata.memory_store": card.memory_store,
        "strata.memory_version": str(card.memory_version),
    }


def flat_stats(stats: dict[str, Any]) -> dict[str, float]:
    """A method's task stats as MLflow metrics: scalars as they are, lists as ``name/i``."""
    flat: dict[str, float] = {}
    for name, value in stats.items():
        if isinstance(value, list | tuple):
            flat |= {f"{name}/{i}": float(v) for i, v in enumerate(value)}
        else:
            flat[name] = float(value)
    return flat


def train_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int, device: torch.device) -> Iterator[Batch]:
    """This worker's batches of a task: rows mixed through a seeded local shuffle buffer, so a
    label-sorted source still gives batches of many classes. Batches may come short mid-stream;
    the lockstep loop (``train.loop``) weights every sample exactly, whatever the batch sizes."""
    if shuffle_buffer <= 0:
        return shard.iter_torch_batches(batch_size=batch_size, device=device)
    return shard.iter_torch_batches(
        batch_size=batch_size, device=device, local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed
    )


def _setup_logging() -> None:
    # Ray 2.60 names this logger by file path, so RunConfig's LoggingConfig misses it; its
    # "Reporting training result" line per report per rank drowns the progress lines.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[strata] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def train_loop_per_worker(config: dict) -> None:
    job: WorkerJob = config["job"]
    cfg, plan = job.cfg, job.plan
    num_tasks = len(plan.tasks)
    _setup_logging()
    collective = current_collective()
    rank, world = collective.rank, collective.world_size
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone).to(device)
    method = create_method(job.method, backbone, collective)
    store = MemoryStore(cfg.memory_uri)
    progress = Progress.from_checkpoint(ray.train.get_checkpoint(), job.start)
    if rank == 0:
        store.truncate(progress.records)
    collective.all_reduce_(torch.zeros(1, device=device))  # nobody reads the store before the rollback
    method.restore(store.load_all(backbone_id=backbone.backbone_id, upto=progress.records))
    run = TrackedRun(job.tracking_uri, job.run_id) if rank == 0 and job.run_id and job.tracking_uri else None
    label_space = cfg.eval.label_space
    if label_space == "auto":
        label_space = "task" if plan.scenario in ("til", "dcil") else "seen"
    local_batch = max(1, cfg.train.batch_size // max(world, 1))
    eval_batch = max(1, cfg.eval.batch_size // max(world, 1))

    def prepare(batch: Batch) -> Batch:
        return {**batch, "image": backbone.normalize(batch["image"])}

    for phase_index in range(progress.phases_done, len(job.phases)):
        started = time.perf_counter()
        phase = job.phases[phase_index]
        info = phase_task_info(plan, phase)
        label = f"task {phase.row + 1}/{num_tasks} '{info.id}'"
        num_samples = sum(plan.tasks[i].train.num_samples for i in phase.tasks)
        if rank == 0:
            log.info("%s | training on %d samples, %d classes seen", label, num_samples, info.num_seen_classes)
        method.begin_task(info)
        broadcast_parameters(method.trainable_parameters(), collective)
        shard = ray.train.get_dataset_shard(f"train_{phase_index}")

        def batches(shard=shard, phase_index=phase_index):  # a method with nothing to learn does not read its data
            if not method.consumes_data:
                return iter(())
            return (prepare(b) for b in train_batches(shard, local_batch, cfg.data.shuffle_buffer, cfg.seed * 1000 + phase_index * 16 + rank, device))

        stats = train_phase(
            method,
            batches,
            passes=cfg.train.passes,
            num_tasks=num_tasks,
            num_samples=num_samples,
            global_batch_size=local_batch * max(world, 1),
            amp=cfg.train.amp,
            log_every=cfg.train.log_every,
            label=label,
        )
        record = method.end_task()
        progress.task_stats[phase.row] = method.task_stats() or None
        progress.steps[phase.row] = stats.steps if method.trainable_parameters() else None
        progress.train_wall_s.append(time.perf_counter() - started)
        if rank == 0:
            store.append(record, task_index=phase.row, task_id=info.id, method=method.name, backbone_id=backbone.backbone_id)
        row = progress.accuracy_matrix[phase.row]
        evaluated = range(num_tasks if method.zero_shot else phase.row + 1)  # zero-shot: future tasks too
        for j in evaluated:
            test = ray.train.get_dataset_shard(f"test_{j}")
            candidates = candidate_classes(label_space, plan.tasks[j].classes, info.num_seen_classes)
            row[j] = evaluate_task(
                method,
                test.iter_torch_batches(batch_size=eval_batch, device=device),
                candidates=candidates,
                candidate_names=[plan.class_names[c] for c in candidates],
                task_index=j,
                task_aware=plan.scenario == "til",
                prepare=prepare,
            )
            progress.record_eval_stats(phase.row, j, reduce_eval_stats(method))
        if getattr(method, "infers_tasks", False):
            if progress.cil_accuracy_matrix is None or progress.task_inference_matrix is None:
                progress.cil_accuracy_matrix = [[None] * num_tasks for _ in range(num_tasks)]
                progress.task_inference_matrix = [[None] * num_tasks for _ in range(num_tasks)]
            seen = list(range(info.num_seen_classes))
            for j in range(phase.row + 1):
                test = ray.train.get_dataset_shard(f"test_{j}")
                cil, inferred = evaluate_inferred(
                    method,
                    test.iter_torch_batches(batch_size=eval_batch, device=device),
                    candidates=seen,
                    candidate_names=list(info.class_names),
                    task_index=j,
                    prepare=prepare,
                )
                progress.cil_accuracy_matrix[phase.row][j] = cil
                progress.task_inference_matrix[phase.row][j] = inferred
        for i in phase.tasks:
            progress.samples_seen[i] = stats.samples_per_task[i]
        progress.train_loss[phase.row] = stats.mean_loss
        progress.phases_done = phase_index + 1
        progress.records += 1
        progress.phase_wall_s.append(time.perf_counter() - started)
        seen_acc = sum(v for v in row[: phase.row + 1] if v is not None) / (phase.row + 1)
        filled = [r for r in progress.accuracy_matrix[: phase.row + 1] if r[0] is not None]
        running_avg = sum(sum(r[: i + 1]) / (i + 1) for i, r in enumerate(progress.accuracy_matrix[: phase.row + 1]) if r[0] is not None)
        metrics = {
            "avg_seen_acc": seen_acc,  # what last_acc will be if the stream ends here
            "running_avg_acc": running_avg / len(filled),  # what avg_acc will be if the stream ends here
            "train_loss": stats.mean_loss,
            "samples": float(sum(stats.samples_per_task)),
        }
        metrics |= {f"acc/task_{j}": row[j] for j in evaluated}
        metrics |= flat_stats(progress.task_stats[phase.row] or {})
        if rank == 0:
            loss = "-" if stats.mean_loss is None else f"{stats.mean_loss:.4f}"
            log.info(
                "%s | %d samples | loss %s | accuracy on seen tasks %.4f [%s] | %.1fs",
                label, sum(stats.samples_per_task), loss, seen_acc,
                " ".join(f"{v:.3f}" for v in row[: phase.row + 1]), progress.phase_wall_s[-1],
            )  # fmt: skip
            if run is not None:
                run.log_metrics(metrics, step=phase.row)
                if cfg.tracking.model_name:
                    card = model_card(cfg, plan, phase.row, progress.records, backbone, label_space)
                    tags = {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if v is not None}
                    progress.model_versions[phase.row] = register_version(
                        run.tracking_uri, run.run_id, cfg.tracking.model_name, card, card_tags(card) | tags
                    )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                progress.write(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"task_index": phase.row, **{k: v for k, v in metrics.items() if v is not None}}, checkpoint=checkpoint)
