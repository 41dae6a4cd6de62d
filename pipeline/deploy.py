"""Does what a Kubernetes manifest's jobs ask for fit the Ray clusters it may grow to?

A RayJob's entrypoint names a strata job and its config (``--config``/``--sweep`` and
``--set``); resolved here as the job resolves it, that gives the workers it asks Ray Train for
(``train.num_workers`` x {CPU, GPU}; a sweep's trial drivers and workers, then its final run).
The cluster it runs on -- the RayJob's own ``rayClusterSpec`` or the RayCluster its
``clusterSelector`` names -- can grow to each worker group's ``maxReplicas`` pods of the Ray
resources each pod offers (``rayStartParams`` or the container's limits, as KubeRay derives
them). A job whose workers cannot all be placed on that largest cluster waits for resources
that never come (``train.resources_timeout_s``) and fails; ``check`` says so before it is applied.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import load_config
from pipeline.run.preflight import worker_slots
from pipeline.tune import load_sweep

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Demand:
    """One Ray Train worker group (or a trial's driver): ``workers`` bundles of ``cpus`` + ``gpus``."""

    what: str
    workers: int
    cpus: float
    gpus: float

    def __str__(self) -> str:
        gpus = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.what}: {self.workers} x ({self.cpus:g} CPU{gpus})"


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("4", "200m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: Mapping[str, Any]) -> dict[str, float]:
    """The Ray resources one pod of a head or worker group offers (KubeRay: rayStartParams
    num-cpus / num-gpus, else the Ray container's limits, else its requests)."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    resources = container.get("resources") or {}
    limits = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    cpus = quantity(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
    gpus = quantity(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get(GPU_RESOURCE, 0))
    return {"CPU": cpus, "GPU": gpus}


def largest_nodes(spec: Mapping[str, Any]) -> list[dict[str, float]]:
    """Every node of a cluster spec grown to each worker group's maxReplicas, the head included."""
    nodes = [pod_resources(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs") or []:
        nodes += [pod_resources(group)] * int(group.get("maxReplicas", group.get("replicas", 0)))
    return nodes


def _run_demand(what: str, train: Any, gpus_available: bool) -> Demand:
    use_gpu = train.use_gpu if train.use_gpu != "auto" else gpus_available
    return Demand(what, train.num_workers, train.cpus_per_worker, train.gpus_per_worker if use_gpu else 0.0)


def entrypoint_demands(entrypoint: str, repo: Path, gpus_available: bool) -> list[Demand]:
    """What a strata entrypoint (``python IMAGE_ROOT/jobs/JOB.py --config|--sweep F --set ...``)
    asks Ray for, resolved from the repository's files with the image root mapped onto ``repo``."""
    args = shlex.split(entrypoint)
    script = next(a for a in args if a.endswith(".py"))
    image_root = script[: script.rindex("/jobs/")]
    sets = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]
    local = [re.sub(r"\$\{?STRATA_STORE\}?", "s3://strata-check", s) for s in sets]

    def in_repo(path: str) -> str:
        return str(repo / path.removeprefix(f"{image_root}/")) if path.startswith(f"{image_root}/") else path

    if "--sweep" in args:
        sweep = load_sweep(in_repo(args[args.index("--sweep") + 1]), local)
        trial = sweep.trial
        demands = [
            Demand("a trial's driver", 1, trial.driver_cpus, 0.0),
            Demand("a trial's workers", trial.num_workers, trial.cpus_per_worker, trial.gpus_per_worker),
        ]
        if sweep.final_run:  # the best config, with the base's train section
            base = load_config([str(repo / b) for b in sweep.base])
            demands.append(_run_demand("the final run's workers", base.train, gpus_available))
        return demands
    configs = [in_repo(value) for flag, value in zip(args, args[1:], strict=False) if flag == "--config"]
    return [_run_demand("the run's workers", load_config(configs, local).train, gpus_available)]


def check(demands: list[Demand], nodes: list[dict[str, float]]) -> str | None:
    """None if every demand fits ``nodes`` (each on its own, as the job runs them in turn); else why, in one line."""
    capacity = f"{len(nodes)} nodes, {sum(n['CPU'] for n in nodes):g} CPUs, {sum(n['GPU'] for n in nodes):g} GPUs"
    for demand in demands:
        if worker_slots(nodes, demand.cpus, demand.gpus) < demand.workers:
            return f"{demand} do not fit the largest cluster it may grow to ({capacity}, one worker per node slot)"
    return None


def manifest_jobs(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, RayJob) for each RayJob in a manifest file, the RayJob templates in its ConfigMaps included."""
    for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
        if doc.get("kind") == "RayJob":
            yield f"{path.name}#{i}", doc
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                embedded = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                if isinstance(embedded, dict) and embedded.get("kind") == "RayJob":
                    yield f"{path.name}#{i}:{key}", embedded


def check_manifests(paths: list[Path], repo: Path) -> list[tuple[str, list[Demand], str | None]]:
    """(job, what it asks for, None or the problem) for every RayJob in ``paths``; a RayJob with a
    ``clusterSelector`` runs on the RayCluster of that name found in ``paths``."""
    clusters = {
        doc["metadata"]["name"]: doc["spec"]
        for path in paths
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "RayCluster"
    }
    results = []
    for path in paths:
        for name, job in manifest_jobs(path):
            spec = job["spec"]
            selector = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
            cluster = spec.get("rayClusterSpec") or clusters.get(selector or "")
            if cluster is None:
                results.append((name, [], f"runs on RayCluster {selector!r}, which none of the files given defines"))
                continue
            nodes = largest_nodes(cluster)
            demands = entrypoint_demands(spec["entrypoint"], repo, any(n["GPU"] > 0 for n in nodes))
            results.append((name, demands, check(demands, nodes)))
    return results
