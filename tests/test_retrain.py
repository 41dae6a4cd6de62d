"""Retraining on arrival: landing zone, ledger claims, continuing a stream, registry, predict."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import validate_config
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.memory import Ledger, MemoryStore, TaskRecord
from pipeline.memory import ledger as ledger_module
from pipeline.memory.ledger import LeaseLost
from pipeline.memory.store import safe_name
from pipeline.ops import retraining as retrain_module
from pipeline.ops import scan
from pipeline.run import run

from conftest import REPO, blobs_task, run_config


def _load_land_digits():
    spec = importlib.util.spec_from_file_location("land_digits", REPO / "deploy" / "land_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.land_digits


land_digits = _load_land_digits()  # the walk-through's uploader (deploy/README.md), real digits


def land(landing: Path, folder: str, digits: list[int], *, ready: bool) -> Path:
    return Path(land_digits(str(landing), folder, digits, ready=ready))


# Landed ids that share their first 60 characters (an uploader's long prefix): the ledger and the
# store name files after task ids, and two such ids must never share a file.
PREFIX = "scanner-07-of-the-north-building-digits-batches-landed-daily-"
FIRST, SECOND, THIRD = (PREFIX + day for day in ("2026-11-01", "2026-11-08", "2026-11-15"))


def model_config(tmp_path: Path) -> Path:
    cfg = run_config(tmp_path, [], data={"image_size": 16}, memory={"uri": str(tmp_path / "model" / "memory")})
    cfg["output_dir"] = str(tmp_path / "model")
    path = tmp_path / "model.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_scan_orders_by_ready_time_lists_incomplete_and_names_bad_manifests(tmp_path):
    landing = tmp_path / "landing"
    land(landing, "b-first", [0, 1], ready=True)
    second = land(landing, "a-second", [2, 3], ready=True)
    (second / "task.yaml").write_text(json.dumps({**yaml.safe_load((second / "task.yaml").read_text()), "id": "twos-threes"}))
    land(landing, "c-partial", [4, 5], ready=False)
    os.utime(landing / "b-first/_READY", (1000, 1000))
    os.utime(landing / "a-second/_READY", (2000, 2000))
    complete, incomplete = scan(str(landing))
    assert [t.task.id for t in complete] == ["b-first", "twos-threes"]
    assert complete[0].task.train.path == str(landing / "b-first/train.parquet")
    assert incomplete == [str(landing / "c-partial")]

    (landing / "c-partial/task.yaml").write_text(
        json.dumps({"train": {"type": "parquet"}, "test": {"type": "parquet", "path": "t"}})
    )
    (landing / "c-partial/_READY").touch()
    with pytest.raises(ConfigError, match=r"c-partial/task.yaml: train.parquet.path: Field required"):
        scan(str(landing))
    (landing / "c-partial/task.yaml").write_text(
        json.dumps({"id": "b-first", **yaml.safe_load((landing / "b-first/task.yaml").read_text())})
    )
    with pytest.raises(DataError, match=r"c-partial/task.yaml: task id 'b-first' already used by .*b-first"):
        scan(str(landing))


CLAIM = "import sys; from pipeline.memory.ledger import Ledger; print(Ledger(sys.argv[1]).claim('task-a', sys.argv[2]))"


def test_ledger_claim_is_won_by_exactly_one_process(tmp_path):
    racers = [
        subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path / "store"), f"p{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    won = [p.communicate()[0].strip() == "True" for p in racers]
    assert sum(won) == 1
    ledger = Ledger(str(tmp_path / "store"))
    assert ledger.claim_of("task-a")["owner"] == f"p{won.index(True)}"
    ledger.release("task-a")
    assert ledger.claim("task-a", "later")
    ledger.complete("task-a", {"position": 0})
    with pytest.raises(StoreError, match="is learned; its claim stays"):
        ledger.release("task-a")


def test_task_ids_that_share_60_characters_keep_files_of_their_own(tmp_path):
    assert safe_name("2026-11-01") == "2026-11-01"  # a short plain id is its own name
    ids = [FIRST, SECOND, THIRD, "a b", "a_b", "a/b", "x" * 128, "x" * 127]
    assert len({safe_name(i) for i in ids}) == len(ids)
    assert all(len(safe_name(i)) <= 60 for i in ids)
    ledger = Ledger(str(tmp_path / "store"))
    assert ledger.claim(FIRST, "p") and ledger.claim(SECOND, "p")  # the second is not taken for the first's
    ledger.complete(FIRST, {"position": 0})
    assert ledger.done(SECOND) is None
    ledger.complete(SECOND, {"position": 1})
    assert [r["task_id"] for r in ledger.learned()] == [FIRST, SECOND]
    assert ledger.done(FIRST)["position"] == 0 and ledger.done(SECOND)["position"] == 1
    store = MemoryStore(str(tmp_path / "store"))
    for k, task_id in enumerate((FIRST, SECOND)):
        store.append(TaskRecord({"x": torch.full((1,), float(k))}), task_index=k, task_id=task_id, method="ncm", backbone_id="b")
    assert [r.tensors["x"].item() for r in store.load_all(backbone_id="b")] == [0.0, 1.0]


def test_claims_are_exclusive_creates_on_an_object_store_filesystem(monkeypatch):
    uri = f"memory://ledger-{uuid.uuid4().hex}/store"
    first, second = Ledger(uri), Ledger(uri)
    assert first.claim("t", "a")
    assert not second.claim("t", "b")  # a live claim
    monkeypatch.setattr(second, "claim_of", lambda task_id: None)  # b read the ledger before a published: a race
    assert not second.claim("t", "b")  # the exclusive create of generation 0 fails on the object store
    assert first.claim_of("t")["owner"] == "a"

    class OldS3(type(first.fs)):
        __module__ = "s3fs.core"

    monkeypatch.setattr(ledger_module, "version", lambda package: "2025.5.1")
    monkeypatch.setattr(first, "fs", OldS3())
    with pytest.raises(StoreError, match=r"s3fs 2025.5.1 overwrites on open\(mode='xb'\); claims need s3fs>=2025.7.0"):
        first.claim("u", "a")


def test_a_claim_lives_while_renewed_and_is_taken_over_once_its_lease_expires(tmp_path, caplog):
    ledger = Ledger(str(tmp_path / "store"), lease_s=0.6)
    assert ledger.claim("t", "alive")
    with ledger.hold("t", "alive"):  # renewed every 0.2 s: outlives its 0.6 s lease
        time.sleep(1.5)
        assert not ledger.claim("t", "rival")
    assert ledger.claim_of("t")["owner"] == "alive" and ledger.claim_of("t")["generation"] == 0
    time.sleep(0.7)  # no renewal: the lease expires
    with caplog.at_level("WARNING", logger="strata"):
        assert ledger.claim("t", "rival")
    assert "took over the claim of alive" in caplog.text
    assert ledger.claim_of("t")["owner"] == "rival" and ledger.claim_of("t")["generation"] == 1
    with pytest.raises(LeaseLost, match="the claim of alive is gone \\(now held by rival\\)"):
        ledger.renew("t", "alive")
    ledger.release("t")
    assert ledger.claim_of("t") is None


STALLING_RETRAINER = """
import json, sys, time
from pathlib import Path
from pipeline.config import validate_config
from pipeline.ops import retraining

def learn_forever(cfg, landing, folder, task, before, owner):
    Path(sys.argv[3]).write_text(task["id"])
    time.sleep(600)

retraining._learn = learn_forever
retraining.retrain(validate_config(json.loads(Path(sys.argv[1]).read_text())), sys.argv[2], "m", lease_s=1.5)
"""


def test_a_killed_retrainers_task_is_taken_over_after_its_lease_and_learned_once_in_order(tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    for k, folder in enumerate(["t0", "t1", "t2"]):
        land(landing, folder, [2 * k, 2 * k + 1], ready=True)
        os.utime(landing / folder / "_READY", (1000 + k, 1000 + k))
    marker = tmp_path / "learning"
    victim = subprocess.Popen([sys.executable, "-c", STALLING_RETRAINER, str(model_config(tmp_path)), str(landing), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and victim.poll() is None, "the retrainer never started its first task"
        time.sleep(0.1)
    victim.kill()  # SIGKILL, like the OOM killer: no cleanup, the claim on t0 stays
    victim.wait()
    ledger = Ledger(str(tmp_path / "model" / "memory"))
    dead_claim = ledger.claim_of("t0")
    assert dead_claim is not None and ledger.done("t0") is None
    learned: list[tuple[str, list[str]]] = []

    def fake_learn(cfg, landing_uri, folder, task, before, owner):
        learned.append((task["id"], [r["task_id"] for r in before]))
        return {"position": len(before), "task": task, "accuracy_row": [1.0], "model_version": None, "owner": owner}

    monkeypatch.setattr(retrain_module, "_learn", fake_learn)
    cfg = validate_config(json.loads(model_config(tmp_path).read_text()))
    time.sleep(max(0.0, dead_claim["expires"] - time.time()) + 0.1)
    report = retrain_module.retrain(cfg, str(landing), "m", lease_s=1.5)
    assert not report.stalled
    assert learned == [("t0", []), ("t1", ["t0"]), ("t2", ["t0", "t1"])]
    assert ledger.claim_of("t0")["generation"] == 1 and ledger.claim_of("t1")["generation"] == 0
    assert [r["task_id"] for r in ledger.learned()] == ["t0", "t1", "t2"]


def test_retrain_stopped_by_a_live_claim_exits_3_with_the_holder(tmp_path):
    landing = tmp_path / "landing"
    land(landing, "t0", [0, 1], ready=True)
    Ledger(str(tmp_path / "model" / "memory")).claim("t0", "host:1:other")
    result = CliRunner().invoke(
        main, ["retrain", "--landing", str(landing), "--model", "m", "--config", str(model_config(tmp_path))]
    )
    assert result.exit_code == 3, result.output
    assert result.output.strip().splitlines()[-1].startswith("stalled: task t0 is claimed by host:1:other (lease until ")


def test_concurrent_retrainers_learn_each_task_once_in_order(tmp_path, monkeypatch):
    """Two retrainers at once over three landed tasks (training replaced by a slow stand-in)."""
    landing = tmp_path / "landing"
    for k, folder in enumerate(["t0", "t1", "t2"]):
        land(landing, folder, [2 * k, 2 * k + 1], ready=True)
        os.utime(landing / folder / "_READY", (1000 + k, 1000 + k))
    learned: list[tuple[str, list[str]]] = []

    def fake_learn(cfg, landing_uri, folder, task, before, owner):
        learned.append((task["id"], [r["task_id"] for r in before]))
        time.sleep(0.2)
        return {"position": len(before), "task": task, "accuracy_row": [1.0], "model_version": None, "owner": owner}

    monkeypatch.setattr(retrain_module, "_learn", fake_learn)
    cfg = validate_config(json.loads(model_config(tmp_path).read_text()))
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(retrain_module.retrain(cfg, str(landing), "m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert learned == [("t0", []), ("t1", ["t0"]), ("t2", ["t0", "t1"])]
    assert sorted(len(r.trained) for r in reports) in ([0, 3], [1, 2])
    again = retrain_module.retrain(cfg, str(landing), "m")
    assert again.trained == [] and again.learned_before == ["t0", "t1", "t2"]
    assert [r["task_id"] for r in Ledger(str(tmp_path / "model" / "memory")).learned()] == ["t0", "t1", "t2"]


@pytest.mark.ray  # run() starts a local Ray before it reads the store
def test_resume_checks_the_store_against_the_stream_before_anything_runs(tmp_path):
    cfg = run_config(tmp_path, [blobs_task("a"), blobs_task("b", seed=1)])
    store = MemoryStore(str(tmp_path / "out" / "memory"))
    from pipeline.backbones import create_backbone

    backbone_id = create_backbone(validate_config(cfg).backbone).backbone_id
    store.append(TaskRecord({"x": torch.zeros(1)}), task_index=0, task_id="a", method="ncm", backbone_id=backbone_id)
    with pytest.raises(StoreError, match="already holds 1 records.*memory.resume=true"):
        run(validate_config(cfg))
    cfg["memory"] = {"resume": True}
    with pytest.raises(StoreError, match=r"0000-a.safetensors: made by method ncm, not finetune"):
        run(validate_config({**cfg, "method": {"name": "finetune"}}))
    with pytest.raises(StoreError, match=r"record 1 is task 'a', but stream task 0 is 'z'"):
        run(validate_config({**cfg, "stream": {"scenario": "cil", "tasks": [blobs_task("z"), blobs_task("b")]}}))
    with pytest.raises(ConfigError, match="already holds all 1 tasks"):
        run(validate_config({**cfg, "stream": {"scenario": "cil", "tasks": [blobs_task("a")]}}))
    assert store.version == 1


def test_retrain_twice_learns_the_complete_task_once_and_predict_matches_evaluation(ray_session, tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    retrain_args = [
        "retrain",
        "--landing",
        str(landing),
        "--model",
        "digits",
        "--config",
        str(REPO / "configs/retrain.yaml"),
        "--set",
        f"output_dir={tmp_path / 'model'}",
        "--set",
        f"memory.uri={tmp_path / 'model' / 'memory'}",
        "--set",
        f"tracking.uri={tracking}",
        "--set",
        "tracking.experiment=tests",
        "--set",
        "train.num_workers=1",
    ]  # fmt: skip  (one worker: the suite has enough two-worker fits)

    land(landing, FIRST, [0, 1], ready=True)
    first = runner.invoke(main, retrain_args)
    assert first.exit_code == 0, first.output
    assert f"learned {FIRST}: version 1" in " ".join(first.output.split())  # the console wraps a long id

    (landing / FIRST / "train.parquet").unlink()  # a learned task's training data may go: its plan is in the store
    land(landing, SECOND, [2, 3], ready=True)
    land(landing, THIRD, [4, 5], ready=False)  # still uploading
    second = runner.invoke(main, retrain_args)
    third = runner.invoke(main, retrain_args)
    assert second.exit_code == 0 and third.exit_code == 0, second.output + third.output
    assert f"learned {SECOND}: version 2" in " ".join(second.output.split()) and "waiting for _READY" in second.output
    assert "nothing new to learn" in third.output and f"learned {PREFIX}" not in third.output

    client = MlflowClient(tracking)
    versions = sorted(client.search_model_versions("name = 'digits'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    latest = versions[-1]
    assert latest.tags["strata.task_id"] == SECOND and latest.tags["strata.stream_position"] == "2"
    assert latest.tags["strata.memory_version"] == "2"
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert sorted(r.data.tags["strata.retrain.task"] for r in runs) == [FIRST, SECOND]  # each trained once
    store = MemoryStore(str(tmp_path / "model" / "memory"))
    assert [e.task_id for e in store.entries()] == [FIRST, SECOND]
    assert all(e.plan is not None and e.plan["train"]["num_samples"] > 0 for e in store.entries())
    shown = runner.invoke(main, ["memory", "show", str(tmp_path / "model" / "memory"), "--json"])
    assert shown.exit_code == 0 and [e["task_id"] for e in json.loads(shown.output)] == [FIRST, SECOND]

    summary = json.loads((tmp_path / "model" / f"0001-{SECOND}" / "summary.json").read_text())
    assert summary["samples_seen"][0] == 0  # the first task was restored from the store, not trained again
    assert summary["accuracy_matrix"][0][0] == Ledger(store.uri).done(FIRST)["accuracy_row"][0]
    out = tmp_path / "preds"
    test_table = pq.read_table(landing / SECOND / "test.parquet")
    predicted = runner.invoke(
        main,
        ["predict", "--model", "digits/2", str(landing / SECOND / "test.parquet"), "--out", str(out), "--tracking-uri", tracking],
    )
    assert predicted.exit_code == 0, predicted.output
    assert out.is_dir() and list(out.glob("*.parquet"))  # parts written by the scoring tasks
    preds = pq.read_table(out).sort_by("row").to_pydict()
    assert preds["row"] == list(range(test_table.num_rows))
    assert preds["label"] == test_table.column("label").to_pylist()  # each row's own label
    assert preds["error"] == [None] * test_table.num_rows
    accuracy = np.mean([p == c for p, c in zip(preds["pred_class"], preds["label_class"], strict=True)])
    assert accuracy == pytest.approx(summary["accuracy_matrix"][1][1], abs=1e-12)
    assert set(preds["pred_class"]) <= {"0", "1", "2", "3"}
    again = runner.invoke(
        main,
        ["predict", "--model", "digits/2", str(landing / SECOND / "test.parquet"), "--out", str(out), "--tracking-uri", tracking],
    )
    assert again.exit_code == 2 and "exists and is not an empty directory" in again.output  # never mixed with older parts

    # A corrupt image is a null prediction with its reason, and a count; every other row is scored as before.
    corrupt = test_table.set_column(
        0,
        "image",
        pa.array([b"not an image" if i == 3 else b for i, b in enumerate(test_table.column("image").to_pylist())], pa.binary()),
    )
    pq.write_table(corrupt.replace_schema_metadata(test_table.schema.metadata), tmp_path / "corrupt.parquet", row_group_size=16)
    predicted = runner.invoke(
        main,
        [
            "predict",
            "--model",
            "digits/2",
            str(tmp_path / "corrupt.parquet"),
            "--out",
            str(tmp_path / "preds-corrupt"),
            "--tracking-uri",
            tracking,
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    assert "1 of them null" in predicted.stderr
    damaged = pq.read_table(tmp_path / "preds-corrupt").sort_by("row").to_pydict()
    assert damaged["pred"][3] is None and damaged["pred_class"][3] is None and damaged["score"][3] is None
    assert "corrupt.parquet row group 0 row 3: cannot decode image" in damaged["error"][3]
    keep = [i for i in range(test_table.num_rows) if i != 3]
    assert [damaged["pred_class"][i] for i in keep] == [preds["pred_class"][i] for i in keep]
    assert [damaged["error"][i] for i in keep] == [None] * len(keep)

    # The same version as an MLflow pyfunc that holds data only, loaded after strata's check of it.
    import mlflow.artifacts
    import pandas as pd

    from pipeline.serve.pyfunc import load

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    pyfunc = load("models:/digits/2")
    images = pq.read_table(landing / SECOND / "test.parquet").column("image").to_pylist()
    frame = pyfunc.predict(pd.DataFrame({"image": images}))
    assert frame["pred_class"].tolist() == preds["pred_class"] and frame["pred"].tolist() == preds["pred"]
    assert frame["score"].tolist() == pytest.approx(preds["score"], abs=1e-6)
    model_files = Path(mlflow.artifacts.download_artifacts(f"{versions[-1].source}", dst_path=str(tmp_path / "v2")))
    assert not [p for p in model_files.rglob("*") if p.suffix in (".py", ".pkl", ".pickle", ".cloudpickle")]
    gate = versions[-1].tags.get("strata.champion_gate") or client.get_model_version("digits", "2").tags["strata.champion_gate"]
    champion = str(client.get_model_version_by_alias("digits", "champion").version)
    assert (
        champion == ("2" if gate.startswith("passed") else "1")
        and str(client.get_model_version_by_alias("digits", "latest-task").version) == "2"
    )

    folder = tmp_path / "new-images"  # a plain folder of images, no labels
    folder.mkdir()
    for i, image in enumerate(pq.read_table(landing / SECOND / "test.parquet").column("image").to_pylist()[:3]):
        (folder / f"img{i}.png").write_bytes(image)
    predicted = runner.invoke(
        main,
        [
            "predict",
            "--model",
            "digits@latest-task",
            str(folder),
            "--out",
            str(tmp_path / "preds-folder"),
            "--tracking-uri",
            tracking,
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    from_folder = pq.read_table(tmp_path / "preds-folder").to_pydict()
    by_name = {
        Path(p).name: (c, s) for p, c, s in zip(from_folder["path"], from_folder["pred_class"], from_folder["score"], strict=True)
    }
    assert by_name == {f"img{i}.png": (preds["pred_class"][i], pytest.approx(preds["score"][i], abs=1e-6)) for i in range(3)}
    predicted = runner.invoke(
        main, ["predict", "--model", "digits", str(folder), "--out", str(tmp_path / "preds-champion"), "--tracking-uri", tracking]
    )
    assert predicted.exit_code == 0 and f"by digits version {champion} " in predicted.stdout  # NAME alone: @champion
    assert ("is not champion: failed" in predicted.stderr) == (champion == "1")


def test_watch_looks_again_after_the_interval_and_learns_what_landed_meanwhile(tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    land(landing, "t0", [0, 1], ready=True)
    monkeypatch.setattr(
        retrain_module,
        "_learn",
        lambda cfg, uri, folder, task, before, owner: {
            "position": len(before),
            "task": task,
            "accuracy_row": [1.0],
            "model_version": None,
        },
    )
    cfg = validate_config(json.loads(model_config(tmp_path).read_text()))
    reports = []

    def on_report(report):
        reports.append([r["task_id"] for r in report.trained])
        if len(reports) == 1:
            land(landing, "t1", [2, 3], ready=True)

    retrain_module.watch(cfg, str(landing), "m", interval_s=0.01, iterations=3, on_report=on_report)
    assert reports == [["t0"], ["t1"], []]


def test_predict_candidates_follow_the_model_scenario():
    from pipeline.serve.predict import candidates_for
    from pipeline.serve import ModelCard

    tasks = [{"id": "a", "classes": [0, 1], "domain": None}, {"id": "b", "classes": [2, 3], "domain": None}]
    card = ModelCard(config={}, backbone_id="x", memory_store="m", memory_version=2, scenario="til", label_space="task",
                     image_size=16, tasks=tasks, class_names=["0", "1", "2", "3"], records_sha256=["a" * 64, "b" * 64], weights_sha256={})  # fmt: skip
    assert candidates_for(card, "b", infers_tasks=False) == (c := candidates_for(card, "b", infers_tasks=True))
    assert c.classes == (2, 3) and c.task_index == 1 and not c.infer_tasks
    inferred = candidates_for(card, None, infers_tasks=True)
    assert inferred.classes == (0, 1, 2, 3) and inferred.infer_tasks
    with pytest.raises(ConfigError, match="needs the task of the images: give --task ID"):
        candidates_for(card, None, infers_tasks=False)
    with pytest.raises(ConfigError, match="--task z: not a task of this model version"):
        candidates_for(card, "z", infers_tasks=False)
    cil = ModelCard(**{**card.__dict__, "scenario": "cil", "label_space": "seen"})
    assert candidates_for(cil, None, infers_tasks=False).classes == (0, 1, 2, 3)


def test_registration_is_idempotent_and_the_card_pins_the_records(tmp_path):
    """A task registered, then its worker restarted before the version reached a checkpoint:
    registering again finds the same version; a store trained again no longer serves it."""
    from pipeline.backbones import create_backbone
    from pipeline.data.stream import resolve_stream
    from pipeline.serve.predict import load_model
    from pipeline.tracking import TrackedRun
    from pipeline.serve import load_version
    from pipeline.config import with_absolute_paths
    from pipeline.train.progress import Progress, make_phases
    from pipeline.train.registration import register_finished

    cfg = with_absolute_paths(validate_config(run_config(tmp_path, [blobs_task("a"), blobs_task("b", seed=1)], tracking={
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests", "model_name": "m"})))  # fmt: skip
    plan = resolve_stream(cfg.stream, 64)
    backbone = create_backbone(cfg.backbone)
    store = MemoryStore(cfg.memory_uri)
    for i, task in enumerate(plan.tasks):
        means = torch.full((2, backbone.feature_dim), float(i))
        store.append(TaskRecord({"classes": torch.tensor([2 * i, 2 * i + 1]), "means": means, "counts": torch.ones(2, dtype=torch.int64)}),
                     task_index=i, task_id=task.id, method="ncm", backbone_id=backbone.backbone_id)  # fmt: skip
    run = TrackedRun.start(cfg.tracking)
    phases = make_phases(2, joint=False)
    progress = Progress(2, phases_done=2, records=2, accuracy_matrix=[[0.5, None], [0.5, 0.5]])
    register_finished(run, cfg, plan, phases, progress, store, backbone.backbone_id, backbone.input_spec.size, "seen")
    assert progress.model_versions == ["1", "2"]
    progress.model_versions = [None, None]  # as a restarted worker sees it
    register_finished(run, cfg, plan, phases, progress, store, backbone.backbone_id, backbone.input_spec.size, "seen")
    assert progress.model_versions == ["1", "2"]
    assert len(MlflowClient(cfg.tracking.uri).search_model_versions("name = 'm'")) == 2
    card = load_version(cfg.tracking.uri, "m/2").card
    assert card.records_sha256 == [e.sha256 for e in store.entries()]
    assert (card.backbone_id, card.image_size) == (backbone.backbone_id, backbone.input_spec.size)
    load_model(card)
    store.truncate(1)  # the second task trained again: another record under the same version number
    store.append(TaskRecord({"classes": torch.tensor([2, 3]), "means": torch.zeros(2, backbone.feature_dim), "counts": torch.ones(2, dtype=torch.int64)}),
                 task_index=1, task_id="b", method="ncm", backbone_id=backbone.backbone_id)  # fmt: skip
    with pytest.raises(StoreError, match="the store no longer holds this version"):
        load_model(card)
    load_model(load_version(cfg.tracking.uri, "m/1").card)  # the first version's record is untouched


def test_champion_moves_only_to_a_version_that_passes_the_regression_gate(tmp_path):
    """@latest-task follows every version; @champion only one whose mean accuracy on the
    champion's tasks is within champion_tolerance points; a failed version says why."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking import TrackedRun
    from pipeline.serve import ModelCard, champion_lag, load_version, promote, register_version
    from pipeline.serve.registry import ACCURACY_TAG, gate
    from pipeline.serve.pyfunc import LOADER_MODULE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun.start(TrackingConfig(uri=uri, experiment="tests"))
    client = MlflowClient(uri)

    def version(n: int, accuracy: dict[str, float]) -> str:
        card = ModelCard(config={"backbone": {"key_remap": None}}, backbone_id="b", memory_store=str(tmp_path / "m"), memory_version=n,
                         scenario="cil", label_space="seen", image_size=16, tasks=[{"id": t, "classes": [], "domain": None} for t in accuracy],
                         class_names=[], records_sha256=[f"{i}" for i in range(1, n + 1)], weights_sha256={})  # fmt: skip
        tags = {"strata.memory_store": card.memory_store, "strata.memory_version": str(n), "strata.record_sha256": f"{n}",
                ACCURACY_TAG: json.dumps(accuracy)}  # fmt: skip
        v = register_version(uri, run.run_id, "m", card, tags, LOADER_MODULE)
        promote(uri, "m", v, accuracy, tolerance=2.0)
        return v

    def alias(name: str) -> str:
        return str(client.get_model_version_by_alias("m", name).version)

    assert version(1, {"a": 0.90}) == "1" and alias("champion") == alias("latest-task") == "1"
    assert version(2, {"a": 0.87, "b": 0.99}) == "2"  # 87 < 90 - 2 on task a: forgot too much
    assert (alias("champion"), alias("latest-task")) == ("1", "2")
    assert client.get_model_version("m", "2").tags["strata.champion_gate"] == (
        "failed: mean accuracy on the champion's 1 task(s) 87.00 vs 90.00 (tolerance 2 points) of version 1"
    )
    assert version(3, {"a": 0.88, "b": 0.70, "c": 0.95}) == "3"  # 88 >= 90 - 2
    assert (alias("champion"), alias("latest-task")) == ("3", "3")
    assert (
        client.get_model_version("m", "3")
        .tags["strata.champion_gate"]
        .startswith("passed: mean accuracy on the champion's 1 task(s) 88.00")
    )
    promote(uri, "m", "3", {"a": 0.88, "b": 0.70, "c": 0.95}, tolerance=2.0)  # a retried registration changes nothing
    assert alias("champion") == "3"
    assert version(4, {"a": 0.88, "b": 0.60, "c": 0.94}) == "4"  # mean over a, b, c: 80.7 vs 84.3
    assert alias("champion") == "3" and load_version(uri, "m").version == "3"  # predict's default is @champion
    assert load_version(uri, "m@latest-task").version == "4" and load_version(uri, "m/2").version == "2"
    assert champion_lag(uri, load_version(uri, "m")) == (
        "m@champion is version 3 (3 tasks); the newest, version 4 (@latest-task), is not champion: failed: mean accuracy "
        "on the champion's 3 task(s) 80.67 vs 84.33 (tolerance 2 points) of version 3"
    )
    assert champion_lag(uri, load_version(uri, "m/4")) is None
    assert gate({"a": 0.9}, {"b": 0.9}, 2.0) == (False, "failed: no accuracy on the champion's task(s) a")
    assert gate({}, {"b": 0.9}, 2.0)[0]  # a champion set by hand, without an accuracy tag, does not block
    assert gate({"a": 0.5, "b": 0.7}, {"a": 0.48, "b": 0.7}, 2.0)[0]  # 59 >= 60 - 2, exactly at the edge too
