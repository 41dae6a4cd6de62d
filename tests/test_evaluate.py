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
