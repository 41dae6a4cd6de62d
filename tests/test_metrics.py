import pytest

from pipeline.eval import metrics

# A hand-made 3-task run. Row i = after task i.
A = [
    [0.9, None, None],
    [0.6, 0.8, None],
    [0.5, 0.7, 1.0],
]


def test_avg_acc_is_mean_of_row_means_over_seen_tasks():
    assert metrics.avg_acc(A) == pytest.approx((0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 1.0) / 3) / 3)


def test_last_acc():
    assert metrics.last_acc(A) == pytest.approx((0.5 + 0.7 + 1.0) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best 0.9 (after task 0) -> 0.5; task 1: best 0.8 -> 0.7
    assert metrics.forgetting(A) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_forgetting_takes_max_not_diagonal():
    a = [[0.5, None, None], [0.9, 0.9, None], [0.6, 0.8, 0.7]]
    assert metrics.forgetting(a) == pytest.approx(((0.9 - 0.6) + (0.9 - 0.8)) / 2)
    assert metrics.bwt(a) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.9)) / 2)


def test_bwt():
    assert metrics.bwt(A) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_transfer_needs_future_evaluations():
    assert metrics.transfer(A) is None
    zero_shot = [[0.9, 0.2, 0.1], [0.6, 0.8, 0.3], [0.5, 0.7, 1.0]]
    assert metrics.transfer(zero_shot) == pytest.approx((0.2 + (0.1 + 0.3) / 2) / 2)
    assert metrics.transfer_per_task(A) is None
    assert metrics.transfer_per_task(zero_shot) == [None, pytest.approx(0.2), pytest.approx((0.1 + 0.3) / 2)]


def test_mtil_average_uses_every_row():
    full = [[0.9, 0.2, 0.1], [0.6, 0.8, 0.3], [0.5, 0.7, 1.0]]
    assert metrics.mtil_average(full) == pytest.approx(
        ((0.9 + 0.6 + 0.5) / 3 + (0.2 + 0.8 + 0.7) / 3 + (0.1 + 0.3 + 1.0) / 3) / 3
    )
    assert metrics.mtil_average(A) is None


def test_single_task_and_missing_rows():
    assert metrics.forgetting([[0.7]]) is None
    assert metrics.bwt([[0.7]]) is None
    joint = [[None, None], [0.8, 0.6]]  # the upper bound fills only the last row
    assert metrics.last_acc(joint) == pytest.approx(0.7)
    assert metrics.avg_acc(joint) is None
    assert metrics.forgetting(joint) is None


def test_task_stats_flatten_to_mlflow_metrics_without_nones():
    from pipeline.train.progress import flat_stats

    stats = {"prompt_selection": [3, 0, 5], "key_cosine": 0.25, "masked_off": None, "parts": [0.5, None]}
    assert flat_stats(stats) == {
        "prompt_selection/0": 3.0,
        "prompt_selection/1": 0.0,
        "prompt_selection/2": 5.0,
        "key_cosine": 0.25,
        "parts/0": 0.5,
    }


def test_metrics_read_only_the_rows_eval_every_scored():
    assert (
        metrics.scored_rows(5, 1) == [0, 1, 2, 3, 4]
        and metrics.scored_rows(5, 2) == [1, 3, 4]
        and metrics.scored_rows(5, 9) == [4]
    )
    n = None
    a = [
        [n, n, n, n, n],
        [0.8, 0.6, 0.1, n, n],  # a zero-shot-style row: scored beyond the diagonal too
        [n, n, n, n, n],
        [0.7, 0.5, 0.9, 0.4, 0.2],
        [0.6, 0.5, 0.8, 0.3, 0.9],
    ]
    rows = metrics.scored_rows(5, 2)
    assert metrics.avg_acc(a) is None  # every row expected: unscored rows are holes
    assert metrics.avg_acc(a, rows) == pytest.approx((0.7 + 0.625 + 0.62) / 3)
    # j = 0, 1: max over rows 1 and 3; j = 2, 3: row 3 alone.
    assert metrics.forgetting(a, rows) == pytest.approx(((0.8 - 0.6) + (0.6 - 0.5) + (0.9 - 0.8) + (0.4 - 0.3)) / 4)
    assert metrics.bwt(a, rows) == pytest.approx(((0.5 - 0.6) + (0.3 - 0.4)) / 2)  # tasks 1 and 3 have their own row
    assert metrics.transfer(a, rows) is None  # task 3's column has one earlier scored row, row 1, and it is empty there
    b = [r[:] for r in a]
    b[1][3] = 0.25
    b[1][4] = 0.35
    assert metrics.transfer(b, rows) == pytest.approx((0.1 + 0.25 + (0.35 + 0.2) / 2) / 3)  # task 1: no earlier scored row
    assert metrics.transfer_per_task(b, rows) == [None, None, pytest.approx(0.1), pytest.approx(0.25), pytest.approx(0.275)]
    assert metrics.summarize(a, rows)["mtil_average"] is None and metrics.summarize(a, rows)["last_acc"] == pytest.approx(0.62)
