"""The driver of a run: validate everything, stream every task through one TorchTrainer, report.

Nothing about a task's data passes through the driver: it plans chunks from metadata and the
label column, builds lazy Ray Datasets, and reads back only the progress checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import fsspec
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.backbones import create_backbone
from pipeline.config import CLUSTER_MAX_FAILURES, StrataConfig, dump_config, with_absolute_paths
from pipeline.data.stream import StreamPlan, resolve_stream
from pipeline.errors import ConfigError, RunInterrupted, StoreError
from pipeline.memory import MemoryStore, RecordEntry
from pipeline.methods import Method, MethodParams, method_class, resolve_method_params
from pipeline.tracking import TrackedRun, resolve_tracking_uri
from pipeline.train.checkpoint import CheckpointLocator
from pipeline.train.live import Listener, new_board
from pipeline.run.outputs import OutputDir
from pipeline.run.preflight import (
    alive_nodes,
    check_resources,
    check_shared_storage,
    check_tracking,
    check_writable,
    shared_dirs,
)
from pipeline.run.session import find_user_error, fit, init_ray
from pipeline.run.summary import RunSummary, write_outputs
from pipeline.run.run_state import RUN_FILE, RunState, config_sha256
from pipeline.train.progress import Progress, make_phases
from pipeline.train.worker import WorkerJob, train_loop_per_worker

log = logging.getLogger("strata")


def max_failures(cfg: StrataConfig) -> int:
    """``train.max_failures``, with 'auto' resolved: retries on a cluster, none on a local Ray."""
    if cfg.train.max_failures != "auto":
        return cfg.train.max_failures
    return CLUSTER_MAX_FAILURES if os.environ.get("RAY_ADDRESS") else 0


def _resolved_config(cfg: StrataConfig) -> tuple[StrataConfig, MethodParams]:
    """The config with the method's parameters resolved (defaults filled in, train.lr where the
    method has none), as config.yaml and MLflow show it, and those parameters as the workers get them."""
    params = resolve_method_params(cfg.method, cfg.train.lr)
    return with_absolute_paths(cfg.model_copy(update={"method": cfg.method.model_validate(params.model_dump())})), params


def _learned_tasks(
    cfg: StrataConfig, plan: StreamPlan, store: MemoryStore, backbone_id: str, joint: bool, continuing: bool
) -> int:
    """How many of the stream's tasks the memory store already holds (memory.resume, or this
    run's own records when it continues after an interruption), checked record by record against
    the stream, the method and the backbone; 0 for a fresh store."""
    entries = store.verify()
    if not entries:
        return 0
    if not continuing:
        if not cfg.memory.resume:
            raise StoreError(
                f"{cfg.memory_uri}: already holds {len(entries)} records; use a new output_dir or memory.uri, "
                "memory.resume=true to continue that stream, or --fresh to start over"
            )
        if joint:
            raise ConfigError(f"memory.resume: method {cfg.method.name} trains every task at once and cannot continue a stream")
        if len(entries) >= len(plan.tasks):
            raise ConfigError(f"memory.resume: {cfg.memory_uri} already holds all {len(plan.tasks)} tasks of the stream")
    for entry, task in zip(entries, plan.tasks, strict=False):
        where = f"{cfg.memory_uri}/{entry.file}"
        if entry.task_id != task.id:
            raise StoreError(
                f"{where}: record {entry.version} is task {entry.task_id!r}, but stream task {entry.task_index} is {task.id!r}"
            )
        if entry.method != cfg.method.name:
            raise StoreError(f"{where}: made by method {entry.method}, not {cfg.method.name}")
        if entry.backbone_id != backbone_id:
            raise StoreError(f"{where}: made with backbone {entry.backbone_id}, but the current backbone is {backbone_id}")
    return len(entries)


def _open_run(cfg: StrataConfig, out: OutputDir, store: MemoryStore, fresh: bool) -> tuple[RunState, bool]:
    """This run's state, and whether it continues an unfinished run of the same config in ``out``.

    ``fresh`` forgets any earlier run here first: its run file, its Ray Train checkpoint and the
    memory store's records."""
    state = RunState.load(out)
    if fresh:
        if state is not None:
            storage = cfg.train.storage_path or out.join("ray")
            fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{state.train_run_name}")
            if fs.exists(root):
                fs.rm(root, recursive=True)
            out.remove(RUN_FILE)
        if store.exists():
            store.truncate(0)
        return RunState.new(cfg), False
    if state is None:
        return RunState.new(cfg), False
    same = state.config_sha256 == config_sha256(cfg)
    if state.status == "finished":
        if same:
            raise ConfigError(
                f"{out}: this run has finished ({out.join('summary.json')}); pass --fresh to train it again, or use another output_dir"
            )
        return RunState.new(cfg), False
    if not same:
        raise ConfigError(
            f"{out.join(RUN_FILE)}: an unfinished run of a different config owns this folder; re-run that command to "
            "continue it, pass --fresh to start over, or use another output_dir"
        )
    return state, True


def run(
    cfg: StrataConfig,
    *,
    callbacks: Sequence[Any] = (),
    tracking_tags: Mapping[str, str] | None = None,
    prior_accuracy: Sequence[Sequence[float | None]] = (),
    fresh: bool = False,
    on_progress: Listener | None = None,
    log_to_driver: bool = True,
) -> RunSummary:
    """Train and evaluate the stream; write OUTPUT_DIR/summary.json and return it.

    ``callbacks`` go to Ray Train's RunConfig (a Tune trial passes ``TuneReportCallback``, so every
    task's report reaches Tune); ``tracking_tags`` are set on the MLflow run (a sweep trial nests
    itself under the sweep's run with ``mlflow.parentRunId``). With ``memory.resume``,
    ``prior_accuracy`` gives the accuracy-matrix rows of the tasks learned by earlier runs.

    An unfinished run of the same config in OUTPUT_DIR (its driver killed, interrupted, failed)
    is continued: finished tasks are not trained again, the same MLflow run goes on, and Ray Train
    restores its last checkpoint. ``fresh`` starts over instead (``strata run --fresh``).

    ``on_progress`` gets rank 0's progress events (``train.live``) while the stream trains; with
    ``log_to_driver=False`` a Ray this call starts keeps its workers' output in its log files.
    """
    started = time.time()
    opened = _open(cfg, fresh, log_to_driver)
    cfg, plan, state, out, store, learned = opened.cfg, opened.plan, opened.state, opened.out, opened.store, opened.learned
    start = Progress.resumed(len(plan.tasks), learned, prior_accuracy)
    out.write_text("config.yaml", dump_config(cfg))
    run_ = _tracked_run(cfg, state, opened.continuing, learned, out, tracking_tags)
    state = state.with_status("running", mlflow_run_id=run_.run_id if run_ else None, tasks_done=learned).save(out)
    if opened.continuing:
        log.info("continuing the unfinished run in %s: %d of %d tasks are in the store", out, learned, len(plan.tasks))
    board = new_board() if on_progress is not None else None
    job = WorkerJob(
        cfg, opened.method, plan, make_phases(len(plan.tasks), opened.method_cls.trains_jointly), start,
        CheckpointLocator(opened.storage, state.train_run_name), run_.tracking_uri if run_ else None,
        run_.run_id if run_ else None, board,
    )  # fmt: skip
    trainer = _trainer(cfg, job, opened.use_gpu, opened.storage, state.train_run_name, callbacks)
    try:
        result = fit(trainer, board, on_progress)
    except (RunInterrupted, Exception) as exc:
        _close(run_, state, out, "killed" if isinstance(exc, RunInterrupted) else "failed", store)
        error = _user_facing(exc, out, store, opened.own_ray)
        if error is exc:
            raise
        raise error from None
    progress = Progress.from_checkpoint(result.checkpoint, start)
    summary = RunSummary.build(cfg, plan, progress, store, run_, time.time() - started)
    write_outputs(summary, store, out, run_)
    _close(run_, state, out, "finished", store)
    return summary


@dataclass(frozen=True)
class _Opened:
    """A run checked and opened, Ray up: everything ``run`` needs before the fit."""

    cfg: StrataConfig
    method: MethodParams
    method_cls: type[Method]
    plan: StreamPlan
    store: MemoryStore
    out: OutputDir
    state: RunState
    continuing: bool
    learned: int
    use_gpu: bool
    storage: str
    own_ray: bool


def _open(cfg: StrataConfig, fresh: bool, log_to_driver: bool) -> _Opened:
    """Resolve the config, refuse what can be refused before Ray starts, start or join Ray, check
    the cluster, open the run file and count the tasks the store already holds."""
    cfg, method = _resolved_config(cfg)
    store = MemoryStore(cfg.memory_uri)
    method_cls, plan = _check_inputs(cfg, store)
    # Built here only to refuse bad weights (unreadable, misfitting, not downloadable) before
    # anything is written, and for the id the store's records must carry; the workers build their own.
    backbone_id = create_backbone(cfg.backbone).backbone_id
    own_ray = init_ray(log_to_driver=log_to_driver)
    try:  # a refusal here leaves no Ray of ours running behind it
        use_gpu = cfg.train.use_gpu if cfg.train.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
        storage = _check_cluster(cfg, use_gpu)
        out = OutputDir(cfg.output_dir)
        state, continuing = _open_run(cfg, out, store, fresh)
        learned = _learned_tasks(cfg, plan, store, backbone_id, method_cls.trains_jointly, continuing)
        if sum(1 for t in plan.tasks if not t.train.chunks) > learned:  # planned from records of tasks that train again
            plan = _plan(cfg, store.entries()[:learned])
    except BaseException:
        if own_ray:
            ray.shutdown()
        raise
    return _Opened(cfg, method, method_cls, plan, store, out, state, continuing, learned, use_gpu, storage, own_ray)


def _user_facing(exc: RunInterrupted | Exception, out: OutputDir, store: MemoryStore, own_ray: bool) -> BaseException:
    """What a failed fit raises: an interruption says how to continue; a user's error behind Ray's
    wrappers is its one line, after Ray is shut down (its workers' tracebacks would otherwise print
    after it); anything else as it is."""
    if isinstance(exc, RunInterrupted):
        if own_ray:
            ray.shutdown()
        return RunInterrupted(
            exc.signum,
            f"{out}: stopped by {exc.signal_name}; {store.version} finished tasks are in {store.uri}; "
            "run the same command again to continue",
        )
    user_error = find_user_error(exc)
    if user_error is None:
        return exc
    if own_ray:
        ray.shutdown()
    return type(user_error)(str(user_error).splitlines()[0])


def _plan(cfg: StrataConfig, entries: Sequence[RecordEntry]) -> StreamPlan:
    """The stream's plan; the tasks of ``entries`` (restored from the store) from their records."""
    return resolve_stream(
        cfg.stream, cfg.data.rows_per_chunk, holdout=cfg.data.validation_fraction, seed=cfg.seed, with_test=cfg.eval.split == "test",
        learned=[e.plan for e in entries],
    )  # fmt: skip


def _check_inputs(cfg: StrataConfig, store: MemoryStore) -> tuple[type[Method], StreamPlan]:
    """What can be refused before Ray starts: the method's scenarios, writable outputs, the
    tracking server; then the stream's plan (the tasks the store holds from their records)."""
    method_cls = method_class(cfg.method.name)
    if cfg.stream.scenario not in method_cls.scenarios:
        raise ConfigError(
            f"method.name: {cfg.method.name} supports {sorted(method_cls.scenarios)}, not stream.scenario {cfg.stream.scenario!r}"
        )
    check_writable(cfg.output_dir, "output_dir")
    check_writable(cfg.memory_uri, "memory.uri")
    if cfg.train.storage_path:
        check_writable(cfg.train.storage_path, "train.storage_path")
    if cfg.tracking.enabled:
        check_tracking(resolve_tracking_uri(cfg.tracking))
    return method_cls, _plan(cfg, store.entries())


def _check_cluster(cfg: StrataConfig, use_gpu: bool) -> str:
    """The workers fit the cluster and every node sees the run's paths; Train's storage path."""
    check_resources(cfg, use_gpu)
    storage = cfg.train.storage_path or f"{cfg.output_dir.rstrip('/')}/ray"  # absolute or a URI (with_absolute_paths)
    check_shared_storage(
        {"output_dir": cfg.output_dir, "memory.uri": cfg.memory_uri, "train.storage_path": storage},
        resolve_tracking_uri(cfg.tracking) if cfg.tracking.enabled else None,
        alive_nodes(),
        shared_dirs(),
    )
    return storage


def _tracked_run(
    cfg: StrataConfig, state: RunState, continuing: bool, learned: int, out: OutputDir, tracking_tags: Mapping[str, str] | None
) -> TrackedRun | None:
    """The MLflow run: the unfinished run's own when this continues it, else a new one with the
    config as parameters and artifact."""
    if not cfg.tracking.enabled:
        return None
    run_ = TrackedRun.reopen(cfg.tracking, state.mlflow_run_id, learned) if continuing and state.mlflow_run_id else None
    if run_ is None:
        run_ = TrackedRun.start(cfg.tracking, tags={"strata.method": cfg.method.name, **(tracking_tags or {})})
        run_.log_params(cfg.model_dump(mode="json"))
        run_.log_artifact(out.local / "config.yaml")
    return run_


def _trainer(cfg: StrataConfig, job: WorkerJob, use_gpu: bool, storage: str, name: str, callbacks: Sequence[Any]) -> TorchTrainer:
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": cfg.train.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,  # the same on a re-run: Train restores the last checkpoint
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures(cfg)),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


def _close(
    run_: TrackedRun | None, state: RunState, out: OutputDir, status: Literal["finished", "failed", "killed"], store: MemoryStore
) -> None:
    """End the MLflow run and the run file with the same status."""
    if run_ is not None:
        run_.finish(status.upper())
    state.with_status(status, tasks_done=store.version).save(out)
