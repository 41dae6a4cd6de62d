"""LwF: distillation targets are the previous model's outputs, restored from its record after a
restart; at the first step of a task the distillation term vanishes; it keeps old outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig
from pipeline.methods import TaskInfo

from conftest import TINY_VIT, new_method

BACKBONE = create_backbone(BackboneConfig(**TINY_VIT))
FIRST = TaskInfo(index=0, id="a", classes=(0, 1), num_seen_classes=2, class_names=("0", "1"))
SECOND = TaskInfo(index=1, id="b", classes=(2, 3), num_seen_classes=4, class_names=("0", "1", "2", "3"))


def make(name: str = "lwf", **params):
    return new_method(name, BACKBONE, **params)


def batches(n: int, labels: tuple[int, ...], seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(6, 3, 16, 16, generator=g), "label": torch.tensor(labels * 3)} for _ in range(n)]


def learn(method, data) -> None:
    optimizer, _ = method.build_optimizer(len(data), 6)
    for batch in data:
        method.training_step(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def first_task_record():
    lwf = make()
    lwf.begin_task(FIRST)
    learn(lwf, batches(5, (0, 1), seed=1))
    return lwf, lwf.end_task()


def test_distillation_targets_are_the_previous_models_outputs_also_after_a_restart():
    lwf, record = first_task_record()
    previous = make("finetune")
    previous.restore([record])
    lwf.begin_task(SECOND)
    restarted = make()
    restarted.restore([record])  # a new worker: the previous model comes from the store
    restarted.begin_task(SECOND)
    x = batches(1, (2, 3), seed=2)[0]["image"]
    features = BACKBONE.features(x)
    assert lwf.distillation_targets(features).shape == (6, 2)
    assert torch.equal(lwf.distillation_targets(features), previous.predict(x))
    assert torch.equal(restarted.distillation_targets(features), previous.predict(x))
    assert make().distillation_targets(features) is None  # nothing to distil on a first task


def test_at_a_tasks_first_step_the_distillation_term_is_zero():
    lwf, _ = first_task_record()
    lwf.begin_task(SECOND)
    batch = batches(1, (2, 3), seed=3)[0]
    ce = F.cross_entropy(lwf.head(BACKBONE.features(batch["image"])), batch["label"])
    # The old rows of the head are the previous model's: the KL term is 0 up to the rounding of
    # two matrix products of different widths over the same rows.
    torch.testing.assert_close(lwf.training_step(batch), ce, rtol=0, atol=1e-6)


def test_distillation_keeps_the_old_classes_outputs_closer_than_finetune():
    _, record = first_task_record()
    data = batches(8, (2, 3), seed=4)
    kept = {}
    for weight in (0.0, 1.0):
        lwf = make(
            distill_weight=weight, lr=0.05, optimizer="sgd", momentum=0.0
        )  # plain SGD: under Adam the old classes barely move relative to each other here
        lwf.restore([record])
        lwf.begin_task(SECOND)
        learn(lwf, data)
        x = torch.cat([b["image"] for b in data])
        features = BACKBONE.features(x)
        old, new = lwf.distillation_targets(features), lwf.predict(x)[:, :2]
        kept[weight] = float(
            F.kl_div(F.log_softmax(new / 2, 1), F.log_softmax(old / 2, 1), reduction="batchmean", log_target=True)
        )
    assert kept[1.0] < 0.5 * kept[0.0], kept


def test_a_checkpoint_inside_the_second_task_continues_identically():
    _, record = first_task_record()
    data = batches(3, (2, 3), seed=5)

    def started():
        m = make()
        m.restore([record])
        m.begin_task(SECOND)
        return m

    first = started()
    learn(first, data[:2])
    second = started()
    second.load_task_state(first.task_state())
    assert torch.equal(first.training_step(data[2]), second.training_step(data[2]))
    one, two = first.end_task(), second.end_task()
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
