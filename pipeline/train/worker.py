"""The Ray Train worker loop: every task of the stream in one ``TorchTrainer.fit``.

Per phase (one task, or every task at once for a joint method): train the method's adapters
on this worker's shard, let the method reduce its statistics, have rank 0 append the task
record to the memory store, evaluate every seen task's test set, report a checkpoint of the
stream's progress. A restarted worker group resumes at the first unfinished phase from that
checkpoint plus the memory store.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.execution import context as train_context

from pipeline.backbones import create_backbone
from pipeline.config import StrataConfig
from pipeline.data.stream import StreamPlan, task_plan_record
from pipeline.eval.evaluate import candidate_classes, evaluate_inferred, evaluate_task, reduce_eval_stats
from pipeline.eval.metrics import scored_rows
from pipeline.memory import MemoryStore, TaskRecord
from pipeline.methods import Batch, MethodParams, TaskInfo, create_method
from pipeline.tracking import TrackedRun
from pipeline.data.ray_data import source_rows
from pipeline.train.checkpoint import CheckpointLocator, PhaseDataset, PhaseState, read_checkpoint
from pipeline.train.collective import current_collective
from pipeline.train.ingest import PhaseSplit, TestSets
from pipeline.train.live import ProgressPoster
from pipeline.train.loop import CheckpointPolicy, PhaseStats, StepSettings, broadcast_parameters, train_phase
from pipeline.train.progress import Phase, Progress, phase_metrics
from pipeline.train.registration import register_finished

log = logging.getLogger("strata")


@dataclass(frozen=True)
class WorkerJob:
    cfg: StrataConfig
    method: MethodParams
    plan: StreamPlan
    phases: tuple[Phase, ...]
    start: Progress  # where the stream starts when there is no checkpoint yet (later than 0 with memory.resume)
    checkpoints: CheckpointLocator
    tracking_uri: str | None = None
    run_id: str | None = None
    board: Any | None = None  # a live.ProgressBoard the driver reads, or None


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
        plans=tuple(tasks),
    )


def phase_dataset(job: WorkerJob, phase_index: int, size: int, world: int) -> PhaseDataset:
    """The phase's training rows, decoded to ``size`` pixels a side, for ``world`` workers to share."""
    cfg, plan = job.cfg, job.plan
    parts = tuple(
        (plan.tasks[i].train, plan.tasks[i].label_map, i, cfg.seed * 1000 + i if cfg.data.shuffle_chunks else None)
        for i in job.phases[phase_index].tasks
    )
    return PhaseDataset(phase_index, parts, size, cfg.data.decode_cpus, cfg.data.decode_tasks, job.checkpoints, world)


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
    _setup_logging()
    ray.data.DataContext.get_current().use_ray_tqdm = False  # Ray Data's progress goes to its log, not the console
    with tempfile.TemporaryDirectory(prefix="strata-eval-") as cache_dir:
        stream = _WorkerStream(job, Path(cache_dir))
        for phase_index in range(stream.progress.phases_done, len(job.phases)):
            stream.phase(phase_index)
        if job.cfg.tracking.model_name:  # the last version was registered after the last report: one closing report carries it
            report(stream.progress, {"task_index": job.phases[-1].row}, stream.rank)


class _WorkerStream:
    """One worker's side of the stream: the method restored from the store and the checkpoint,
    then each phase trained, recorded, evaluated and reported."""

    def __init__(self, job: WorkerJob, cache_dir: Path) -> None:
        cfg, plan = job.cfg, job.plan
        self.job, self.cfg, self.plan = job, cfg, plan
        self.collective = current_collective()
        self.rank, self.world = self.collective.rank, self.collective.world_size
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)
        self.backbone = create_backbone(cfg.backbone).to(self.device)
        self.size = cfg.data.image_size or self.backbone.input_spec.size  # the side images are decoded to
        self.method = create_method(job.method, self.backbone, self.collective)
        self.store = MemoryStore(cfg.memory_uri)
        self.progress, self.in_phase = read_checkpoint(ray.train.get_checkpoint(), job.start)
        if self.rank == 0:
            self.store.truncate(self.progress.records)
        self.collective.all_reduce_(torch.zeros(1, device=self.device))  # nobody reads the store before the rollback
        self.method.restore(self.store.load_all(backbone_id=self.backbone.backbone_id, upto=self.progress.records))
        self.run = TrackedRun(job.tracking_uri, job.run_id) if self.rank == 0 and job.run_id and job.tracking_uri else None
        label_space = cfg.eval.label_space
        self.label_space = ("task" if plan.scenario in ("til", "dcil") else "seen") if label_space == "auto" else label_space
        self.register()  # tasks finished before a restart whose version was not registered
        self.poster = ProgressPoster(job.board if self.rank == 0 else None)
        self.local_batch = max(1, cfg.train.batch_size // max(self.world, 1))
        self.test_sets = TestSets(
            plan, use_validation=cfg.eval.split == "validation", size=self.size, decode_cpus=cfg.data.decode_cpus,
            decode_tasks=cfg.data.decode_tasks, rank=self.rank, world=self.world,
            batch_size=max(1, cfg.eval.batch_size // max(self.world, 1)), device=self.device, cache_dir=cache_dir,
            cache_bytes=cfg.eval.cache_mb * 2**20,
        )  # fmt: skip

    def prepare(self, batch: Batch) -> Batch:
        return {**batch, "image": self.backbone.normalize(batch["image"])}

    def register(self) -> None:
        if self.run is not None and self.cfg.tracking.model_name:
            register_finished(
                self.run, self.cfg, self.plan, self.job.phases, self.progress, self.store,
                self.backbone.backbone_id, self.size, self.label_space,
            )  # fmt: skip

    def phase(self, phase_index: int) -> None:
        started = time.perf_counter()
        phase = self.job.phases[phase_index]
        info = phase_task_info(self.plan, phase)
        label = f"task {phase.row + 1}/{len(self.plan.tasks)} '{info.id}'"
        stats, record = self.train(phase_index, phase, info, label)
        self.progress.train_wall_s.append(time.perf_counter() - started)
        if self.rank == 0:
            task_plan = (
                task_plan_record(self.plan.tasks[phase.row], self.cfg.stream.tasks[phase.row]) if len(phase.tasks) == 1 else None
            )
            self.store.append(
                record,
                task_index=phase.row,
                task_id=info.id,
                method=self.method.name,
                backbone_id=self.backbone.backbone_id,
                plan=task_plan,
            )
        self.evaluate(phase, info)
        progress = self.progress
        for i in phase.tasks:
            progress.samples_seen[i] = stats.samples_per_task[i]
        progress.train_loss[phase.row] = stats.mean_loss
        progress.phases_done = phase_index + 1
        progress.records += 1
        progress.phase_wall_s.append(time.perf_counter() - started)
        self.finish(phase, info, label, stats)

    def train(self, phase_index: int, phase: Phase, info: TaskInfo, label: str) -> tuple[PhaseStats, TaskRecord]:
        """The phase's training pass(es), then the method's record."""
        cfg, plan, method, rank = self.cfg, self.plan, self.method, self.rank
        num_samples = sum(plan.tasks[i].train.num_samples for i in phase.tasks)
        if rank == 0:
            log.info("%s | training on %d samples, %d classes seen", label, num_samples, info.num_seen_classes)
            self.poster.task_started(
                row=phase.row, num_tasks=len(plan.tasks), task_id=info.id, samples=num_samples if method.consumes_data else 0
            )
        method.begin_task(info)
        broadcast_parameters(method.trainable_parameters(), self.collective)
        # A method with nothing to learn does not read its data.
        split = (
            PhaseSplit.open(phase_dataset(self.job, phase_index, self.size, self.world), f"train_{phase_index}", rank, self.world)
            if method.consumes_data
            else None
        )
        seed = cfg.seed * 1000 + phase_index * 16 + rank

        def batches() -> Iterator[Batch]:
            if split is None:
                return iter(())
            return (
                self.prepare(b) for b in train_batches(split.shard, self.local_batch, cfg.data.shuffle_buffer, seed, self.device)
            )

        def save(state: PhaseState) -> None:
            report(self.progress, {"task_index": phase.row, "step": float(state.steps)}, rank, state)

        policy = CheckpointPolicy(
            save, every_steps=cfg.train.checkpoint_every, every_s=cfg.train.checkpoint_every_s,
            source_rows={i: source_rows(plan.tasks[i].train) for i in phase.tasks},
        )  # fmt: skip
        resume = self.in_phase if self.in_phase is not None and self.in_phase.phase_index == phase_index else None
        if resume is not None and rank == 0:
            log.info("%s | resuming at step %d: %d samples are in the checkpoint", label, resume.steps, sum(resume.samples))
        settings = StepSettings(
            num_tasks=len(plan.tasks), num_samples=num_samples, global_batch_size=self.local_batch * max(self.world, 1),
            passes=cfg.train.passes, amp=cfg.train.amp, log_every=cfg.train.log_every, label=label, phase_index=phase_index,
        )  # fmt: skip
        checkpoints = policy if method.consumes_data and len(method.pass_plan(cfg.train.passes)) == 1 else None
        stats = train_phase(
            method, batches, settings, checkpoints=checkpoints, resume=resume, on_step=self.poster.step if rank == 0 else None
        )
        if split is not None:
            split.close()
        trained = bool(method.trainable_parameters())  # before end_task, which may drop them (RanPAC's Phase 1 head)
        record = method.end_task()
        self.progress.task_stats[phase.row] = method.task_stats() or None
        self.progress.steps[phase.row] = stats.steps if trained else None
        return stats, record

    def evaluate(self, phase: Phase, info: TaskInfo) -> None:
        """Every seen task's test set (every task's, for a zero-shot method); with task
        inference, also without task ids. Only after the rows ``eval.every`` schedules."""
        method, plan, progress = self.method, self.plan, self.progress
        num_tasks = len(plan.tasks)
        if phase.row not in scored_rows(num_tasks, self.cfg.eval.every):
            return
        row = progress.accuracy_matrix[phase.row]
        for j in range(num_tasks if method.zero_shot else phase.row + 1):
            candidates = candidate_classes(self.label_space, plan.tasks[j].classes, info.num_seen_classes)
            row[j] = evaluate_task(
                method, self.test_sets.batches(j), candidates=candidates, candidate_names=[plan.class_names[c] for c in candidates],
                task_index=j, task_aware=plan.scenario == "til", prepare=self.prepare,
            )  # fmt: skip
            progress.record_eval_stats(phase.row, j, reduce_eval_stats(method))
        if not method.infers_tasks:
            return
        if progress.cil_accuracy_matrix is None or progress.task_inference_matrix is None:
            progress.cil_accuracy_matrix = [[None] * num_tasks for _ in range(num_tasks)]
            progress.task_inference_matrix = [[None] * num_tasks for _ in range(num_tasks)]
        for j in range(phase.row + 1):
            cil, inferred = evaluate_inferred(
                method, self.test_sets.batches(j), candidates=list(range(info.num_seen_classes)),
                candidate_names=list(info.class_names), task_index=j, prepare=self.prepare,
            )  # fmt: skip
            progress.cil_accuracy_matrix[phase.row][j] = cil
            progress.task_inference_matrix[phase.row][j] = inferred

    def finish(self, phase: Phase, info: TaskInfo, label: str, stats: PhaseStats) -> None:
        """The task's line, live progress and MLflow metrics from rank 0; the report every rank
        makes; the task's registry version."""
        progress, row = self.progress, self.progress.accuracy_matrix[phase.row]
        metrics = phase_metrics(progress, phase)
        if self.rank == 0:
            loss = "-" if stats.mean_loss is None else f"{stats.mean_loss:.4f}"
            scored = "avg_seen_acc" in metrics
            log.info(
                "%s | %d samples | loss %s | %s | %.1fs", label, sum(stats.samples_per_task), loss,
                f"accuracy on seen tasks {metrics['avg_seen_acc']:.4f} [{' '.join(f'{v:.3f}' for v in row[: phase.row + 1])}]"
                if scored else "not scored after this task (eval.every)", progress.phase_wall_s[-1],
            )  # fmt: skip
            self.poster.task_finished(
                row=phase.row, num_tasks=len(self.plan.tasks), task_id=info.id, accuracy=row, avg_seen_acc=metrics.get("avg_seen_acc"),
                loss=stats.mean_loss, wall_s=progress.phase_wall_s[-1],
            )  # fmt: skip
            if self.run is not None:
                self.run.log_metrics(metrics, step=phase.row)
        report(progress, {"task_index": phase.row, **metrics}, self.rank)
        self.register()


def report(progress: Progress, metrics: dict[str, Any], rank: int, in_phase: PhaseState | None = None) -> None:
    """``ray.train.report`` on every rank (it is a barrier), rank 0 with the checkpoint: the
    stream's progress, and inside a phase, the phase's state."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            progress.write(Path(tmp))
            if in_phase is not None:
                in_phase.write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
