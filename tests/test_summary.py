"""The run's summary as one typed object: summary.json's contract, read back exactly, and the
final metrics MLflow gets, computed by hand for a 2-task run."""

from __future__ import annotations

import json

import pytest
from conftest import blobs_task, run_config, two_task_plan

from pipeline import jsonout
from pipeline.config import validate_config
from pipeline.memory import MemoryStore
from pipeline.run.summary import RunSummary
from pipeline.train.progress import Progress

# summary.json's fields for a run with one eval stat ("gate") and task inference (docs/architecture.md)
JSON_FIELDS = {
    "tasks", "accuracy_matrix", "scored_rows", "avg_acc", "last_acc", "forgetting", "bwt", "transfer", "mtil_average",
    "transfer_per_task", "samples_seen", "memory_bytes", "memory_store", "wall_s", "mlflow_run_id", "config", "method",
    "scenario", "backbone_id", "class_names", "train_loss", "phase_wall_s", "train_wall_s", "model_name", "model_versions",
    "steps", "resumes", "task_stats", "gate_matrix", "gate_learned_mean", "gate_unlearned_mean", "cil_accuracy_matrix",
    "cil_avg_acc", "cil_last_acc", "task_inference_matrix", "task_inference_acc",
}  # fmt: skip


def summary_of_two_tasks(tmp_path) -> RunSummary:
    cfg = validate_config(run_config(tmp_path, [blobs_task("a", subset=[0, 1]), blobs_task("b", subset=[2, 3])]))
    progress = Progress(2, phases_done=2, records=2)
    progress.accuracy_matrix = [[0.9, 0.3], [0.7, 0.8]]
    progress.samples_seen, progress.train_loss, progress.steps = [64, 64], [0.5, float("nan")], [8, 8]
    progress.phase_wall_s, progress.train_wall_s = [2.0, 3.0], [1.0, 1.5]
    progress.task_stats = [{"masked_off": 0.25}, None]
    progress.record_eval_stats(0, 0, {"gate": 0.9})
    progress.record_eval_stats(0, 1, {"gate": 0.1})
    progress.record_eval_stats(1, 0, {"gate": 0.8})
    progress.record_eval_stats(1, 1, {"gate": 0.7})
    progress.cil_accuracy_matrix = [[0.6, None], [0.5, 0.4]]
    progress.task_inference_matrix = [[1.0, None], [0.75, 0.5]]
    return RunSummary.build(cfg, two_task_plan(), progress, MemoryStore(str(tmp_path / "memory")), None, 12.5)


def test_the_summary_computes_its_metrics_and_stats_by_hand(tmp_path):
    summary = summary_of_two_tasks(tmp_path)
    assert summary.tasks == ["a", "b"] and summary.scored_rows == [0, 1] and summary.method == "ncm"
    assert summary.avg_acc == pytest.approx((0.9 + (0.7 + 0.8) / 2) / 2, abs=1e-12)
    assert summary.last_acc == pytest.approx(0.75, abs=1e-12)
    assert summary.forgetting == pytest.approx(0.2, abs=1e-12) and summary.bwt == pytest.approx(-0.2, abs=1e-12)
    assert summary.transfer == summary.transfer_per_task[1] == 0.3 and summary.transfer_per_task[0] is None
    gate = summary.eval_stats["gate"]
    assert gate.learned_mean == pytest.approx((0.9 + 0.8 + 0.7) / 3, abs=1e-12) and gate.unlearned_mean == 0.1
    assert summary.task_inference is not None
    assert summary.task_inference.cil_last_acc == pytest.approx(0.45, abs=1e-12)
    assert summary.task_inference.task_inference_acc == pytest.approx(0.625, abs=1e-12)
    assert summary.memory_bytes == [None, None] and summary.backbone_id is None  # an empty store
    final = summary.final_metrics()
    assert final["gate_learned_mean"] == gate.learned_mean and final["gate_unlearned_mean"] == 0.1
    assert final["cil_last_acc"] == summary.task_inference.cil_last_acc and final["wall_s"] == 12.5
    assert summary.headline() == {
        "avg_acc": summary.avg_acc, "last_acc": 0.75, "forgetting": summary.forgetting, "bwt": summary.bwt, "mlflow_run_id": None,
    }  # fmt: skip


def test_summary_json_has_the_contract_fields_flat_and_reads_back_exactly(tmp_path):
    summary = summary_of_two_tasks(tmp_path)
    data = json.loads(jsonout.dumps(summary.to_json()))
    assert set(data) == JSON_FIELDS
    assert data["gate_matrix"] == [[0.9, 0.1], [0.8, 0.7]] and data["train_loss"] == [0.5, None]  # NaN is written as null
    back = RunSummary.from_json(data)
    assert back.to_json() == data and back.train_loss == [0.5, None]
    for name in RunSummary.model_fields.keys() - {"train_loss"}:
        assert getattr(back, name) == getattr(summary, name), name


def test_a_summary_without_stats_or_task_inference_has_neither_in_its_json(tmp_path):
    cfg = validate_config(run_config(tmp_path, [blobs_task("a", subset=[0, 1]), blobs_task("b", subset=[2, 3])]))
    summary = RunSummary.build(cfg, two_task_plan(), Progress(2), MemoryStore(str(tmp_path / "memory")), None, 1.0)
    data = summary.to_json()
    assert set(data) == {k for k in JSON_FIELDS if not k.startswith(("gate_", "cil_", "task_inference_"))}
    assert RunSummary.from_json(json.loads(jsonout.dumps(data))) == summary
