"""Integration: real local Ray (one per session), real MLflow store, real memory store."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import validate_config
from pipeline.memory import MemoryStore
from pipeline.run import run
from pipeline.run.summary import RunSummary

from conftest import REPO, blobs_task, run_config, strata_process
from test_data import png

pytestmark = pytest.mark.ray

CONTRACT_KEYS = {
    "tasks", "accuracy_matrix", "avg_acc", "last_acc", "forgetting", "bwt", "transfer",
    "samples_seen", "memory_bytes", "memory_store", "wall_s", "mlflow_run_id", "config",
}  # fmt: skip


def test_every_sample_reaches_exactly_one_worker_once_and_ray_actors_do_not_grow_with_the_stream(ray_session, tmp_path):
    """Six tasks: every row of each trained on exactly once, by both workers between them; and
    the Ray actor processes alive when task 2 begins are as many as when task 6 begins (one
    split coordinator per phase, ended with it; evaluation runs no actor). With eval.every 3 the
    seen tasks are scored after tasks 3 and 6 only, and the metrics read those rows."""
    import strata_test_methods  # noqa: F401  (registers sample_counter)

    rows = (101, 64, 24, 24, 24, 24)
    tasks = [blobs_task(f"t{i}", rows=n, seed=i + 1) for i, n in enumerate(rows)]
    sections = {
        "method": {"name": "sample_counter", "max_id": 128}, "tracking": {"enabled": False}, "data": {"rows_per_chunk": 8},
        "eval": {"every": 3},
    }  # fmt: skip
    cfg = validate_config(run_config(tmp_path, tasks, **sections))
    summary = run(cfg)
    assert RunSummary.from_json(json.loads((tmp_path / "out" / "summary.json").read_text())) == summary  # written as returned
    store = MemoryStore(summary.memory_store)
    for entry, n in zip(store.entries(), rows, strict=True):
        record = store.load(entry)
        visits = record.tensors["visits"]
        assert visits[:n].tolist() == [1] * n, f"{entry.task_id}: some sample seen 0 or 2+ times"
        assert int(visits[n:].sum()) == 0
        per_rank = record.tensors["per_rank"][:2].tolist()
        assert sum(per_rank) == n and min(per_rank) > 0  # both workers got a share
    assert summary.samples_seen == list(rows)
    actors = [stats["ray_actor_processes"] for stats in summary.task_stats]
    assert actors[1] == actors[5], f"Ray actor processes at the start of each task: {actors}"
    matrix = summary.accuracy_matrix
    assert summary.scored_rows == [2, 5]
    assert [i for i, row in enumerate(matrix) if any(v is not None for v in row)] == [2, 5]
    assert None not in matrix[2][:3] + matrix[5] and matrix[2][3:] == [None] * 3
    assert summary.avg_acc == pytest.approx((sum(matrix[2][:3]) / 3 + sum(matrix[5]) / 6) / 2, abs=1e-12)
    assert summary.forgetting == pytest.approx(
        sum(matrix[2][j] - matrix[5][j] for j in range(3)) / 3, abs=1e-12
    )  # tasks 4, 5: no earlier score
    assert summary.last_acc == pytest.approx(sum(matrix[5]) / 6, abs=1e-12) and summary.mtil_average is None


def digit_pairs_in_train_split() -> list[int]:
    """Training-set size of each quickstart task, counted straight from scikit-learn."""
    from sklearn.datasets import load_digits

    labels = load_digits().target[np.arange(1797) % 5 != 0]
    return [int(np.isin(labels, [2 * k, 2 * k + 1]).sum()) for k in range(5)]


def quickstart(tmp_path: Path, method: str) -> dict:
    out = tmp_path / method
    result = CliRunner().invoke(
        main,
        ["run", str(REPO / "configs/quickstart.yaml"), "--set", f"output_dir={out}", "--set", f"method.name={method}",
         "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def test_quickstart_ncm_beats_finetune_and_mlflow_matches(ray_session, tmp_path):
    """The quickstart command (ncm) in a process of its own, as a user runs it: its whole console
    output fits on one screen, a line per task and the matrix, with nothing of Ray's in it."""
    driver = strata_process(
        ray_session, "run", str(REPO / "configs/quickstart.yaml"), "--set", f"output_dir={tmp_path / 'ncm'}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr
    console = (stdout + stderr).strip().splitlines()
    assert len(console) <= 40, "\n".join(console)
    assert not [line for line in console if any(s in line for s in ("WARNING", "Warning", "(raylet)", "pid=", "[strata]"))], (
        "\n".join(console)
    )
    for i in range(1, 6):
        assert sum(line.startswith(f"task {i}/5 digits-") and "accuracy on seen tasks" in line for line in console) == 1, (
            "\n".join(console)
        )
    ncm = json.loads((tmp_path / "ncm" / "summary.json").read_text())
    finetune = quickstart(tmp_path, "finetune")
    assert ncm["last_acc"] > finetune["last_acc"]
    for summary in (ncm, finetune):
        assert CONTRACT_KEYS <= set(summary)
        t = len(summary["tasks"])
        assert t >= 4
        matrix = summary["accuracy_matrix"]
        assert all((v is not None) == (j <= i) for i, row in enumerate(matrix) for j, v in enumerate(row))
        assert all(0.0 <= v <= 1.0 for row in matrix for v in row if v is not None)
        assert summary["samples_seen"] == digit_pairs_in_train_split()
        assert all(b and b > 0 for b in summary["memory_bytes"])
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        mlflow_run = client.get_run(summary["mlflow_run_id"])
        assert mlflow_run.info.status == "FINISHED"
        logged = mlflow_run.data.metrics
        for key in ("avg_acc", "last_acc", "forgetting", "bwt"):
            assert logged[key] == pytest.approx(summary[key], abs=1e-12)
        history = client.get_metric_history(summary["mlflow_run_id"], "acc/task_0")
        assert [(m.step, m.value) for m in history] == [(i, matrix[i][0]) for i in range(t)]
        assert mlflow_run.data.params["method.name"] == summary["method"]
        artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
        assert {"summary.json", "accuracy_matrix.csv", "accuracy_matrix.png", "config.yaml"} <= artifacts
    assert ncm["memory_bytes"][0] == 2 * 64 * 4 + 2 * 8 * 2  # two class means (float32) + ids and counts (int64)
    shown = CliRunner().invoke(main, ["memory", "show", ncm["memory_store"], "--json"])
    assert [e["task_id"] for e in json.loads(shown.output)] == ncm["tasks"]


def test_bad_image_mid_stream_fails_cleanly(ray_session, tmp_path):
    images = [png(i * 40) for i in range(6)]
    images[4] = b"\x89PNG broken"
    bad = tmp_path / "bad.parquet"
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(np.arange(6) % 2, pa.int16())})
    pq.write_table(table.replace_schema_metadata({"classes": json.dumps(["a", "b"])}), bad)
    tasks = [
        blobs_task("fine", rows=16),
        {"id": "broken", "train": {"type": "parquet", "path": str(bad)}, "test": {"type": "parquet", "path": str(bad)}},
    ]
    config = run_config(tmp_path, tasks)
    config["train"]["max_failures"] = 0  # 'auto' retries on a cluster joined through RAY_ADDRESS, as this process does
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    driver = strata_process(ray_session, "run", str(tmp_path / "c.yaml"))  # a real process: Ray's worker logs are in its stderr
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bad.parquet row group 0 row 4: cannot decode image" in errors[0]
    assert stderr.strip().splitlines()[-1] == errors[0]  # the one line comes last, after Ray's tracebacks
    store = MemoryStore(str(tmp_path / "out/memory"))
    assert [e.task_id for e in store.verify()] == ["fine"]  # the failed task left no record
    client = MlflowClient(config["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_l2p_end_to_end_on_two_workers(ray_session, tmp_path):
    tasks = [
        blobs_task("p0", classes=4, rows=32, seed=5, subset=[0, 1]),
        blobs_task("p1", classes=4, rows=32, seed=5, subset=[2, 3]),
    ]
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(run_config(tmp_path, tasks, data={"rows_per_chunk": 8})))
    result = CliRunner().invoke(
        main,
        ["run", str(tmp_path / "stream.yaml"), str(REPO / "configs/methods/l2p-single-pass.yaml"),
         "--set", "train.batch_size=8", "--set", "method.pool_size=4", "--set", "method.top_n=2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert CONTRACT_KEYS <= set(summary) and summary["method"] == "l2p"
    assert summary["samples_seen"] == [16, 16]
    assert all(v is not None for v in summary["accuracy_matrix"][1])
    m, lp, d = 4, 5, 32
    for classes, nbytes in zip((2, 4), summary["memory_bytes"], strict=True):
        assert nbytes == 4 * (m * lp * d + m * d) + 4 * (classes * d + classes)
    records = MemoryStore(summary["memory_store"]).entries()
    counts = MemoryStore(summary["memory_store"]).load(records[1]).meta["selection_counts"]
    assert sum(counts) == 2 * 32  # every training sample of both tasks selected top-2 prompts once
    assert [sum(stats["prompt_selection"]) for stats in summary["task_stats"]] == [32, 32]  # per task, not cumulative
    assert [a + b for a, b in zip(*(s["prompt_selection"] for s in summary["task_stats"]), strict=True)] == counts
    assert all(steps >= 2 for steps in summary["steps"])  # 16 samples at batch 8 (short shuffled batches add steps)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        summary["mlflow_run_id"], "prompt_selection/0"
    )
    assert [(m.step, m.value) for m in history] == [(i, s["prompt_selection"][0]) for i, s in enumerate(summary["task_stats"])]


def dcil_stream(tmp_path: Path) -> list[dict]:
    colours = blobs_task("colours", classes=2, rows=32, seed=11)
    colours["rename"] = {"class0": "red", "class1": "blue"}
    shapes = blobs_task("shapes", classes=2, rows=32, seed=12)
    shapes["rename"] = {"class0": "circle", "class1": "square"}
    return [colours, shapes]


def test_diki_dcil_end_to_end_fills_transfer_average_last(ray_session, tmp_path):
    config = run_config(
        tmp_path, dcil_stream(tmp_path), backbone={"name": "open_clip:strata-tiny-clip"}, data={"rows_per_chunk": 8}
    )
    config["stream"]["scenario"] = "dcil"
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(
        main,
        ["run", str(tmp_path / "stream.yaml"), str(REPO / "configs/methods/diki-single-pass.yaml"),
         "--set", "method.image_layers=[0, 1]", "--set", "method.text_layers=[0, 1]", "--set", "method.residual_length=2",
         "--set", "train.batch_size=8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["method"] == "diki" and summary["class_names"] == ["red", "blue", "circle", "square"]
    assert all(v is not None for row in summary["accuracy_matrix"] for v in row)  # future task evaluated zero-shot
    assert summary["transfer"] == summary["accuracy_matrix"][0][1]
    assert summary["transfer_per_task"] == [None, summary["accuracy_matrix"][0][1]]
    for key in ("transfer", "mtil_average", "last_acc"):
        assert summary[key] is not None and 0.0 <= summary[key] <= 1.0
    assert summary["samples_seen"] == [32, 32]
    per_task = (
        4 * (2 * 2 * (2 * 2 * 32) + 2 * 2 * (2 * 2 * 16) + 32 + 32 * 33 // 2) + 8
    )  # + the training rows' mean distance (float64)
    assert summary["memory_bytes"] == [per_task, per_task]
    logged = MlflowClient(config["tracking"]["uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    assert logged["mtil_average"] == pytest.approx(summary["mtil_average"], abs=1e-12)
    gates = summary["gate_matrix"]  # every test set is scored through the Gaussians once one task is learned
    assert all(0.0 <= v <= 1.0 for row in gates for v in row)
    assert summary["gate_learned_mean"] == pytest.approx((gates[0][0] + gates[1][0] + gates[1][1]) / 3, abs=1e-12)
    assert summary["gate_unlearned_mean"] == pytest.approx(gates[0][1], abs=1e-12)
    assert logged["gate_learned_mean"] == pytest.approx(summary["gate_learned_mean"], abs=1e-12)


def test_zeroshot_reads_no_data_and_every_row_is_the_frozen_model(ray_session, tmp_path):
    config = run_config(
        tmp_path, dcil_stream(tmp_path), backbone={"name": "open_clip:strata-tiny-clip"}, tracking={"enabled": False}
    )
    config["stream"]["scenario"] = "dcil"
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "stream.yaml"), str(REPO / "configs/methods/zeroshot.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert matrix[0] == matrix[1] and None not in matrix[0]
    assert summary["samples_seen"] == [0, 0] and summary["memory_bytes"] == [0, 0]
    assert summary["forgetting"] == 0.0 and summary["mlflow_run_id"] is None


@pytest.mark.parametrize(
    "method,backbone",
    # one mask method through Ray; every method's restore, task-id invariance and inference: test_contract.py
    [("mask_rkr", None)],
)
def test_mask_methods_til_end_to_end_with_task_inference(ray_session, tmp_path, method, backbone):
    tasks = [
        blobs_task("m0", classes=4, rows=32, seed=21, subset=[0, 1]),
        blobs_task("m1", classes=4, rows=32, seed=22, subset=[2, 3]),
    ]
    sections = {"data": {"rows_per_chunk": 8, "image_size": 32 if backbone else 16}, "tracking": {"enabled": False}}
    if backbone:
        sections["backbone"] = backbone
    config = run_config(tmp_path, tasks, **sections)
    config["stream"]["scenario"] = "til"
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(
        main,
        ["run", str(tmp_path / "stream.yaml"), str(REPO / f"configs/methods/{method}-single-pass.yaml"),
         "--set", "method.task_inference=true", "--set", "train.batch_size=8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["method"] == method and summary["samples_seen"] == [16, 16]
    for key in ("accuracy_matrix", "cil_accuracy_matrix", "task_inference_matrix"):
        assert all((v is not None) == (j <= i) for i, row in enumerate(summary[key]) for j, v in enumerate(row)), key
    for key in ("last_acc", "cil_last_acc", "task_inference_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["accuracy_matrix"][1][0] == summary["accuracy_matrix"][0][0]  # til: no forgetting by construction
    assert all(steps >= 2 for steps in summary["steps"])
    if method in ("piggyback", "mask_rkr"):
        assert all(0.0 <= stats["masked_off"] <= 1.0 for stats in summary["task_stats"])
