"""The driver of a run: validate everything, stream every task through one TorchTrainer, report.

Nothing about a task's data passes through the driver: it plans chunks from metadata and the
label column, builds lazy Ray Datasets, and reads back only the progress checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import fsspec
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import jsonout
from pipeline.backbones import create_backbone
from pipeline.config import CLUSTER_MAX_FAILURES, StrataConfig, dump_config, with_absolute_paths
from pipeline.data.stream import StreamPlan, resolve_stream
from pipeline.errors import ConfigError, RunInterrupted, StoreError, StrataError
from pipeline.eval import metrics
from pipeline.eval.report import write_heatmap, write_matrix_csv
from pipeline.memory import MemoryStore, RecordEntry
from pipeline.methods import Method, method_class, resolve_method_params
from pipeline.tracking import TrackedRun, resolve_tracking_uri
from pipeline.train.checkpoint import CheckpointLocator
from pipeline.train.live import Listener, ProgressBoard, drain
from pipeline.run.outputs import OutputDir
from pipeline.run.preflight import (
    alive_nodes,
    check_resources,
    check_shared_storage,
    check_tracking,
    check_writable,
    shared_dirs,
)
from pipeline.run.run_state import RUN_FILE, RunState, config_sha256
from pipeline.train.progress import Progress, make_phases
from pipeline.train.worker import WorkerJob, train_loop_per_worker

log = logging.getLogger("strata")


def init_ray(num_cpus: int | None = None, *, log_to_driver: bool = True) -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized so Data and Train can't starve.
    True if this call connected (so the caller may shut it down), False if Ray was up already.

    ``log_to_driver=False`` keeps Ray's own output (its workers' stdout, its INFO lines) in Ray's
    log files, off this process's console."""
    if ray.is_initialized():
        return False
    quiet = {} if log_to_driver else {"log_to_driver": False, "logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return True
    if "RAY_AUTH_MODE" not in os.environ:
        # Token auth, as Ray's default has it, but said explicitly: Ray warns when it picks the
        # mode itself. It caches its config at import, so re-read it, as Ray does when it picks.
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")
    # Spot-instance preemption does not happen to a local Ray: Train need not watch for it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # More logical CPUs than cores: train workers take fractions, and Ray Data's read tasks
    # must still get a slot, or two 1-CPU workers on a 2-core machine hang. The dashboard
    # serves the state API that Train's placement-group cleaner polls.
    num_cpus = num_cpus or max(8, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        # Ray expects as many Python workers as physical cores starting at once and warns at 4x
        # that; with CPUs declared above the cores on purpose, expect as many as declared.
        _system_config={"worker_maximum_startup_concurrency": num_cpus},
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}},
        **quiet,
    )
    return True


def max_failures(cfg: StrataConfig) -> int:
    """``train.max_failures``, with 'auto' resolved: retries on a cluster, none on a local Ray."""
    if cfg.train.max_failures != "auto":
        return cfg.train.max_failures
    return CLUSTER_MAX_FAILURES if os.environ.get("RAY_ADDRESS") else 0


def _resolved_config(cfg: StrataConfig) -> StrataConfig:
    params = resolve_method_params(cfg.method, cfg.train.lr)
    return cfg.model_copy(update={"method": cfg.method.model_validate(params.model_dump())})


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


def _fit(trainer: TorchTrainer, board: Any | None, on_progress: Listener | None) -> ray.train.Result:
    """``trainer.fit()``, stoppable by SIGINT and SIGTERM, handing rank 0's progress events to
    ``on_progress`` as they come.

    Train V2 replaces the SIGINT handler of the main thread with one that aborts the controller
    and ends in ``sys.exit`` (which ``except Exception`` does not catch), and leaves SIGTERM to
    kill the process outright. So the fit runs in a helper thread (as under Tune, where Train
    installs no handler), and the main thread turns either signal into ``RunInterrupted``.
    """
    try:
        return _fit_in_thread(trainer, board, on_progress)
    finally:
        if board is not None:
            ray.kill(board)


def _fit_in_thread(trainer: TorchTrainer, board: Any | None, on_progress: Listener | None) -> ray.train.Result:
    listening = board is not None and on_progress is not None
    if threading.current_thread() is not threading.main_thread():
        result = trainer.fit()
        if listening:
            drain(board, on_progress)  # type: ignore[arg-type]
        return result
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as it is
            outcome["error"] = exc

    def interrupt(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum)

    thread = threading.Thread(target=target, name="strata-fit", daemon=True)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.3)
            if listening:
                drain(board, on_progress)  # type: ignore[arg-type]
        if listening:
            drain(board, on_progress)  # type: ignore[arg-type]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def find_user_error(exc: BaseException) -> StrataError | None:
    """The StrataError behind a Ray Train / Ray Data failure, if that is what went wrong."""
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # RayTaskError keeps the original exception here
        if isinstance(err, StrataError):
            if isinstance(cause, StrataError):
                return cause
            if type(err).__module__.startswith("pipeline"):
                return err
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend(e for e in (cause, err.__cause__, err.__context__) if isinstance(e, BaseException))
    return None


def _summary(
    cfg: StrataConfig, plan: StreamPlan, progress: Progress, store: MemoryStore, run: TrackedRun | None, wall_s: float
) -> dict[str, Any]:
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


def run(
    cfg: StrataConfig,
    *,
    callbacks: Sequence[Any] = (),
    tracking_tags: Mapping[str, str] | None = None,
    prior_accuracy: Sequence[Sequence[float | None]] = (),
    fresh: bool = False,
    on_progress: Listener | None = None,
    log_to_driver: bool = True,
) -> dict[str, Any]:
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
    cfg = with_absolute_paths(_resolved_config(cfg))
    store = MemoryStore(cfg.memory_uri)
    method_cls, plan = _check_inputs(cfg, store)
    backbone = create_backbone(cfg.backbone)
    own_ray = init_ray(log_to_driver=log_to_driver)
    try:  # a refusal here leaves no Ray of ours running behind it
        use_gpu = cfg.train.use_gpu if cfg.train.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
        storage = _check_cluster(cfg, use_gpu)
        out = OutputDir(cfg.output_dir)
        state, continuing = _open_run(cfg, out, store, fresh)
        learned = _learned_tasks(cfg, plan, store, backbone.backbone_id, method_cls.trains_jointly, continuing)
        if sum(1 for t in plan.tasks if not t.train.chunks) > learned:  # planned from records of tasks that train again
            plan = _plan(cfg, store.entries()[:learned])
    except BaseException:
        if own_ray:
            ray.shutdown()
        raise
    size = cfg.data.image_size or backbone.input_spec.size
    del backbone
    start = Progress.resumed(len(plan.tasks), learned, prior_accuracy)
    out.write_text("config.yaml", dump_config(cfg))
    run_ = _tracked_run(cfg, state, continuing, learned, out, tracking_tags)
    state = state.with_status("running", mlflow_run_id=run_.run_id if run_ else None, tasks_done=learned).save(out)
    if continuing:
        log.info("continuing the unfinished run in %s: %d of %d tasks are in the store", out, learned, len(plan.tasks))
    board = ProgressBoard.remote() if on_progress is not None else None
    job = WorkerJob(
        cfg, resolve_method_params(cfg.method), plan, make_phases(len(plan.tasks), method_cls.trains_jointly), start, size,
        CheckpointLocator(storage, state.train_run_name), run_.tracking_uri if run_ else None, run_.run_id if run_ else None, board,
    )  # fmt: skip
    trainer = _trainer(cfg, job, use_gpu, storage, state.train_run_name, callbacks)
    try:
        result = _fit(trainer, board, on_progress)
    except RunInterrupted as exc:
        _close(run_, state, out, "killed", store)
        if own_ray:
            ray.shutdown()
        raise RunInterrupted(
            exc.signum,
            f"{out}: stopped by {exc.signal_name}; {store.version} finished tasks are in {store.uri}; "
            "run the same command again to continue",
        ) from None
    except Exception as exc:
        _close(run_, state, out, "failed", store)
        user_error = find_user_error(exc)
        if user_error is not None:
            if own_ray:  # before the one line: Ray's worker tracebacks would otherwise print after it
                ray.shutdown()
            raise type(user_error)(str(user_error).splitlines()[0]) from None
        raise
    progress = Progress.from_checkpoint(result.checkpoint, start)
    summary = _summary(cfg, plan, progress, store, run_, time.time() - started)
    _write_outputs(cfg, plan, summary, store, out, run_)
    _close(run_, state, out, "finished", store)
    return summary


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


def _write_outputs(
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


def _close(
    run_: TrackedRun | None, state: RunState, out: OutputDir, status: Literal["finished", "failed", "killed"], store: MemoryStore
) -> None:
    """End the MLflow run and the run file with the same status."""
    if run_ is not None:
        run_.finish(status.upper())
    state.with_status(status, tasks_done=store.version).save(out)
