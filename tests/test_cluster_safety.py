"""What keeps a multi-node cluster correct and a registry or landing zone from running code:
the node-local storage refusal, key_remap from data, landed paths confined to their folder."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.ops import land_task, scan
from pipeline.serve import ModelCard
from pipeline.run.preflight import check_shared_storage, is_node_local

CARD = {
    "config": {"backbone": {"name": "timm:vit_tiny_patch16_224", "key_remap": None}},
    "backbone_id": "timm:vit_tiny_patch16_224",
    "memory_store": "s3://b/m",
    "memory_version": 1,
    "scenario": "cil",
    "label_space": "seen",
    "image_size": 16,
    "tasks": [],
    "class_names": [],
    "records_sha256": ["ab" * 32],
    "weights_sha256": {},
    "format": "strata-model/2",
}


def test_a_card_pins_exactly_one_record_per_memory_version():
    for pinned in ([], ["ab" * 32, "cd" * 32]):
        with pytest.raises(ConfigError, match=rf"m/1: pins {len(pinned)} records for memory_version 1"):
            ModelCard.from_json(json.dumps(CARD | {"records_sha256": pinned}), "m/1")
    unpinned = {k: v for k, v in CARD.items() if k != "records_sha256"}
    with pytest.raises(ConfigError, match="m/1: not a strata model card"):
        ModelCard.from_json(json.dumps(unpinned), "m/1")


@pytest.mark.parametrize(
    "uri,shared,local",
    [
        ("/tmp/strata/memory", [], True),
        ("file:///tmp/strata/memory", [], True),
        ("runs/x", [], True),
        ("memory://store", [], True),
        ("s3://bucket/memory", [], False),
        ("gs://bucket/ray", [], False),
        ("/mnt/strata/memory", ["/mnt/strata"], False),
        ("/mnt/strata", ["/mnt/strata"], False),
        ("/mnt/strata-other/memory", ["/mnt/strata"], True),  # a prefix of the name is not a parent folder
        ("/mnt/strata/../etc", ["/mnt/strata"], True),
    ],
)
def test_what_counts_as_node_local(uri, shared, local):
    assert is_node_local(uri, shared) is local


def test_the_default_memory_store_of_an_object_store_output_dir_stays_in_it():
    from pipeline.config import validate_config

    cfg = validate_config({"stream": {"tasks": []}, "output_dir": "s3://bucket/runs/x/"})
    assert cfg.memory_uri == "s3://bucket/runs/x/memory"


def test_a_multi_node_cluster_refuses_node_local_places_and_names_the_key():
    places = {"output_dir": "s3://b/out", "memory.uri": "/tmp/m", "train.storage_path": "s3://b/ray"}
    check_shared_storage(places, "sqlite:////tmp/mlflow.db", nodes=1)  # one node: local paths are fine
    with pytest.raises(
        ConfigError, match=r"^memory\.uri: /tmp/m is on one node's disk, and this cluster has 3 nodes; .*STRATA_SHARED_DIRS$"
    ):
        check_shared_storage(places, "http://mlflow:5000", nodes=3)
    shared = {k: "s3://b/" + k for k in places}
    check_shared_storage(shared, "http://mlflow:5000", nodes=3)
    check_shared_storage({**shared, "output_dir": "/mnt/strata/out"}, "https://mlflow", nodes=3, shared=["/mnt/strata"])
    check_shared_storage(shared, None, nodes=3)  # tracking off
    # Database and file stores keep artifacts (cards, pyfunc models) under the driver's working dir.
    for tracking in ("sqlite:////mnt/strata/mlflow.db", "postgresql://u@db/mlflow", "mlruns", "file:///mnt/strata/mlruns"):
        with pytest.raises(
            ConfigError, match=r"^tracking\.uri: .* keeps MLflow's artifacts in the driver's working directory.*MLflow server"
        ):
            check_shared_storage(shared, tracking, nodes=2, shared=["/mnt/strata"])


@pytest.mark.parametrize("remap", ["os:system", "pipeline.backbones.factory:remap_in_order"])
def test_a_registry_card_may_not_name_code(remap):
    assert ModelCard.from_json(json.dumps(CARD), "m/1").memory_version == 1
    in_order = {**CARD, "config": {"backbone": {**CARD["config"]["backbone"], "key_remap": "in_order"}}}
    assert ModelCard.from_json(json.dumps(in_order), "m/1").config["backbone"]["key_remap"] == "in_order"
    bad = {**CARD, "config": {"backbone": {**CARD["config"]["backbone"], "key_remap": remap}}}
    with pytest.raises(
        ConfigError, match=rf"^m/1: backbone\.key_remap '{remap}' names code to import.*only in_order is accepted$"
    ):
        ModelCard.from_json(json.dumps(bad), "m/1")


def _land(tmp_path, manifest: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    landing = tmp_path / "landing"
    land_task(str(landing), "t1", {"train.parquet": str(data), "test.parquet": str(data)}, manifest)
    return str(landing)


GOOD = {"train": {"type": "parquet", "path": "train.parquet"}, "test": {"type": "parquet", "path": ["test.parquet"]}}


def test_a_landed_task_reads_only_its_own_folder(tmp_path):
    landing = _land(tmp_path, GOOD)
    (task,), _ = scan(landing)
    assert task.task.train.path == f"{landing}/t1/train.parquet" and task.task.test.path == [f"{landing}/t1/test.parquet"]


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../other/train.parquet",
        "sub/../../x.parquet",
        "s3://someone-else/train.parquet",
        "file:///etc/x",
        "~/x",
        "c:x",
    ],
)
def test_a_landed_task_pointing_outside_its_folder_is_refused(tmp_path, path):
    landing = _land(tmp_path, {**GOOD, "train": {"type": "parquet", "path": path}})
    with pytest.raises(
        ConfigError, match=rf"t1/task\.yaml: train\.path '{path}' must be a relative path inside the task folder$"
    ):
        scan(landing)
    listed = _land(tmp_path / "list", {**GOOD, "test": {"type": "parquet", "path": ["test.parquet", path]}})
    with pytest.raises(ConfigError, match=r"t1/task\.yaml: test\.path"):
        scan(listed)


@pytest.mark.parametrize("task_id", ["../escape", "a/b", ".", "..", "", "x" * 129, 7])
def test_a_landed_task_id_names_no_path(tmp_path, task_id):
    landing = _land(tmp_path, {**GOOD, "id": task_id})
    with pytest.raises(ConfigError, match=r"t1/task\.yaml: id .* must be letters, digits, '\.', '_' or '-'"):
        scan(landing)


def test_a_landed_task_may_not_name_code(tmp_path):
    landing = _land(tmp_path, {**GOOD, "backbone": {"key_remap": "os:system"}})
    with pytest.raises(ConfigError, match=r"t1/task\.yaml: backbone\.key_remap 'os:system' names code to import"):
        scan(landing)
    manifest = tmp_path / "landing" / "t1" / "task.yaml"
    manifest.write_text(yaml.safe_dump({**GOOD, "backbone": {"key_remap": "in_order"}}))
    with pytest.raises(ConfigError, match=r"t1/task\.yaml: backbone: Extra inputs are not permitted"):
        scan(landing)  # a built-in remap is not code, but a task is not the place for a backbone
