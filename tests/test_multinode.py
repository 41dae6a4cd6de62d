"""Multi-node for real: a head and two worker raylets on this host (tests/multinode_scenario.py
runs them in a process of its own), no stubbed cluster or preflight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def multinode(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("multinode")
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, str(TESTS / "multinode_scenario.py"), str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((workdir / "result.json").read_text())


@pytest.mark.ray
def test_a_node_local_output_dir_is_refused_by_the_preflight_on_a_live_multi_node_cluster(multinode):
    refused = multinode["refused"]
    assert refused["exit"] == 2 and len(refused["output"]) == 1
    assert (
        refused["output"][0].startswith("error: output_dir: ")
        and "is on one node's disk, and this cluster has 3 nodes" in refused["output"][0]
    )
    assert multinode["refused_wrote"] == []  # refused before anything was written


@pytest.mark.ray
def test_workers_spread_over_the_nodes_and_a_lost_node_resumes_from_the_in_task_checkpoint(multinode):
    """Two workers that cannot share a node run on the two worker nodes; removing a worker's node
    mid-task, after a checkpoint, restarts the group (max_failures 1) on the survivor and the
    replacement node, from that checkpoint: every sample is trained on once, and the class means (NCM, sums in
    any order) are exactly the uninterrupted run's."""
    whole, lost = multinode["whole"], multinode["lost"]
    head = multinode["head"]
    first = {n["rank"]: n["node"] for n in whole["nodes"]}
    assert sorted(first) == [0, 1] and first[0] != first[1] and head not in first.values()
    assert len(multinode["removed"]) == 1
    removed = multinode["removed"][0]
    before, after = lost["nodes"][:2], lost["nodes"][2:]  # each rank's node at the group's first and second start
    assert removed in {n["node"] for n in before} and head not in {n["node"] for n in before}
    assert sorted(n["rank"] for n in after) == [0, 1] and removed not in {n["node"] for n in after}
    assert lost["resumes"] == 1 and whole["resumes"] == 0
    assert lost["samples_seen"] == whole["samples_seen"] == [96]
    assert lost["visits"] == whole["visits"] == [[1] * 96]
    assert lost["accuracy_matrix"] == whole["accuracy_matrix"]
