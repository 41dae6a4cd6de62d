import math

import pytest
import torch

from pipeline.backbones import create_backbone
from pipeline.backbones.masks import gumbel_ste, keep_by_logits, pack_bits, packed_bytes, threshold_ste, unpack_bits
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.methods import TaskInfo, create_method, resolve_method_params
from pipeline.methods.meat import drop_control_loss

from conftest import TINY_VIT

TINY_CNN = {"name": "timm:test_convnext"}
CASES = [("piggyback", TINY_VIT), ("piggyback", TINY_CNN), ("rkr", TINY_VIT), ("rkr", TINY_CNN), ("mask_rkr", TINY_VIT), ("mask_rkr", TINY_CNN), ("meat", TINY_VIT)]
IDS = [f"{m}-{'vit' if s is TINY_VIT else 'cnn'}" for m, s in CASES]


def test_bits_pack_and_unpack_exactly():
    mask = torch.rand(3, 5, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(105) == 14
    assert torch.equal(unpack_bits(packed, (3, 5, 7)).bool(), mask)


def test_threshold_ste_is_binary_forward_and_identity_backward():
    scores = torch.tensor([0.01, 0.004, 0.006, -1.0], requires_grad=True)
    mask = threshold_ste(scores, 5e-3)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_gumbel_ste_is_binary_forward_with_gradients_on_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(200, 2, requires_grad=True)
    mask = gumbel_ste(logits, tau=1.0)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.sum() < 200
    (mask * torch.arange(200.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert keep_by_logits(torch.tensor([[2.0, 1.0], [0.0, 3.0]])).tolist() == [1.0, 0.0]


def test_drop_control_loss_by_hand():
    masks = {
        "tokens.0": torch.tensor([1.0, 0.0, 1.0, 1.0]), "fc1.0": torch.tensor([1.0, 1.0]), "fc2.0": torch.tensor([0.0, 0.0]),
        "tokens.1": torch.tensor([1.0, 1.0]), "fc1.1": torch.tensor([1.0]), "fc2.1": torch.tensor([1.0]),
    }  # fmt: skip
    # block 0 keeps 5 of 8 -> (0.9 - 0.625)^2 = 0.075625; block 1 keeps all -> 0.01; mean 0.0428125; x alpha 2
    assert drop_control_loss(masks, [0, 1], alpha=2.0, keep_target=0.9).item() == pytest.approx(0.085625)


def two_tasks(spec: dict, method_name: str, **params):
    backbone = create_backbone(BackboneConfig(**spec))
    method = create_method(resolve_method_params(MethodConfig(name=method_name, lr=1e-2, **params)), backbone)
    size = 16 if spec is TINY_VIT else 32
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, size, size, generator=g) + shift, torch.randint(0, 2, (8,), generator=g) + 2 * t) for t, shift in enumerate((0.0, 3.0))]
    return backbone, method, data


def train_task(method, t: int, images, labels, steps: int = 3):
    method.begin_task(TaskInfo(t, f"t{t}", (2 * t, 2 * t + 1), 2 * t + 2, ("a", "b", "c", "d")[: 2 * t + 2]))
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        method.training_step({"image": images, "label": labels}).backward()
        optimizer.step()
    return method.end_task()


@pytest.mark.parametrize("method_name,spec", CASES, ids=IDS)
def test_no_forgetting_by_construction(method_name, spec):
    backbone, method, data = two_tasks(spec, method_name)
    x0 = data[0][0]
    task0 = torch.zeros(8, dtype=torch.long)
    train_task(method, 0, *data[0])
    after_first = method.score(x0, [0, 1], ["a", "b"], task0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_task(method, 1, *data[1])
    assert torch.equal(method.score(x0, [0, 1], ["a", "b"], task0), after_first)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def weight_shapes(backbone) -> list[torch.Size]:
    return [hook.inner.weight.shape for hook in backbone.weight_hooks().values()]


@pytest.mark.parametrize("method_name,spec", CASES, ids=IDS)
def test_record_bytes_follow_the_formula(method_name, spec):
    backbone, method, data = two_tasks(spec, method_name)
    records = [train_task(method, t, *data[t], steps=1) for t in range(2)]
    d = backbone.feature_dim
    head = 4 * (2 * d + 2)
    shapes = weight_shapes(backbone)
    bits = [packed_bytes(math.prod(s)) for s in shapes]
    low_rank = [4 * (s[0] * 2 + 2 * math.prod(s[1:]) + s[0]) for s in shapes]
    if method_name == "piggyback":
        expected = [sum(bits) + head] * 2
    elif method_name == "rkr":
        expected = [sum(low_rank) + head] * 2
    elif method_name == "mask_rkr":
        mask_bits = sum(packed_bytes(s[0] * 2) + packed_bytes(2 * math.prod(s[1:])) + packed_bytes(s[0]) for s in shapes)
        expected = [sum(low_rank) + mask_bits + head, mask_bits + head]
    else:  # meat: token masks (16 patches) in both blocks + fc1/fc2 masks of both blocks
        ffn = [hook.inner.weight.shape for name, hook in backbone.weight_hooks().items() if name.endswith(("fc1", "fc2"))]
        expected = [2 * packed_bytes(16) + sum(packed_bytes(math.prod(s)) for s in ffn) + head] * 2
    assert [r.nbytes for r in records] == expected


def test_packed_masks_unpack_to_the_trained_masks():
    backbone, method, data = two_tasks(TINY_VIT, "piggyback")
    method.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    with torch.no_grad():
        for scores in method.scores.values():
            scores.uniform_(0.0, 0.01)  # about half above the 5e-3 threshold
    trained = {name: (s > 5e-3) for name, s in method.scores.items()}
    record = method.end_task()
    for name, hook in method.hooks.items():
        assert torch.equal(unpack_bits(record.tensors[f"mask.{name}"], hook.inner.weight.shape).bool(), trained[name])
        assert torch.equal(hook.mask[0], trained[name])
    _, meat, _ = two_tasks(TINY_VIT, "meat")
    meat.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    record = meat.end_task()
    for name, logits in meat.logits.items():
        assert torch.equal(unpack_bits(record.tensors[f"mask.{name}"], logits.shape[:-1]), keep_by_logits(logits))


def test_task_inference_routes_to_the_right_task_and_head():
    backbone, method, data = two_tasks(TINY_VIT, "rkr", task_inference=True)
    for t in range(2):
        train_task(method, t, *data[t])
    for t in range(2):
        inferred = method.infer_tasks(data[t][0])
        assert inferred.tolist() == [t] * 8  # the two tasks' inputs differ by a large shift
        logits = method.score(data[t][0], [0, 1, 2, 3], list("abcd"))
        other = [2, 3] if t == 0 else [0, 1]
        assert torch.isinf(logits[:, other]).all() and torch.isfinite(logits[:, [2 * t, 2 * t + 1]]).all()
