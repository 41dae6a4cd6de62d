"""Cluster jobs through Ray's Job Submission API: submit the ``jobs/`` entrypoints, then watch them.

The job's working directory is uploaded (the project, minus virtual environments, runs and
caches), so the cluster runs exactly the code and configs on the submitter's disk. Config
files must lie inside it; the entrypoint names them by relative path. Ray does not retry jobs:
a caller that must not submit twice passes a deterministic ``submission_id``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

ENTRYPOINTS = {"run": "jobs/continual_train.py", "sweep": "jobs/sweep.py", "retrain": "jobs/retrain.py"}
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "runs", "mlruns", "mlartifacts", "mlflow.db", "bench/cache", "**/__pycache__", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: no cluster given (e.g. --address http://HEAD:8265, or set RAY_ADDRESS)")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address {address}: {str(exc).splitlines()[0]}") from None


def _relative(path: str, working_dir: Path) -> str:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return resolved.relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(f"{path}: outside the uploaded working directory {working_dir}") from None


def runtime_env(
    working_dir: Path,
    *,
    runtime_env_file: str | None = None,
    pip: Sequence[str] = (),
    conda: str | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ray runtime_env: the working dir with the default excludes, then a runtime-env YAML file,
    then pip packages (or a requirements file), a conda env (name or YAML file) and env vars."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(DEFAULT_EXCLUDES)}
    if runtime_env_file:
        path = Path(runtime_env_file)
        if not path.is_file():
            raise ConfigError(f"--runtime-env {runtime_env_file}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--runtime-env {runtime_env_file}: the top level must be a mapping")
        env["excludes"] += loaded.pop("excludes", [])
        env |= loaded
    if pip:
        env["pip"] = str(Path(pip[0]).resolve()) if len(pip) == 1 and pip[0].endswith(".txt") else list(pip)
    if conda:
        env["conda"] = yaml.safe_load(Path(conda).read_text()) if conda.endswith((".yaml", ".yml")) else conda
    variables = dict(env.get("env_vars", {}))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        variables.setdefault("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    variables |= dict(env_vars or {})
    if variables:
        env["env_vars"] = variables
    return env


def entrypoint(kind: str, configs: Sequence[str], overrides: Sequence[str], working_dir: Path, extra: Sequence[str] = ()) -> str:
    script = ENTRYPOINTS[kind]
    if not (working_dir / script).is_file():
        raise ConfigError(f"--working-dir {working_dir}: has no {script} (submit from the strata project root)")
    flag = "--sweep" if kind == "sweep" else "--config"
    args = ["python", script]
    for config in configs:
        args += [flag, _relative(config, working_dir)]
    for assignment in overrides:
        args += ["--set", assignment]
    return shlex.join([*args, *extra])


def submit(
    kind: str,
    configs: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    working_dir: str = ".",
    extra_args: Sequence[str] = (),
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    **env_options: Any,
) -> str:
    """Submit a ``jobs/`` entrypoint; returns the job's submission id."""
    root = Path(working_dir).resolve()
    command = entrypoint(kind, configs, overrides, root, extra_args)
    env = runtime_env(root, **env_options)
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(
                jobs.submit_job(
                    entrypoint=command,
                    runtime_env=env,
                    submission_id=submission_id,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus,
                    metadata={"strata.kind": kind},
                )
            )
        except RuntimeError as exc:
            # A head that has just started answers before its job agent is up, and says so.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def status(address: str | None, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def wait(address: str | None, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Poll until the job ends; its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    jobs = client(address)
    while True:
        state = str(jobs.get_job_status(job_id).value)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


def logs(address: str | None, job_id: str) -> str:
    return str(client(address).get_job_logs(job_id))


def follow_logs(address: str | None, job_id: str) -> Iterator[str]:
    """The job's log as it is written, until the job ends."""
    import asyncio

    jobs = client(address)
    stream = jobs.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(address: str | None, job_id: str) -> bool:
    return bool(client(address).stop_job(job_id))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    return [
        {"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint, "start_time": j.start_time}
        for j in client(address).list_jobs()
        if j.submission_id
    ]
