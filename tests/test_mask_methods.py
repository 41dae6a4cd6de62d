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
CASES = [
    ("probe", TINY_VIT),
    ("probe", TINY_CNN),
    ("piggyback", TINY_VIT),
    ("piggyback", TINY_CNN),
    ("rkr", TINY_VIT),
    ("rkr", TINY_CNN),
    ("mask_rkr", TINY_VIT),
    ("mask_rkr", TINY_CNN),
    ("meat", TINY_VIT),
]
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
    # block 0 keeps 5 of 8 -> (0.9 - 0.625)^2 = 0.075625; block 1 keeps all -> 0.01; summed over
    # the blocks as the official MaskKeepLoss: 0.085625; x alpha 2
    assert drop_control_loss(masks, [0, 1], alpha=2.0, keep_target=0.9).item() == pytest.approx(0.17125)


def two_tasks(spec: dict, method_name: str, **params):
    backbone = create_backbone(BackboneConfig(**spec))
    method = create_method(resolve_method_params(MethodConfig(name=method_name, lr=1e-2, **params)), backbone)
    size = 16 if spec is TINY_VIT else 32
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(8, 3, size, size, generator=g) + shift, torch.randint(0, 2, (8,), generator=g) + 2 * t)
        for t, shift in enumerate((0.0, 3.0))
    ]
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
    if method_name == "probe":
        expected = [head] * 2
    elif method_name == "piggyback":
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
    method.training_step({"image": data[0][0], "label": data[0][1]})  # the forward that uses these masks
    record = method.end_task()
    for name, hook in method.hooks.items():
        assert torch.equal(unpack_bits(record.tensors[f"mask.{name}"], hook.inner.weight.shape).bool(), trained[name])
        assert torch.equal(hook.mask[0], trained[name])
    _, meat, _ = two_tasks(TINY_VIT, "meat")
    meat.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    record = meat.end_task()
    for name, logits in meat.logits.items():
        assert torch.equal(unpack_bits(record.tensors[f"mask.{name}"], logits.shape[:-1]), keep_by_logits(logits))


def test_probe_is_its_heads_on_the_frozen_features_exactly():
    backbone, method, data = two_tasks(TINY_CNN, "probe")
    records = [train_task(method, t, *data[t]) for t in range(2)]
    assert [sorted(r.tensors) for r in records] == [["head.bias", "head.weight"]] * 2
    x = data[1][0]
    logits = method.score(x, [0, 1, 2, 3], list("abcd"), torch.ones(8, dtype=torch.long))
    with torch.no_grad():
        expected = torch.nn.functional.linear(
            backbone.features(x), records[1].tensors["head.weight"], records[1].tensors["head.bias"]
        )
    assert torch.equal(logits[:, 2:], expected) and torch.isinf(logits[:, :2]).all()
    fresh = create_method(method.cfg, backbone)
    fresh.restore(records)
    assert torch.equal(fresh.score(x, [0, 1, 2, 3], list("abcd"), torch.ones(8, dtype=torch.long)), logits)


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


@pytest.mark.parametrize("method_name", ["piggyback", "mask_rkr"])
def test_record_keeps_the_masks_of_the_last_training_forward(method_name):
    """The last update moves scores across the threshold; the record (and so evaluation) must
    keep the masks the final training forward used, which the head was trained with."""
    backbone, method, data = two_tasks(TINY_VIT, method_name)
    method.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1.0)  # big steps: many scores cross 5e-3
    for _ in range(2):
        optimizer.zero_grad()
        method.training_step({"image": data[0][0], "label": data[0][1]}).backward()
        if method_name == "piggyback":
            used = {name: hook.mask[0].detach() > 0.5 for name, hook in method.hooks.items()}
        else:
            used = {
                f"{part}.{name}": method.scores[name][part].detach() > 5e-3
                for name in method.hooks
                for part in ("lm", "rm", "scale")
            }
        optimizer.step()
    after_update = (
        {name: s.detach() > 5e-3 for name, s in method.scores.items()}
        if method_name == "piggyback"
        else {
            f"{part}.{name}": method.scores[name][part].detach() > 5e-3 for name in method.hooks for part in ("lm", "rm", "scale")
        }
    )
    assert any(not torch.equal(used[k], after_update[k]) for k in used)  # the last update did flip masks
    record = method.end_task()
    for key, mask in used.items():
        assert torch.equal(unpack_bits(record.tensors[f"mask.{key}"], mask.shape).bool(), mask)


def frozen_and_adapted(method_name: str, **params):
    backbone, method, data = two_tasks(TINY_VIT, method_name, **params)
    images = data[0][0]
    with torch.no_grad():
        frozen = backbone.features(images)
    method.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    return backbone, method, images, frozen


def test_mask_rkr_masks_off_mean_the_frozen_weights_in_rectification_mode():
    backbone, method, images, frozen = frozen_and_adapted("mask_rkr", mask_mode="rectification")
    with torch.no_grad():
        for parts in method.scores.values():
            for scores in parts.values():
                scores.fill_(0.0)  # every bit off
        for parts in method.shared.values():
            parts["lm"].normal_(), parts["scale"].uniform_(0.5, 1.5)  # the shared rectification is far from identity
    method.training_step({"image": images, "label": torch.zeros(len(images), dtype=torch.long)})
    method.end_task()
    with torch.no_grad(), backbone.routing(0):
        assert torch.equal(backbone.features(images), frozen)
    _, scaled, images, frozen = frozen_and_adapted("mask_rkr", mask_mode="scale")
    with torch.no_grad():
        for parts in scaled.scores.values():
            for scores in parts.values():
                scores.fill_(0.0)
    scaled.training_step({"image": images, "label": torch.zeros(len(images), dtype=torch.long)})
    scaled.end_task()
    with torch.no_grad(), scaled.backbone.routing(0):
        assert not torch.allclose(scaled.backbone.features(images), frozen)  # an off scale bit zeroes its channel


def test_meat_starts_from_the_frozen_model_exactly():
    backbone, method, images, frozen = frozen_and_adapted("meat")
    assert all(bool((logits[..., 0] == 4.0).all() and (logits[..., 1] == -4.0).all()) for logits in method.logits.values())
    method._set(0, {name: (logits[..., 0] > logits[..., 1]).float() for name, logits in method.logits.items()})
    with torch.no_grad(), backbone.routing(0):
        assert torch.equal(backbone.features(images), frozen)
    _, uniform, images, frozen = frozen_and_adapted("meat", init="uniform")
    uniform._set(0, {name: (logits[..., 0] > logits[..., 1]).float() for name, logits in uniform.logits.items()})
    with torch.no_grad(), uniform.backbone.routing(0):
        assert not torch.allclose(uniform.backbone.features(images), frozen)  # the uniform init drops about half


def test_meat_drop_control_covers_the_token_masks_only_by_default():
    _, method, images, _ = frozen_and_adapted("meat", keep_target=0.5)
    method.before_step(0)
    tokens = [m for name, m in method._sampled.items() if name.startswith("tokens.")]
    expected = 2.0 * torch.stack([(0.5 - m.mean()) ** 2 for m in tokens]).sum()  # summed over blocks, as MaskKeepLoss
    assert len(tokens) == 2 and torch.equal(method.extra_loss(), expected)
    _, everything, _, _ = frozen_and_adapted("meat", keep_target=0.5, drop_control="all")
    everything.before_step(0)
    masks = everything._sampled
    by_block = [torch.cat([masks[f"{kind}.{b}"].flatten() for kind in ("tokens", "fc1", "fc2")]) for b in (0, 1)]
    assert torch.allclose(everything.extra_loss(), 2.0 * sum((0.5 - m.mean()) ** 2 for m in by_block))
    assert torch.equal(everything.extra_loss(), drop_control_loss(masks, [0, 1], 2.0, 0.5))


GROUPS = {
    "probe": {"head": 3e-3},
    "piggyback": {"scores": 1e-4, "head": 3e-3},
    "rkr": {"rectification": 1e-3, "head": 3e-3},
    "meat": {"mask_logits": 0.1, "head": 3e-3},
}


@pytest.mark.parametrize("method_name", sorted(GROUPS))
def test_each_parameter_group_gets_its_own_learning_rate(method_name):
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    method = create_method(resolve_method_params(MethodConfig(name=method_name)), backbone)
    method.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    optimizer, _ = method.build_optimizer(total_steps=10, global_batch_size=32)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == GROUPS[method_name]
    head = set(map(id, method.heads[-1].parameters()))
    assert {id(p) for g in optimizer.param_groups if g["name"] == "head" for p in g["params"]} == head


def test_mask_rkr_groups_rectification_only_while_it_trains():
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    method = create_method(resolve_method_params(MethodConfig(name="mask_rkr", lr=2e-3, mask_lr=3e-3, head_lr=4e-3)), backbone)
    method.begin_task(TaskInfo(0, "t0", (0, 1), 2, ("a", "b")))
    first, _ = method.build_optimizer(total_steps=10, global_batch_size=32)
    assert {g["name"]: g["lr"] for g in first.param_groups} == {"rectification": 2e-3, "scores": 3e-3, "head": 4e-3}
    method.end_task()
    method.begin_task(TaskInfo(1, "t1", (2, 3), 4, ("a", "b", "c", "d")))
    second, _ = method.build_optimizer(total_steps=10, global_batch_size=32)
    assert {g["name"]: g["lr"] for g in second.param_groups} == {"scores": 3e-3, "head": 4e-3}  # shared RKR frozen after task 0
