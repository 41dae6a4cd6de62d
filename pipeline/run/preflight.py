"""Checks that run before any worker starts: every place a run writes, the tracking store, the
cluster's resources. Each failure is one line naming the config key, so that a run never trains
a task and then dies on a path it could have been told about, or waits forever for workers."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

import fsspec

from pipeline.config import StrataConfig
from pipeline.errors import ConfigError

log = logging.getLogger("strata")
RESOURCE_POLL_S = 5.0
SHARED_DIRS_ENV = "STRATA_SHARED_DIRS"  # colon-separated mount points every node sees (NFS, a RWX volume)
_PROCESS_LOCAL = ("file", "local", "memory")
_SERVER_TRACKING = ("http", "https", "databricks")


def check_writable(uri: str, key: str) -> None:
    """``uri`` is (or can be made) a directory this process can write to."""
    fs, root = fsspec.core.url_to_fs(uri)
    try:
        if fs.exists(root) and not fs.isdir(root):
            raise ConfigError(f"{key}: {uri} is a file, not a directory")
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.strata-write-probe-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except ConfigError:
        raise
    except Exception as exc:  # OSError locally; each remote filesystem raises its own
        raise ConfigError(f"{key}: {uri} is not writable ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow server answers its health check; a local store's directory is writable."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as exc:
            raise ConfigError(
                f"tracking.uri: {uri} does not answer ({exc.__class__.__name__}); start the server or fix the URI"
            ) from None
    elif parsed.scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        parent = path.rsplit("/", 1)[0] if "/" in path else "."
        check_writable(parent or "/", "tracking.uri")
    elif parsed.scheme in ("", "file"):
        check_writable(parsed.path if parsed.scheme else uri, "tracking.uri")


def worker_slots(nodes: list[Mapping[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) the nodes can place, each worker on one node."""
    slots = 0
    for node in nodes:
        by_cpu = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
        by_gpu = math.floor(node.get("GPU", 0.0) / gpus + 1e-9) if gpus else by_cpu
        slots += min(by_cpu, by_gpu)
    return slots


def check_resources(cfg: StrataConfig, use_gpu: bool) -> None:
    """Refuse a worker group the cluster cannot place (Train would wait for it forever); with
    ``train.resources_timeout_s``, wait that long for an autoscaler to add nodes first."""
    import ray

    train = cfg.train
    gpus = train.gpus_per_worker if use_gpu else 0.0
    deadline = time.monotonic() + train.resources_timeout_s
    waited = False
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if worker_slots(nodes, train.cpus_per_worker, gpus) >= train.num_workers:
            return
        if time.monotonic() >= deadline:
            break
        if not waited:
            log.info(
                "waiting up to %.0fs for the cluster to offer %d workers (train.resources_timeout_s)",
                train.resources_timeout_s,
                train.num_workers,
            )
            waited = True
        time.sleep(RESOURCE_POLL_S)
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if use_gpu and total_gpu < gpus:
        key = "train.use_gpu" if train.use_gpu is True else "train.gpus_per_worker"
        raise ConfigError(f"{key}: workers need {gpus:g} GPU each; the cluster has {total_gpu:g} GPUs")
    raise ConfigError(
        f"train.num_workers: {train.num_workers} workers x {train.cpus_per_worker:g} CPU"
        + (f" + {gpus:g} GPU" if gpus else "")
        + f" do not fit the cluster ({total_cpu:g} CPUs, {total_gpu:g} GPUs on {len(nodes)} nodes)"
        + (f", not even after waiting {train.resources_timeout_s:g}s" if train.resources_timeout_s else "")
    )


def shared_dirs() -> list[str]:
    """The local directories declared shared by every node (``STRATA_SHARED_DIRS``)."""
    return [os.path.normpath(d) for d in os.environ.get(SHARED_DIRS_ENV, "").split(":") if d]


def is_node_local(uri: str, shared: Sequence[str]) -> bool:
    """True for a path only this node can see: a local path outside the shared mounts, or memory://."""
    protocol = fsspec.utils.get_protocol(uri)
    if protocol not in _PROCESS_LOCAL:
        return False
    if protocol == "memory":
        return True
    path = os.path.normpath(uri.removeprefix("file://").removeprefix("local://"))
    return not any(path == d or path.startswith(d.rstrip("/") + "/") for d in shared)


def check_shared_storage(places: Mapping[str, str], tracking_uri: str | None, nodes: int, shared: Sequence[str] = ()) -> None:
    """On a cluster of more than one node, every place a run keeps state must be visible from
    every node: workers, Tune trials and a re-run driver land anywhere. ``places`` maps config
    keys to paths or URIs; a single node may use local paths freely. The tracking store must be
    an MLflow server there: a database or file store (sqlite, postgresql, ./mlruns) keeps the
    artifacts -- registry cards, the pyfunc models -- under the driver's working directory."""
    if nodes <= 1:
        return
    for key, uri in places.items():
        if is_node_local(uri, shared):
            raise ConfigError(
                f"{key}: {uri} is on one node's disk, and this cluster has {nodes} nodes; use an object-store URI "
                f"(s3://, gs://, ...) or a mount every node shares listed in {SHARED_DIRS_ENV}"
            )
    if tracking_uri is not None and urlparse(tracking_uri).scheme not in _SERVER_TRACKING:
        raise ConfigError(
            f"tracking.uri: {tracking_uri} keeps MLflow's artifacts in the driver's working directory, and this cluster "
            f"has {nodes} nodes; use an MLflow server (http://HOST:5000, `mlflow server --serve-artifacts`)"
        )


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
