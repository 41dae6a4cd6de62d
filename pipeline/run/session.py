"""The Ray session of a driver: joining or starting Ray, a fit that SIGINT and SIGTERM stop
cleanly, and the user's error found behind Ray's wrappers."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.errors import RunInterrupted, StrataError
from pipeline.train.live import Listener, drain

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


def fit(trainer: TorchTrainer, board: Any | None, on_progress: Listener | None) -> ray.train.Result:
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
            _drain(board, on_progress)  # type: ignore[arg-type]
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
                listening = _drain(board, on_progress)  # type: ignore[arg-type]
        if listening:
            _drain(board, on_progress)  # type: ignore[arg-type]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _drain(board: Any, on_progress: Listener) -> bool:
    """Hand the board's events to ``on_progress``; False once the board cannot be reached. The
    live view is the console's, not the run's: without it the run goes on (a warning says so)."""
    try:
        drain(board, on_progress)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        log.warning("live progress stopped (%s); the run goes on", type(exc).__name__)
        return False
    return True


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
