import torch
from torch import nn

from pipeline.backbones import create_backbone
from pipeline.backbones.factory import Backbone, InputSpec
from pipeline.config import BackboneConfig
from pipeline.methods import TaskInfo, resolve_method_params
from pipeline.config import MethodConfig
from pipeline.train.loop import StepSettings, train_phase

from conftest import TINY_VIT, new_method


def flat_backbone() -> Backbone:
    """Features = the normalised pixels themselves (mean 0, std 1 -> pixel / 255)."""
    return Backbone("fake:flat", nn.Flatten(), 4, InputSpec(size=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))


def images(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 2, 2)


def task(index: int, classes: tuple[int, ...], seen: int) -> TaskInfo:
    return TaskInfo(index=index, id=f"t{index}", classes=classes, num_seen_classes=seen, class_names=tuple(map(str, range(seen))))


def method(name: str, backbone: Backbone, **params):
    return new_method(name, backbone, seed=None, **params)


def test_ncm_means_are_exact_and_merge_across_tasks():
    ncm = method("ncm", flat_backbone())
    ncm.begin_task(task(0, (0, 1), 2))
    ncm.training_step({"image": images([1, 0, 0, 0], [3, 0, 0, 0], [0, 2, 0, 0]), "label": torch.tensor([0, 0, 1])})
    first = ncm.end_task()
    assert torch.equal(first.tensors["classes"], torch.tensor([0, 1]))
    assert torch.equal(first.tensors["means"], torch.tensor([[2.0, 0, 0, 0], [0, 2, 0, 0]]))
    # Class 0 returns in a new domain: its mean is over all four of its samples.
    ncm.begin_task(task(1, (0, 2), 3))
    ncm.training_step({"image": images([6, 0, 0, 0], [0, 0, 0, 4]), "label": torch.tensor([0, 2])})
    second = ncm.end_task()
    assert torch.equal(second.tensors["classes"], torch.tensor([0, 2]))
    assert torch.equal(second.tensors["means"], torch.tensor([[(1 + 3 + 6) / 3, 0, 0, 0], [0, 0, 0, 4.0]]))
    assert second.tensors["counts"].tolist() == [3, 1]
    query = images([0, 1, 0, 0], [5, 0, 0, 1], [0, 0, 1, 9])
    assert ncm.predict(query).argmax(1).tolist() == [1, 0, 2]
    restored = method("ncm", flat_backbone())
    restored.restore([first, second])
    assert torch.equal(restored.predict(query), ncm.predict(query))


def test_finetune_head_grows_and_keeps_old_rows():
    ft = method("finetune", flat_backbone())
    ft.begin_task(task(0, (0, 1), 2))
    old = ft.head.weight.detach().clone()
    ft.begin_task(task(1, (2,), 3))
    assert ft.head.weight.shape == (3, 4)
    assert torch.equal(ft.head.weight[:2], old)


def test_only_the_adapter_learns_and_the_backbone_is_untouched():
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    ft = method("finetune", backbone, lr=0.1)
    ft.begin_task(task(0, (0, 1, 2), 3))
    head_before = ft.head.weight.detach().clone()
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(6, 3, 16, 16),
        "label": torch.tensor([0, 1, 2, 0, 1, 2]),
        "task": torch.zeros(6, dtype=torch.long),
    }
    stats = train_phase(ft, lambda: [batch], StepSettings(num_tasks=1, num_samples=6, global_batch_size=6))
    assert stats.samples_per_task == [6] and stats.steps == 1
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(ft.head.weight, head_before)
    assert not backbone.training
    backbone.train()
    assert not backbone.training  # frozen means eval mode for good


def test_record_restores_exact_predictions():
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    ft = method("finetune", backbone)
    ft.begin_task(task(0, (0, 1), 2))
    with torch.no_grad():
        ft.head.weight.normal_()
    record = ft.end_task()
    fresh = method("finetune", backbone)
    fresh.restore([record])
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(fresh.predict(x), ft.predict(x))


def test_a_method_says_before_it_is_built_whether_it_infers_tasks():
    from pipeline.methods import method_class

    backbone = flat_backbone()
    for name, params, infers in (
        ("probe", {"task_inference": True}, True),
        ("probe", {}, False),
        ("piggyback", {"task_inference": True}, True),
        ("finetune", {}, False),
    ):
        cfg = resolve_method_params(MethodConfig(name=name, **params))
        assert method_class(name).infers_tasks_with(cfg) is infers
        assert method(name, backbone, **params).infers_tasks is infers
