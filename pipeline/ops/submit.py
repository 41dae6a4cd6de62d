"""Cluster jobs through Ray's Job Submission API: submit the ``jobs/`` entrypoints, then watch them.

The job's working directory is uploaded, so the cluster runs exactly the code and configs on
the submitter's disk. What goes up is decided here, not left to defaults: never secrets
(``.env``, key and credential files), data (``landing/``, ``runs/``, Parquet outside
``configs/``), virtual environments, caches, or anything ``.gitignore`` lists. The chosen files
are staged in a temporary folder, which is what Ray uploads, so the printed list is the upload.
Config files must lie inside the working dir; the entrypoint names them by relative path. Ray
does not retry jobs: a caller that must not submit twice passes a deterministic ``submission_id``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pathspec
import yaml

from pipeline.errors import ConfigError

ENTRYPOINTS = {"run": "jobs/continual_train.py", "sweep": "jobs/sweep.py", "retrain": "jobs/retrain.py"}
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "bench/cache",
    "**/__pycache__",
    ".pytest_cache",
]
# Data that belongs in object storage, not in a job's code (small Parquet samples under configs/ may go).
DATA = ["landing/", "runs/", "*.parquet", "!configs/**/*.parquet"]
# Never uploaded, whatever a runtime env or a .gitignore says: applied last, nothing re-includes them.
SECRETS = [
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".ssh/", ".netrc",
    ".pgpass", ".pypirc", ".npmrc", ".git-credentials", "*credentials*", ".aws/", ".gcp/", ".config/gcloud/", ".kube/",
    ".docker/", "*.kubeconfig", "kubeconfig",
]  # fmt: skip
MAX_UPLOAD_MB = 100.0
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
        for key in ("working_dir", "py_modules"):  # Ray would upload those without strata's filter
            if key in loaded:
                raise ConfigError(
                    f"--runtime-env {runtime_env_file}: {key} is not allowed; the working dir is --working-dir, filtered"
                )
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
    for name, value in variables.items():
        _refuse_credential(name, str(value))
    if variables:
        env["env_vars"] = variables
    return env


# A job's runtime env is stored with the job and shown to whoever can list jobs (the dashboard,
# `ray job list`): credentials reach the job's pods from a Secret instead (deploy/README.md).
CREDENTIAL_NAME = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY)", re.I)


def _refuse_credential(name: str, value: str) -> None:
    userinfo = urlsplit(value).password if "://" in value else None
    if CREDENTIAL_NAME.search(name) or name == "MLFLOW_TRACKING_USERNAME" or userinfo:
        raise ConfigError(
            f"env var {name}: holds a credential, and a job's runtime env is stored in the job's metadata, readable by "
            "anyone who can list jobs; give it to the cluster's pods from a Kubernetes Secret (deploy/README.md)"
        )


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


@dataclass(frozen=True)
class Upload:
    """The files a job's working dir uploads (paths relative to it, sizes in bytes)."""

    root: Path
    files: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        """One line: the total, then the largest top-level entries."""
        by_top: dict[str, int] = {}
        for rel, size in self.files:
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            by_top[top] = by_top.get(top, 0) + size
        largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:6]
        parts = ", ".join(f"{name} {_size(size)}" for name, size in largest)
        return (
            f"uploading {self.root}: {len(self.files)} files, {_size(self.total)} ({parts}{', ...' if len(by_top) > 6 else ''})"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_upload(working_dir: Path, excludes: Sequence[str] = ()) -> Upload:
    """What uploading ``working_dir`` sends: every regular file but the default and ``excludes``
    patterns, data (``DATA``), what any ``.gitignore`` in the tree lists (relative to its folder,
    as git and Ray read them) and, whatever came before, ``SECRETS`` (gitignore syntax). Symbolic
    links are never followed: one could point at a credentials file outside the tree."""
    top = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_EXCLUDES, *excludes, *DATA])
    secrets = pathspec.GitIgnoreSpec.from_lines(SECRETS)
    nested: list[tuple[str, pathspec.GitIgnoreSpec]] = []  # (folder prefix, its .gitignore)

    def excluded(rel: str) -> bool:
        if top.match_file(rel) or secrets.match_file(rel):
            return True
        return any(rel.startswith(prefix) and spec.match_file(rel[len(prefix) :]) for prefix, spec in nested)

    files = []
    for dirpath, dirnames, filenames in os.walk(working_dir):
        rel_dir = Path(dirpath).relative_to(working_dir).as_posix()
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        if ".gitignore" in filenames and not (Path(dirpath) / ".gitignore").is_symlink():
            nested.append((prefix, pathspec.GitIgnoreSpec.from_lines((Path(dirpath) / ".gitignore").read_text().splitlines())))
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d).is_symlink() and not excluded(f"{prefix}{d}/"))
        for name in sorted(filenames):
            rel = f"{prefix}{name}"
            path = Path(dirpath) / name
            if not path.is_symlink() and path.is_file() and not excluded(rel):
                files.append((rel, path.stat().st_size))
    return Upload(working_dir, tuple(files))


def stage_upload(upload: Upload, max_mb: float = MAX_UPLOAD_MB, force: bool = False) -> Path:
    """Copy the upload's files into a new temporary folder (the caller removes it); refuse an
    upload above ``max_mb`` unless ``force``."""
    if upload.total > max_mb * 1024**2 and not force:
        rel, size = max(upload.files, key=lambda f: f[1])
        raise ConfigError(
            f"--working-dir {upload.root}: the upload is {_size(upload.total)}, above the {max_mb:g} MiB limit (largest file: "
            f"{rel}, {_size(size)}); exclude what the job does not need (.gitignore, --runtime-env excludes) or pass --force"
        )
    staged = Path(tempfile.mkdtemp(prefix="strata-upload-"))
    for rel, _ in upload.files:
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(upload.root / rel, target)
    return staged


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
    max_upload_mb: float = MAX_UPLOAD_MB,
    force: bool = False,
    on_upload: Any = None,
    **env_options: Any,
) -> str:
    """Submit a ``jobs/`` entrypoint; returns the job's submission id. ``on_upload`` is called
    with the ``Upload`` before anything is sent."""
    root = Path(working_dir).resolve()
    command = entrypoint(kind, configs, overrides, root, extra_args)
    env = runtime_env(root, **env_options)
    upload = plan_upload(root, env.pop("excludes"))
    uploaded = {rel for rel, _ in upload.files}
    for config in configs:
        rel = _relative(config, root)
        if rel not in uploaded:
            raise ConfigError(
                f"{config}: excluded from the upload (.gitignore, runs/, data or secrets), so the job could not read it"
            )
    jobs = client(address)
    if on_upload is not None:
        on_upload(upload)
    staged = stage_upload(upload, max_upload_mb, force)
    try:
        return _submit_when_ready(
            jobs, command, env | {"working_dir": str(staged)}, submission_id, entrypoint_num_cpus, entrypoint_num_gpus, kind
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _submit_when_ready(
    jobs: Any, command: str, env: dict[str, Any], submission_id: str | None, cpus: float | None, gpus: float | None, kind: str
) -> str:
    """``submit_job``, waiting for a head that has just started (it answers before its job agent is up)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(
                jobs.submit_job(
                    entrypoint=command,
                    runtime_env=env,
                    submission_id=submission_id,
                    entrypoint_num_cpus=cpus,
                    entrypoint_num_gpus=gpus,
                    metadata={"strata.kind": kind},
                )
            )
        except RuntimeError as exc:
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
