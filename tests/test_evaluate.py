import pytest
import torch

from pipeline.eval.evaluate import candidate_classes, evaluate_task
from pipeline.methods import LocalCollective, Method


def test_candidate_label_spaces():
    assert candidate_classes("task", (4, 5), num_seen=6) == [4, 5]
    assert candidate_classes("seen", (2, 3), num_seen=6) == [0, 1, 2, 3, 4, 5]
    assert candidate_classes("seen", (7, 8), num_seen=4) == [0, 1, 2, 3, 7, 8]  # a future task's own classes join


class Fixed(Method):
    """Logits that prefer class 3 over everything, then class 1."""

    scenarios = frozenset({"cil"})

    def __init__(self) -> None:
        self.collective = LocalCollective()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def training_step(self, batch):
        return None

    def end_task(self):
        raise NotImplementedError

    def restore(self, records):
        return None

    def predict(self, images, task_ids=None):
        return torch.tensor([[0.0, 2.0, 1.0, 3.0]]).expand(len(images), -1)


def test_argmax_is_over_the_candidates_only():
    batch = {"image": torch.zeros(4, 1), "label": torch.tensor([1, 1, 3, 2])}
    seen = evaluate_task(Fixed(), [batch], candidates=[0, 1, 2, 3], candidate_names=list("abcd"), task_index=0, task_aware=False)
    task = evaluate_task(Fixed(), [batch], candidates=[1, 2], candidate_names=list("bc"), task_index=0, task_aware=True)
    assert seen == 0.25  # always predicts 3
    assert task == 0.5  # among {1, 2} always predicts 1


def test_every_rank_reduces_every_declared_eval_stat_even_with_no_rows():
    """A rank whose share of a test set is empty never calls ``score``, so it has no stats; it
    must still make the same all-reduces as a rank that scored, or the ranks' collectives pair
    wrongly and hang (a gmm run on PACS photo's 2-chunk test split did)."""
    from types import SimpleNamespace

    from pipeline.eval.evaluate import reduce_eval_stats

    class Counting:
        rank, world_size = 0, 2

        def __init__(self, others: list[torch.Tensor]) -> None:
            self.calls, self.others = 0, others  # the other rank's sums, in the order it reduces them

        def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return tensor.add_(self.others[self.calls - 1])

    scored = {"exact_match": torch.tensor([3.0, 4.0], dtype=torch.float64)}  # 3 of this rank's 4 answers exact
    empty = Counting(others=[scored["exact_match"], torch.zeros(2, dtype=torch.float64)])
    method = SimpleNamespace(
        name="m", device=torch.device("cpu"), collective=empty, eval_stat_names=("exact_match", "similarity_match"),
        take_eval_stats=lambda: {},
    )  # fmt: skip
    assert reduce_eval_stats(method) == {"exact_match": 0.75, "similarity_match": None} and empty.calls == 2
    method.take_eval_stats = lambda: {"gate": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match="does not declare"):
        reduce_eval_stats(method)
