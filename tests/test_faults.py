"""Faults in real processes: a driver stopped by SIGINT, SIGTERM or SIGKILL in the middle of a
task, then the same command run again. No mocks: the driver is a ``strata run`` subprocess that
joins the session's Ray; the tests choose the moment of the fault with the ``pausing_counter``
method (it holds still inside task 2 while a file exists) instead of racing the run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main

from pipeline.memory import MemoryStore

import strata_test_methods  # noqa: F401  (registers pausing_counter in this process too)
from conftest import blobs_task, run_config, strata_process


def wait_for(condition: Any, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def pausing_config(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    pause = tmp_path / "pause"
    pause.touch()
    tasks = [blobs_task("a", rows=32), blobs_task("b", rows=32, seed=1)]
    config = run_config(tmp_path, tasks, method={"name": "pausing_counter", "pause_file": str(pause), "pause_task": 1})
    config["train"] |= {"num_workers": 2, "batch_size": 8}
    config["data"] = {"rows_per_chunk": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, pause


def reported(tmp_path: Path) -> bool:
    """Whether Train's own snapshot lists a checkpoint of the run in tmp_path/out."""
    return any("checkpoint_" in p.read_text() for p in (tmp_path / "out" / "ray").glob("*/checkpoint_manager_snapshot.json"))


def mlflow_runs(config: dict[str, Any]) -> list[Any]:
    client = MlflowClient(config["tracking"]["uri"])
    return client.search_runs([client.get_experiment_by_name("tests").experiment_id])


def test_a_driver_stopped_mid_task_again_and_again_continues_with_the_same_command(ray_session, tmp_path):
    """SIGINT, then SIGTERM, then SIGKILL, each while task 2 is under way; then the same command
    finishes the stream. A finished run is not repeated; --fresh starts over."""
    config, pause = pausing_config(tmp_path)
    store = MemoryStore(config["output_dir"] + "/memory")
    waiting = Path(f"{pause}.waiting")
    first_record = None
    for sig, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)]:
        waiting.unlink(missing_ok=True)
        driver = strata_process(ray_session, "run", str(tmp_path / "c.yaml"))
        # task 2 under way, and Train has registered task 1's checkpoint (it polls its workers)
        wait_for(lambda: (waiting.exists() and reported(tmp_path)) or driver.poll() is not None, f"task 2 before {sig.name}")  # noqa: B023
        assert driver.poll() is None and [e.task_id for e in store.verify()] == ["a"]
        first_record = first_record or store.entries()[0]
        driver.send_signal(sig)
        _, stderr = driver.communicate(timeout=120)
        assert driver.returncode == code, stderr
        state = json.loads((tmp_path / "out" / "run.json").read_text())
        (run,) = mlflow_runs(config)  # one MLflow run throughout
        if sig == signal.SIGKILL:  # no word from the driver: the folder and the MLflow run say "running"
            assert state["status"] == "running" and run.info.status == "RUNNING"
        else:
            assert (
                stderr.strip()
                .splitlines()[-1]
                .startswith(f"interrupted: {tmp_path / 'out'}: stopped by {sig.name}; 1 finished tasks")
            )
            assert state["status"] == "killed" and run.info.status == "KILLED"
        assert store.entries()[0] == first_record and not (tmp_path / "out" / "summary.json").exists()

    pause.unlink()
    again = strata_process(ray_session, "run", str(tmp_path / "c.yaml"))
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert store.entries()[0] == first_record  # task 1 was not learned again
    assert [e.task_id for e in store.entries()] == ["a", "b"]
    for i, record in enumerate(store.load_all()):  # every training sample of every task entered exactly once
        visits = record.tensors["visits"]
        assert int(visits.sum()) == 32 and int(visits.max()) == 1, f"task {i}"
    matrix = summary["accuracy_matrix"]
    assert all(v is not None for i, row in enumerate(matrix) for v in row[: i + 1])  # task 1's row came from its checkpoint
    (run,) = mlflow_runs(config)  # one MLflow run, continued, finished
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    # resumes counts the starts from a checkpoint behind the final state: runs 2 and 3 wrote none
    assert run.data.tags["strata.continued_at_task"] == "1" and summary["resumes"] == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "finished"

    runner = CliRunner()
    repeat = runner.invoke(main, ["run", str(tmp_path / "c.yaml")])
    assert repeat.exit_code == 2 and "this run has finished" in repeat.output and "--fresh" in repeat.output
    other = runner.invoke(main, ["run", str(tmp_path / "c.yaml"), "--set", "seed=3"])
    assert other.exit_code == 2 and "already holds 2 records" in other.output and "--fresh" in other.output


def test_fresh_forgets_the_run_file_the_train_checkpoint_and_the_store(tmp_path):
    from pipeline.config import validate_config, with_absolute_paths
    from pipeline.memory import TaskRecord
    from pipeline.run.driver import _open_run
    from pipeline.run.outputs import OutputDir
    from pipeline.run.run_state import RunState

    cfg = with_absolute_paths(validate_config(run_config(tmp_path, [blobs_task("a")])))
    out = Path(cfg.output_dir)
    store = MemoryStore(cfg.memory_uri)
    store.append(TaskRecord({"x": torch.zeros(1)}), task_index=0, task_id="a", method="ncm", backbone_id="b")
    old = RunState.new(cfg).with_status("killed").save(OutputDir(str(out)))
    (out / "ray" / old.train_run_name).mkdir(parents=True)
    (out / "ray" / "strata-someone-else").mkdir()
    state, continuing = _open_run(cfg, OutputDir(str(out)), store, fresh=False)
    assert continuing and state == old  # the same command continues
    state, continuing = _open_run(cfg, OutputDir(str(out)), store, fresh=True)
    assert not continuing and state.run_uid != old.run_uid and state.mlflow_run_id is None
    assert store.version == 0 and not (out / "run.json").exists()
    assert sorted(p.name for p in (out / "ray").iterdir()) == ["strata-someone-else"]


def test_a_worker_killed_mid_task_resumes_from_its_in_task_checkpoint_and_trains_each_sample_once(ray_session, tmp_path):
    """Rank 1 SIGKILLs itself at step 4 of the task; the group restarts from the step-2 checkpoint
    and reads only the rows that checkpoint does not hold."""
    from pipeline.config import validate_config
    from pipeline.run import run

    def config(name: str, kill_step: int) -> dict:
        cfg = run_config(tmp_path / name, [blobs_task("a", rows=48)], method={
            "name": "kill_at", "kill_task": 0, "kill_step": kill_step, "marker": str(tmp_path / name / "killed")})  # fmt: skip
        cfg["train"] |= {"num_workers": 2, "batch_size": 8, "checkpoint_every": 2, "max_failures": 1}
        cfg["data"] = {"rows_per_chunk": 8}
        return cfg

    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = run(validate_config(config("whole", kill_step=0)))
    killed = run(validate_config(config("killed", kill_step=4)))
    assert (tmp_path / "killed" / "killed").exists()  # the fault happened
    assert killed.samples_seen == whole.samples_seen == [48]
    assert killed.resumes == 1 and whole.resumes == 0
    store = MemoryStore(str(tmp_path / "killed" / "out" / "memory"))
    for task, record in enumerate(store.load_all()):  # every sample entered a gradient step once, restart or not
        visits = record.tensors["visits"]
        assert int(visits.sum()) == 48 and int(visits.max()) == 1, f"task {task}"
    reads = [line.split() for f in (tmp_path / "killed").glob("killed.reads.*") for line in f.read_text().splitlines()]
    reread = len(reads) - len({tuple(r) for r in reads})
    assert 0 < reread <= 16  # only rows trained after the step-2 checkpoint: steps 3 and 4 of 8 rows, at most
    # Predictions are NCM's: sums of the same rows in another order, so the matrices are equal up to
    # float64 rounding, i.e. exactly. (Two workers take blocks as they ask for them, so the probe's
    # batches, and its weights, differ between any two runs; its resume is bitwise in test_checkpoint.)
    assert killed.accuracy_matrix == whole.accuracy_matrix


def test_an_output_dir_in_object_storage_keeps_the_run_file_for_the_next_driver():
    """memory:// stands in for s3://: any fsspec filesystem that is not this node's disk."""
    import fsspec

    from pipeline.config import validate_config
    from pipeline.run.outputs import OutputDir
    from pipeline.run.run_state import RunState

    uri = f"memory://strata-tests/{os.getpid()}/out"
    first = OutputDir(uri)
    assert first.remote and RunState.load(first) is None
    state = RunState.new(validate_config(run_config(Path("/unused"), [blobs_task("a")]))).save(first)
    (first.local / "plot.png").write_bytes(b"png")
    first.publish("plot.png")
    fs = fsspec.filesystem("memory")
    assert fs.cat(f"{uri}/plot.png") == b"png" and json.loads(fs.cat(f"{uri}/run.json"))["run_uid"] == state.run_uid
    (first.local / "run.json").unlink()  # a driver on another node has no local copy
    assert RunState.load(OutputDir(uri)) == state
    first.remove("run.json")
    assert RunState.load(OutputDir(uri)) is None and not fs.exists(f"{uri}/run.json")
