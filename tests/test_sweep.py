"""Sweeps: the sweep file's checks, the trial and final configs, and a real Tune sweep showing
that its trials never read test data."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.data.generators import get as generator
from pipeline.errors import ConfigError
from pipeline.tune import load_sweep
from pipeline.tune.sweep import _tune_space, base_config, final_config, trial_config

from conftest import REPO, blobs_task, run_config


def write_sweep(tmp_path: Path, base: dict, **sections) -> Path:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": [str(tmp_path / "run.yaml")],
        "space": {"method.lr": {"grid": [0.01, 0.5]}},
        "output_dir": str(tmp_path / "sweep"),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep | sections))
    return tmp_path / "sweep.yaml"


def tiny_base(tmp_path: Path, test_source: dict | None = None) -> dict:
    tasks = [
        blobs_task("a", classes=4, rows=40, seed=7, subset=[0, 1]),
        blobs_task("b", classes=4, rows=40, seed=7, subset=[2, 3]),
    ]
    if test_source is not None:
        for task in tasks:
            task["test"] = test_source
    return run_config(
        tmp_path, tasks, method={"name": "finetune"}, data={"rows_per_chunk": 1000}, train={"batch_size": 8, "num_workers": 1}
    )


@pytest.mark.parametrize(
    "space,message",
    [
        ({"method.lr": {"normal": [0, 1]}}, "space.method.lr: give exactly one of"),
        ({"method.lr": {"loguniform": [0, 1]}}, "space.method.lr: loguniform needs low > 0"),
        ({"method.lrr": {"choice": [0.1]}}, "space.method.lrr=0.1"),
        ({"train.batch_size": {"choice": [8, "big"]}}, "train.batch_size"),
    ],
)
def test_bad_sweep_files_fail_naming_the_key(tmp_path, space, message):
    path = write_sweep(tmp_path, tiny_base(tmp_path), space=space)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as err:
        load_sweep(path)
    assert "\n" not in str(err.value)


def test_trial_config_sees_validation_rows_of_the_first_tasks_and_the_final_config_sees_test(tmp_path):
    sweep = load_sweep(
        write_sweep(tmp_path, tiny_base(tmp_path), trial={"tasks": 1, "validation_fraction": 0.25, "num_workers": 1})
    )
    base = base_config(sweep)
    trial = trial_config(sweep, base, {"method.lr": 0.5}, tmp_path / "t", "trial x", "s3://bucket/sweep")
    assert [t.id for t in trial.stream.tasks] == ["a"]
    assert trial.train.storage_path == "s3://bucket/sweep"  # the sweep's storage, not a folder of the trial's node
    assert (trial.eval.split, trial.data.validation_fraction, trial.method.lr) == ("validation", 0.25, 0.5)
    assert trial.output_dir == str(tmp_path / "t") and trial.tracking.run_name == "trial x"
    final = final_config(sweep, base, {"method.lr": 0.5}, tmp_path / "f", "s3://bucket/sweep")
    assert final["eval"]["split"] == "test" and final["data"]["validation_fraction"] == 0.25
    assert final["train"]["storage_path"] == "s3://bucket/sweep"
    assert [t["id"] for t in final["stream"]["tasks"]] == ["a", "b"] and final["method"]["lr"] == 0.5


def test_set_from_the_command_line_sets_one_key_and_keeps_the_section(tmp_path):
    path = write_sweep(tmp_path, tiny_base(tmp_path), set={"train.num_workers": 1})
    sweep = load_sweep(path, ["set.train.resources_timeout_s=900", "set.backbone.kwargs.depth=1"])  # what a manifest passes
    base = base_config(sweep)
    assert base["train"]["resources_timeout_s"] == 900 and base["train"]["batch_size"] == 8 and base["train"]["num_workers"] == 1
    assert base["backbone"]["kwargs"]["depth"] == 1 and base["backbone"]["kwargs"]["embed_dim"] == 32
    replaced = base_config(load_sweep(write_sweep(tmp_path, tiny_base(tmp_path), set={"backbone.kwargs": {"depth": 1}})))
    assert replaced["backbone"]["kwargs"] == {"depth": 1}  # a dotted key's mapping is the value, as written


def test_trials_log_to_the_sweeps_mlflow_store_whatever_their_directory(tmp_path, monkeypatch):
    base = tiny_base(tmp_path)
    del base["tracking"]["uri"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = load_sweep(write_sweep(tmp_path, base))
    trial = trial_config(sweep, base_config(sweep), {"method.lr": 0.5}, tmp_path / "t", "trial x", str(tmp_path))
    assert trial.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_space_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = _tune_space(
        {"a": {"choice": [1, 2]}, "b": {"grid": [3, 4]}, "c": {"loguniform": [1e-3, 1]}, "d": {"randint": [1, 3]}}
    )
    assert isinstance(space["a"], Categorical) and space["b"] == {"grid_search": [3, 4]}
    assert isinstance(space["c"], Float) and isinstance(space["d"], Integer) and (space["d"].lower, space["d"].upper) == (1, 4)


def write_test_parquet(path: Path) -> None:
    """The blobs test rows of both tasks' classes (the tiny base's test set), as a Parquet source."""
    images, labels = generator("blobs").rows("test", {"num_classes": 4, "rows": 20, "size": 16, "seed": 7}, 0, 20)
    table = pa.table({"image": pa.array([png_rgb(a) for a in images], pa.binary()), "label": pa.array(labels, pa.int16())})
    pq.write_table(table.replace_schema_metadata({"classes": json.dumps([f"class{c}" for c in range(4)])}), path)


def png_rgb(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.ray
@pytest.mark.timeout(900)  # one real sweep (2 trials) and its test run: ~2.5 minutes on 2 quiet cores
def test_sweep_trials_never_read_test_data_and_the_best_config_runs_on_test(ray_session, tmp_path, monkeypatch):
    """The trials run while each task's test source is garbage bytes, which any read (its
    metadata included) refuses; only once the trials are over does it become the real test set,
    for the best config's run on test."""
    import importlib

    from click.testing import CliRunner

    from pipeline.cli import main

    sweep_module = importlib.import_module("pipeline.tune.sweep")  # pipeline.tune.sweep is also the function's name

    test_file = tmp_path / "test.parquet"
    test_file.write_bytes(b"not parquet: a trial that opened the test set would fail here" * 16)
    path = write_sweep(
        tmp_path,
        tiny_base(tmp_path, {"type": "parquet", "path": str(test_file)}),
        search={"scheduler": "fifo", "num_samples": 1, "max_concurrent_trials": 2},
        final_run=True,
    )
    opened_for_the_final_run = []

    def trials_over_then_final_config(*args, **kwargs):
        write_test_parquet(test_file)
        opened_for_the_final_run.append(True)
        return final_config(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "final_config", trials_over_then_final_config)
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
    assert opened_for_the_final_run == [True]
    assert [t["error"] for t in report["trials"]] == [None, None]  # no trial touched the garbage
    assert all(len(t["objective_per_task"]) == 2 for t in report["trials"])
    best = yaml.safe_load((tmp_path / "sweep/best_config.yaml").read_text())
    assert best["method"]["lr"] == report["best"]["config"]["method.lr"] and best["eval"]["split"] == "test"
    final = json.loads((tmp_path / "sweep/final/summary.json").read_text())
    assert final["last_acc"] == report["final"]["last_acc"] and final["config"]["eval"]["split"] == "test"
    assert all(v is not None for v in final["accuracy_matrix"][1])  # the test set was read, for this run only
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests").experiment_id
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{report['mlflow_run_id']}'")
    assert len(nested) == 2 and {r.data.params["method.lr"] for r in nested} == {"0.01", "0.5"}
    assert all(len(client.get_metric_history(r.info.run_id, "avg_seen_acc")) == 2 for r in nested)  # per task
    artifacts = {a.path for a in client.list_artifacts(report["mlflow_run_id"])}
    assert {"best_config.yaml", "sweep_objective.png", "sweep_summary.json"} <= artifacts
    assert client.get_run(final["mlflow_run_id"]).data.tags["strata.sweep_run_id"] == report["mlflow_run_id"]


def test_example_sweeps_load():
    for path in sorted((REPO / "configs/sweeps").rglob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.space, path


def test_trials_get_the_drivers_absolute_paths(tmp_path, monkeypatch):
    """A trial runs in Tune's own directory: a relative source or checkpoint path from a base
    config (../shared/datasets/... in the benchmark streams) must already be absolute."""
    from pipeline.tune.sweep import SweepConfig, base_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    run_yaml = {
        "stream": {"scenario": "cil", "tasks": [{"id": "t", "classes": ["a"], "train": {"type": "parquet", "path": "data/train.parquet"},
                                                 "test": {"type": "parquet", "path": "data/test.parquet"}}]},
        "backbone": {"name": "timm:resnet18", "checkpoint": "weights/w.safetensors"},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_yaml))
    sweep = SweepConfig(base=["run.yaml"], space={"method.lr": {"grid": [0.1]}})
    base = base_config(sweep)
    assert base["stream"]["tasks"][0]["train"]["path"] == str(tmp_path / "data/train.parquet")
    assert base["backbone"]["checkpoint"] == str(tmp_path / "weights/w.safetensors")
