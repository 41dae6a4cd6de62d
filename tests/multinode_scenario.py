"""A real multi-node Ray on this host (``ray.cluster_utils.Cluster``: a head and two worker
raylets), driven the way a user's driver drives it, for tests/test_multinode.py.

    python tests/multinode_scenario.py WORKDIR

It runs in a process of its own because a process joins one Ray cluster at a time and the test
session already holds one; each run is ``strata run`` in a driver process that joins the
cluster by address, as a user's would. In WORKDIR it writes ``result.json``:

- ``refused``: exit code and last line of a run whose output_dir is node-local (no
  STRATA_SHARED_DIRS), from the real preflight against the live cluster;
- ``whole`` / ``lost``: the summaries of the same one-task run, uninterrupted and with a
  worker's node removed mid-task, once a checkpoint is in (a replacement node joins first, as
  an autoscaler would add one; never the node the driver joined, where Train's controller
  runs), plus each rank's node per worker-group start and the visits every sample got.

Each node offers 2 CPUs and a worker takes 1.5, so two workers cannot share a node; the head
offers 1 CPU (Ray Data's tasks, no worker).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path[:0] = [str(TESTS), str(REPO)]

import yaml  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import blobs_task, run_config  # noqa: E402
from pipeline.memory import MemoryStore  # noqa: E402
from pipeline.run.preflight import SHARED_DIRS_ENV  # noqa: E402

NODE = {"num_cpus": 2, "object_store_memory": 256 * 1024**2}
ROWS = 96


def config(workdir: Path, name: str) -> Path:
    cfg = run_config(workdir / name, [blobs_task("a", rows=ROWS)], method={
        "name": "kill_at", "kill_task": 0, "marker": str(workdir / name / "marker"), "node_loss": True})  # fmt: skip
    cfg["train"] |= {"num_workers": 2, "cpus_per_worker": 1.5, "batch_size": 8, "checkpoint_every": 2, "max_failures": 1}
    cfg["tracking"] = {"enabled": False}  # a multi-node run needs an MLflow server; the run's summary is what is checked
    cfg["data"] = {"rows_per_chunk": 8}
    (workdir / name).mkdir(parents=True, exist_ok=True)
    path = workdir / name / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def strata_run(cluster: Cluster, config_path: Path, shared: Path | None) -> subprocess.Popen[str]:
    """``strata run CONFIG`` as a user's driver on the cluster: a process that joins it by address."""
    pythonpath = os.pathsep.join([str(TESTS), str(REPO)])
    # RAY_ADDRESS in the job's env too, for Train's own helpers that look the cluster up: the
    # test session's Ray runs on this host as well.
    job_env = {"PYTHONPATH": pythonpath, "RAY_ADDRESS": cluster.address}
    env = {k: v for k, v in os.environ.items() if k != SHARED_DIRS_ENV} | {
        "RAY_ADDRESS": cluster.address, "PYTHONPATH": pythonpath,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": job_env}}),
    }  # fmt: skip
    if shared is not None:
        env[SHARED_DIRS_ENV] = str(shared)
    driver = "import sys, strata_test_methods; from pipeline.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", driver, "run", str(config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def arm_a_worker_node(rundir: Path, driver: subprocess.Popen[str], dashboard: str) -> str | None:
    """Once the run has reported a checkpoint inside its task, name the node of a worker that is
    not the driver's (Train's controller runs there, and the driver joined this host's raylets
    at random) in ``marker.arm``: that worker waits there mid-step for its node to go."""
    from ray.util.state import list_actors

    def reported() -> bool:
        return any("checkpoint_" in p.read_text() for p in (rundir / "out" / "ray").glob("*/checkpoint_manager_snapshot.json"))

    nodes_file = rundir / "marker.nodes"
    while driver.poll() is None and not (reported() and nodes_file.exists() and len(nodes_file.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    if driver.poll() is not None:
        return None
    controller = list_actors(address=dashboard, filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    driver_node = controller[0].node_id
    workers = [line.split()[2] for line in nodes_file.read_text().splitlines()]
    victim = next(node for node in workers if node != driver_node)
    (rundir / "marker.arm").write_text(victim)
    return victim


def outcome(workdir: Path, name: str, driver: subprocess.Popen[str]) -> dict[str, Any]:
    output, _ = driver.communicate(timeout=900)
    if driver.returncode != 0:
        raise RuntimeError(f"strata run {name} exited {driver.returncode}:\n{output[-4000:]}")
    summary = json.loads((workdir / name / "out" / "summary.json").read_text())
    nodes = [line.split() for line in (workdir / name / "marker.nodes").read_text().splitlines()]
    store = MemoryStore(str(workdir / name / "out" / "memory"))
    visits = [record.tensors["visits"].tolist()[:ROWS] for record in store.load_all()]
    keys = ("accuracy_matrix", "samples_seen", "resumes", "steps")
    return {
        **{k: summary[k] for k in keys},
        "nodes": [{"pid": p, "rank": int(r), "node": n} for p, r, n in nodes],
        "visits": visits,
    }


def main() -> int:
    workdir = Path(sys.argv[1])
    with socket.socket() as sock:  # the session's Ray holds the default dashboard port
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    head = {"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        result: dict[str, Any] = {"head": cluster.head_node.node_id}

        refused = strata_run(cluster, config(workdir, "refused"), shared=None)
        output, _ = refused.communicate(timeout=600)
        result["refused"] = {"exit": refused.returncode, "output": output.strip().splitlines()[-1:]}
        result["refused_wrote"] = sorted(
            p.name for p in (workdir / "refused").rglob("*") if p.is_file() and p.name != "config.yaml"
        )

        # Every raylet is on this host, so the work directory is shared by all nodes.
        result["whole"] = outcome(workdir, "whole", strata_run(cluster, config(workdir, "whole"), shared=workdir))
        lost = strata_run(cluster, config(workdir, "lost"), shared=workdir)
        removed = []
        victim_id = arm_a_worker_node(workdir / "lost", lost, f"http://127.0.0.1:{dashboard_port}")
        marker = workdir / "lost" / "marker"
        while victim_id is not None and lost.poll() is None and not (marker.exists() and marker.read_text()):
            time.sleep(0.1)
        if victim_id is not None and lost.poll() is None:
            victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
            cluster.add_node(**NODE)  # the replacement, as an autoscaler would add it
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(victim_id)
        result["lost"] = outcome(workdir, "lost", lost)
        result["removed"] = removed
        (workdir / "result.json").write_text(json.dumps(result))
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
