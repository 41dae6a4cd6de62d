"""Hostile-but-realistic input, tried as a new user would: each case exits with the right code,
one line that names the culprit (file, row, column or config key), and leaves the memory store
and MLflow as they were. The good cases are here too, so that they stay good."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from pipeline.backbones import create_backbone
from pipeline.cli import main
from pipeline.config import validate_config
from pipeline.memory import MemoryStore

import strata_test_methods  # noqa: F401  (registers nan_at)
from conftest import blobs_task, run_config
from test_data import png


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def strata(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith(("error: ", "interrupted: "))]


def assert_one_line(result: Result, code: int, *culprits: str, last: bool = True) -> str:
    """``last``: the line is the output's last. Not so where this process's Ray workers train:
    their logs reach this process's stdout whenever Ray's log monitor forwards them (the order
    that a user sees is checked in a process of its own, test_ray_pipeline's bad-image test)."""
    assert result.exit_code == code, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    if last:
        assert result.output.strip().splitlines()[-1] == lines[0]
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


def assert_untouched(tmp_path: Path, config: dict[str, Any]) -> None:
    """No record in the store, no MLflow run: the failure came before any state changed."""
    assert MemoryStore(str(Path(config["output_dir"]) / "memory")).version == 0
    db = tmp_path / "mlflow.db"
    if db.exists():
        client = MlflowClient(config["tracking"]["uri"])
        experiment = client.get_experiment_by_name("tests")
        assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def parquet(path: Path, labels: pa.Array, rows: int = 4) -> Path:
    images = pa.array([png(i * 30) for i in range(rows)], pa.binary())
    pq.write_table(
        pa.table({"image": images, "label": labels}).replace_schema_metadata({"classes": json.dumps(["a", "b", "c"])}), path
    )
    return path


def parquet_task(path: Path) -> dict[str, Any]:
    return {"id": "p", "train": {"type": "parquet", "path": str(path)}, "test": {"type": "parquet", "path": str(path)}}


# --- config values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("train.lr=.inf", "train.lr"),
        ("train.lr=1e300", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("method.lr=1e37", "method.lr"),
        ("method.head_lr=.nan", "method.head_lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.bogus=1", "train.bogus"),
        ("method.name=nope", "method.name"),
    ],
)
def test_bad_config_values_are_refused_up_front(tmp_path, override, culprit):
    config = run_config(tmp_path, [blobs_task("a")], method={"name": "finetune"})
    assert_one_line(strata("run", str(write_config(tmp_path, config)), "--set", override), 2, culprit)
    assert_untouched(tmp_path, config)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stream:\n  tasks: [a, b\ntrain: {}\n")
    assert_one_line(strata("run", str(path)), 2, f"{path}:3:6: not valid YAML")


# --- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "culprit"),
    [
        (pa.array([0.0, 2.5, 1.0, 0.0]), "column 'label' holds double values"),
        (pa.array(["a", "b", "a", "c"]), "column 'label' holds string values"),
        (pa.array([0, None, 1, 2], pa.int64()), "column 'label' is null at row 1"),
        (pa.array([0, 1, 7, 2], pa.int64()), "label 7 at row 2 is outside the 3 classes"),
    ],
    ids=["float", "string", "null", "out-of-range"],
)
def test_bad_labels_name_file_and_column(tmp_path, labels, culprit):
    source = parquet(tmp_path / "labels.parquet", labels)
    config = run_config(tmp_path, [parquet_task(source)])
    assert_one_line(strata("run", str(write_config(tmp_path, config))), 2, str(source), culprit)
    assert_untouched(tmp_path, config)


# --- backbone weights ----------------------------------------------------------------------


def test_unreadable_and_misfitting_checkpoints_name_the_file_and_key(tmp_path):
    config = run_config(tmp_path, [blobs_task("a")])
    garbage_st, garbage_pth = tmp_path / "garbage.safetensors", tmp_path / "garbage.pth"
    garbage_st.write_bytes(b"\x00" * 64)
    garbage_pth.write_bytes(b"not a zip, not a pickle")
    model = create_backbone(validate_config(config).backbone).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = torch.zeros(1, 3, 32)
    misfit = tmp_path / "misfit.safetensors"
    save_file(state, str(misfit))
    path = write_config(tmp_path, config)
    for weights in (garbage_st, garbage_pth):
        assert_one_line(
            strata("run", str(path), "--set", f"backbone.checkpoint={weights}"),
            2,
            "backbone.checkpoint",
            str(weights),
            "not a readable weights file",
        )
    line = assert_one_line(
        strata("run", str(path), "--set", f"backbone.checkpoint={misfit}"), 2, "backbone.checkpoint", str(misfit)
    )
    assert "pos_embed has shape (1, 3, 32)" in line
    assert_untouched(tmp_path, config)


def test_pretrained_weights_without_network_say_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # What this machine is; offline mode makes the Hub fail at once instead of after its retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = run_config(tmp_path, [blobs_task("a")], backbone={"name": "timm:resnet18", "pretrained": True})
    result = strata("run", str(write_config(tmp_path, config)))
    assert_one_line(result, 2, "backbone.pretrained", "needs network, or a local backbone.checkpoint")
    assert_untouched(tmp_path, config)


# --- places a run writes to ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["output_dir", "memory.uri", "tracking.uri"])
def test_unwritable_destinations_are_refused_before_anything_trains(tmp_path, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    value = {
        "output_dir": str(blocker),
        "memory.uri": str(blocker / "memory"),
        "tracking.uri": f"sqlite:///{blocker}/sub/mlflow.db",
    }[key]
    config = run_config(tmp_path, [blobs_task("a")])
    assert_one_line(strata("run", str(write_config(tmp_path, config)), "--set", f"{key}={value}"), 2, key, str(blocker))
    assert blocker.read_text() == "not a directory"


def test_unreachable_tracking_server_fails_in_seconds(tmp_path):
    config = run_config(tmp_path, [blobs_task("a")])
    result = strata("run", str(write_config(tmp_path, config)), "--set", "tracking.uri=http://127.0.0.1:9")
    assert_one_line(result, 2, "tracking.uri: http://127.0.0.1:9 does not answer")
    assert_untouched(tmp_path, config)


# --- memory store inspection ---------------------------------------------------------------


def test_memory_show_refuses_missing_and_malformed_stores(tmp_path):
    assert_one_line(strata("memory", "show", str(tmp_path / "nowhere")), 2, f"{tmp_path / 'nowhere'}: no such memory store")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "manifest.json").write_text("[]")
    assert_one_line(strata("memory", "show", str(tmp_path / "list")), 2, "manifest.json: not a strata manifest")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text('{"format": "strata-memory/1"}')
    assert_one_line(strata("memory", "show", str(tmp_path / "empty")), 2, "has no 'records' list")
    (tmp_path / "fresh").mkdir()
    shown = strata("memory", "show", str(tmp_path / "fresh"), "--json")
    assert shown.exit_code == 0 and json.loads(shown.output) == []  # an empty store is fine


def test_store_refuses_a_record_with_non_finite_values(tmp_path):
    from pipeline.errors import StoreError
    from pipeline.memory import TaskRecord

    store = MemoryStore(str(tmp_path / "store"))
    store.append(TaskRecord({"w": torch.ones(3)}), task_index=0, task_id="a", method="m", backbone_id="b")
    with pytest.raises(StoreError, match=r"task 'b': tensor 'w' holds nan/inf values; refused, the store stays at version 1"):
        store.append(TaskRecord({"w": torch.tensor([1.0, float("inf")])}), task_index=1, task_id="b", method="m", backbone_id="b")
    assert [e.task_id for e in store.verify()] == ["a"]


# --- on a cluster (the session's Ray) ------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("train.num_workers=64", "train.num_workers: 64 workers x 0.5 CPU do not fit the cluster"),
        ("train.use_gpu=true", "train.use_gpu"),
    ],
)
def test_workers_the_cluster_cannot_place_fail_instead_of_waiting(ray_session, tmp_path, override, culprit):
    config = run_config(tmp_path, [blobs_task("a")])
    assert_one_line(strata("run", str(write_config(tmp_path, config)), "--set", override), 2, culprit)
    assert_untouched(tmp_path, config)


def test_a_diverging_task_stops_at_its_first_non_finite_step_and_keeps_the_last_good_task(ray_session, tmp_path):
    config = run_config(
        tmp_path, [blobs_task("a", rows=32), blobs_task("b", rows=32, seed=1)], method={"name": "nan_at", "task": 1, "step": 2}
    )
    config["train"] |= {"num_workers": 1, "batch_size": 8}
    result = strata("run", str(write_config(tmp_path, config)))
    assert_one_line(result, 2, "task 2/2 'b', step 2: the loss or its gradient is not finite", last=False)
    store = MemoryStore(config["output_dir"] + "/memory")
    assert [e.task_id for e in store.verify()] == ["a"]
    assert torch.isfinite(store.load_all()[0].tensors["bias"]).all()
    assert not (Path(config["output_dir"]) / "summary.json").exists()
    client = MlflowClient(config["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert json.loads((Path(config["output_dir"]) / "run.json").read_text())["status"] == "failed"


def test_json_outputs_write_null_for_non_finite_numbers():
    from pipeline import jsonout

    text = jsonout.dumps({"loss": float("nan"), "rows": [[1.0, float("inf")], [None, -float("inf")]], "n": 3})
    assert json.loads(text) == {"loss": None, "rows": [[1.0, None], [None, None]], "n": 3}


def test_worker_slots_count_whole_workers_per_node():
    from pipeline.run.preflight import worker_slots

    assert worker_slots([{"CPU": 8.0}], 0.5, 0.0) == 16
    assert worker_slots([{"CPU": 1.5}, {"CPU": 1.5}], 1.0, 0.0) == 2  # 3 CPUs in all, but no node holds two workers
    assert worker_slots([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0}], 1.0, 1.0) == 1
    assert worker_slots([{"CPU": 16.0, "GPU": 1.0}], 1.0, 0.25) == 4  # fractional GPUs share one
