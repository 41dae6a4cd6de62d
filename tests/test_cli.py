import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main


def test_methods_lists_every_method_with_its_scenarios():
    result = CliRunner().invoke(main, ["methods", "--json"])
    assert result.exit_code == 0
    listed = {row["name"]: set(row["scenarios"]) for row in json.loads(result.output)}
    assert {"finetune", "ncm", "joint", "l2p", "diki", "zeroshot"} <= set(listed)
    assert "cil" in listed["l2p"]
    assert {"dcil", "cil", "dil"} <= listed["diki"] and "dcil" in listed["zeroshot"]


def test_config_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("stream: {tasks: []}\ntrain: {batch_sise: 3}\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'c.yaml'}: train.batch_sise: Extra inputs are not permitted"
    ]


def test_rank_zero_posts_steps_at_most_every_interval_and_the_console_draws_each_finished_task():
    """The progress path without Ray: the poster asks for the loss (a host sync) only when it
    posts, and the console replaces a task's bar by one accuracy line."""
    from types import SimpleNamespace

    from rich.console import Console

    from pipeline.cli import _TaskBars
    from pipeline.train.live import ProgressPoster, Step, TaskDone, TaskStarted

    posted: list = []
    board = SimpleNamespace(post=SimpleNamespace(remote=posted.append))

    def no_loss() -> float:
        raise AssertionError("the loss was read for a step that is not posted")

    slow = ProgressPoster(board, interval_s=3600)
    slow.task_started(row=0, num_tasks=2, task_id="a", samples=64)
    slow.step(32, no_loss)
    assert posted == [TaskStarted(row=0, num_tasks=2, task_id="a", samples=64)]
    every = ProgressPoster(board, interval_s=0)
    every.step(32, lambda: 0.25)
    every.step(64, lambda: None)
    assert posted[1:] == [Step(samples=32, loss=0.25), Step(samples=64, loss=None)]
    every.task_finished(row=0, num_tasks=2, task_id="a", accuracy=[0.5, None], avg_seen_acc=0.5, loss=0.125, wall_s=1.25)
    assert posted[3] == TaskDone(0, 2, "a", (0.5, None), 0.5, 0.125, 1.25)
    ProgressPoster(None).step(1, no_loss)  # no board: nothing is asked for

    console = Console(record=True, width=200, force_terminal=False)
    with _TaskBars(console) as bars:
        for event in posted:
            bars.on_event(event)
    assert console.export_text().strip() == "task 1/2 a: accuracy on seen tasks 0.5000 [0.500]  loss 0.1250  1.2s"


@pytest.mark.parametrize(
    "job,argv",
    [
        ("continual_train", ["--config", "{missing}"]),
        ("sweep", ["--sweep", "{missing}"]),
        ("retrain", ["--config", "{missing}", "--landing", "{tmp}", "--model", "m"]),
    ],
)
def test_a_job_entrypoint_ends_bad_input_like_the_cli(job, argv, tmp_path, capsys):
    """The jobs/ entrypoints are the CLI's commands as Ray jobs: exit 2 and one line, before Ray starts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{job}", Path(__file__).parent.parent / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as exit_info:
        module.main([a.format(missing=missing, tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.yaml" in err[0]


def test_a_lost_progress_board_stops_the_live_view_not_the_run(monkeypatch, caplog):
    """The board's node may leave mid-run (it is pinned to the driver's, but that is Ray's to
    keep): the fit goes on to its result, the listener stops getting events, a warning says so."""
    import time

    import ray.exceptions

    from pipeline.run import session

    calls: list[int] = []

    def unreachable(board: object, listener: object) -> None:
        calls.append(1)
        raise ray.exceptions.ActorUnavailableError("the board's node is gone", None)

    class SlowFit:
        def fit(self) -> str:
            time.sleep(1.0)  # the main thread polls the board every 0.3 s meanwhile
            return "result"

    monkeypatch.setattr(session, "drain", unreachable)
    with caplog.at_level("WARNING", logger="strata"):
        assert session._fit_in_thread(SlowFit(), board=object(), on_progress=lambda event: None) == "result"
    assert calls == [1]  # asked once, then no more
    assert "live progress stopped (ActorUnavailableError); the run goes on" in caplog.text
