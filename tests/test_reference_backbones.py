"""Reference-backbone machinery: the hybrid ViT, and open_clip dual encoders whose towers are a
timm ViT and a Hugging Face BERT (the shape of bench's clip-offline), hooked like any CLIP."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, list_models, register_model

from pipeline.backbones import create_backbone
from pipeline.backbones.factory import weights_sha256
from pipeline.config import BackboneConfig

from test_hooks import identity_adapters, images

transformers = pytest.importorskip("transformers")

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "an",
    "emu",
    ".",
    "what",
    "is",
    "this",
    "?",
]


TINY_TRUNK = "strata_test_tiny_trunk"
default_cfgs = generate_default_cfgs({TINY_TRUNK: {"num_classes": 0, "input_size": (3, 16, 16)}})


if TINY_TRUNK not in list_models(TINY_TRUNK):

    @register_model
    def strata_test_tiny_trunk(pretrained: bool = False, **kwargs) -> VisionTransformer:
        args = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, **kwargs}
        return build_model_with_cfg(VisionTransformer, TINY_TRUNK, pretrained=False, **args)


def write_hf_model_dir(directory: Path, decoder: dict | None = None) -> Path:
    """An open_clip local-dir model: tiny timm ViT image tower, tiny random BERT text tower (a CoCa
    with ``decoder`` as its multimodal decoder, the shape of bench's coca-offline), weights saved."""
    import open_clip
    from transformers import BertConfig, BertTokenizerFast

    BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(directory)
    BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(directory)
    config = {
        "model_cfg": {
            "embed_dim": 24,
            "vision_cfg": {"timm_model_name": TINY_TRUNK, "timm_model_pretrained": False, "timm_pool": "token",
                           "timm_proj": "linear", "image_size": 16},
            "text_cfg": {"hf_model_name": str(directory), "hf_tokenizer_name": str(directory), "hf_pooler_type": "mean_pooler",
                         "hf_proj_type": "linear", "context_length": 12},
        },
        "preprocess_cfg": {"size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }  # fmt: skip
    if decoder is not None:
        config["model_cfg"]["embed_dim"] = 32  # the decoder cross-attends to image tokens of its own width
        config["model_cfg"]["text_cfg"] |= {
            "hf_proj_type": None,
            "context_length": 24,
            "vocab_size": len(VOCAB),
            "output_tokens": True,
        }
        config["model_cfg"]["multimodal_cfg"] = decoder
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", pretrained_hf=False)
    if decoder is not None:
        torch.nn.init.normal_(model.text_decoder.text_projection, std=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    return directory


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    return write_hf_model_dir(tmp_path_factory.mktemp("hf-clip"))


@pytest.fixture(scope="module")
def hf_coca_dir(tmp_path_factory) -> Path:
    decoder = {"width": 32, "heads": 2, "layers": 1, "context_length": 24, "vocab_size": len(VOCAB), "attn_pooler_heads": 2}
    return write_hf_model_dir(tmp_path_factory.mktemp("hf-coca"), decoder)


def hf_clip(directory: Path):
    return create_backbone(BackboneConfig(name=f"open_clip:local-dir:{directory}"))


TEXTS = ["a photo of a cat", "a dog", "an emu"]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_timm_and_bert_towers_take_identity_adapters_exactly(hf_clip_dir, tower):
    backbone = hf_clip(hf_clip_dir)
    x = images(3, 16)

    def run():
        return backbone.features(x) if tower == "image" else backbone.encode_text(TEXTS)

    with torch.no_grad():
        frozen = run()
    hooks = backbone.attention_hooks(tower)
    assert len(hooks) == 2 and {h.kind for h in hooks} == {"timm" if tower == "image" else "bert"}
    params = identity_adapters(backbone, tower, attention=True, weights=True, tokens=17 if tower == "image" else None)
    slots = torch.tensor([0, 1, 0])
    with torch.no_grad(), backbone.routing(slots):
        torch.testing.assert_close(run(), frozen, rtol=0, atol=1e-6)
        for hook in hooks:
            hook.residual_v[0].normal_()
        changed = run()
    assert not torch.allclose(changed[0], frozen[0], atol=1e-4)
    torch.testing.assert_close(changed[1], frozen[1], rtol=0, atol=1e-6)  # slot 1 still has V_r = 0
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with backbone.routing(slots):
        run().pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_bert_residual_routes_per_sample_and_is_gated(hf_clip_dir):
    backbone = hf_clip(hf_clip_dir)
    identity_adapters(backbone, "text", attention=True, weights=False, tokens=None)
    with torch.no_grad():
        for hook in backbone.attention_hooks("text"):
            for v in hook.residual_v:
                v.normal_()
        slots, gate = torch.tensor([1, -1, 0]), torch.tensor([0.5, 1.0, 1.0])
        with backbone.routing(slots, gate=gate):
            mixed = backbone.encode_text(TEXTS)
        for i, text in enumerate(TEXTS):
            with backbone.routing(slots[i : i + 1], gate=gate[i : i + 1]):
                torch.testing.assert_close(mixed[i : i + 1], backbone.encode_text([text]), rtol=0, atol=1e-5)
        frozen = backbone.encode_text(TEXTS)
        with backbone.routing(torch.zeros(3, dtype=torch.long), gate=torch.zeros(3)):
            torch.testing.assert_close(backbone.encode_text(TEXTS), frozen, rtol=0, atol=1e-6)


def test_diki_with_untrained_residuals_is_zeroshot_on_a_timm_bert_clip(hf_clip_dir):
    from pipeline.config import MethodConfig
    from pipeline.methods import LocalCollective, TaskInfo, create_method, resolve_method_params

    names = ("cat", "dog", "emu")
    info = TaskInfo(index=0, id="t", classes=(0, 1, 2), num_seen_classes=3, class_names=names, domain=None)
    x = images(4, 16)
    zeroshot = create_method(resolve_method_params(MethodConfig(name="zeroshot")), hf_clip(hf_clip_dir), LocalCollective())
    diki = create_method(
        resolve_method_params(MethodConfig(name="diki", image_layers=[0, 1], text_layers=[0, 1], residual_length=2)),
        hf_clip(hf_clip_dir),
        LocalCollective(),
    )
    diki.begin_task(info)
    diki.training_step({"image": x, "label": torch.tensor([0, 1, 2, 0])})  # statistics only: no optimizer step
    record = diki.end_task()
    assert set(record.tensors) >= {"image.0.k", "text.1.v", "gaussian.mean"}
    expected = zeroshot.score(x, range(3), list(names))
    torch.testing.assert_close(diki.score(x, range(3), list(names)), expected, rtol=0, atol=1e-5)


def test_local_dir_name_is_the_folder_so_ids_survive_a_move(hf_clip_dir, tmp_path):
    import shutil

    moved = tmp_path / hf_clip_dir.name
    shutil.copytree(hf_clip_dir, moved)
    assert hf_clip(moved).backbone_id == hf_clip(hf_clip_dir).backbone_id
    assert hf_clip(moved).backbone_id.startswith(f"open_clip:local-dir:{hf_clip_dir.name}@")


def test_hybrid_vit_stem_is_efficientnet_lite0_and_loads_by_path(tmp_path):
    import timm

    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    hybrid = create_backbone(BackboneConfig(name="timm:strata_hybrid_vit_effl0", seed=1))
    assert hybrid.input_spec.size == 96 and hybrid.input_spec.mean == (0.5, 0.5, 0.5) and hybrid.feature_dim == 192
    stem = hybrid.model.patch_embed.backbone
    stem.load_state_dict(
        {k: v for k, v in cnn.state_dict().items() if k.startswith(("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(5))))}
    )
    x = images(2, 96)
    with torch.no_grad():
        expected = cnn.blocks[:5](cnn.bn1(cnn.conv_stem(x)))
        assert torch.equal(stem(x), expected) and expected.shape == (2, 112, 6, 6)
        assert hybrid.tokens(x).shape == (2, 37, 192)  # CLS + 6x6 grid
    save_file({k: v.contiguous() for k, v in hybrid.model.state_dict().items()}, tmp_path / "h.safetensors")
    loaded = create_backbone(BackboneConfig(name="timm:strata_hybrid_vit_effl0", checkpoint=str(tmp_path / "h.safetensors")))
    assert loaded.backbone_id == f"timm:strata_hybrid_vit_effl0@{weights_sha256(hybrid.model)[:16]}"
    with torch.no_grad():
        assert torch.equal(loaded.features(x), hybrid.features(x))


def test_a_coca_of_timm_and_bert_towers_captions_causally_and_trains_gmm(hf_coca_dir):
    """The shape of coca-offline: tokens from the timm trunk, MiniLM-like BERT states under a causal
    mask (a position never sees a later token), WordPiece's [CLS]/[SEP] as start and end, GMM on top."""
    from pipeline.backbones.captioner import Captioner
    from pipeline.config import MethodConfig
    from pipeline.methods import TaskInfo, create_method, resolve_method_params

    backbone = hf_clip(hf_coca_dir)
    captioner = Captioner(backbone, "gmm")
    assert (captioner.sot, captioner.eot) == (VOCAB.index("[CLS]"), VOCAB.index("[SEP]"))
    answer = captioner.encode("this is a photo of a cat.")
    assert (
        captioner.decode(answer) == "this is a photo of a cat."
        and captioner.decode([captioner.sot, *answer, captioner.eot]) == "this is a photo of a cat."
    )
    ids = torch.tensor([[captioner.sot, *captioner.encode("what is this photo of?"), *answer, captioner.eot]])
    with torch.no_grad():
        whole, prefix = captioner.text_states(ids), captioner.text_states(ids[:, :6])
        other = captioner.text_states(torch.cat([ids[:, :6], torch.full((1, ids.shape[1] - 6), VOCAB.index("dog"))], dim=1))
    torch.testing.assert_close(whole[:, :6], prefix, rtol=0, atol=1e-5)
    torch.testing.assert_close(other[:, :6], prefix, rtol=0, atol=1e-5)
    x = images(4, 16)
    assert captioner.image_tokens(x).shape == (4, 17, 32) and backbone.features(x).shape == (4, 32)
    torch.manual_seed(0)
    gmm = create_method(resolve_method_params(MethodConfig(name="gmm", lr=0.05, max_new_tokens=4)), backbone)
    gmm.begin_task(TaskInfo(0, "t", (0, 1), 2, ("cat", "dog")))
    batch = {"image": x, "label": torch.tensor([0, 1, 0, 1])}
    optimizer, _ = gmm.build_optimizer(20, 4)
    first = float(gmm.training_step(batch).detach())
    for _ in range(20):
        gmm.training_step(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert float(gmm.training_step(batch).detach()) < first
    assert gmm.score(x, [0, 1], ["cat", "dog"]).shape == (4, 2)


def assert_every_tensor_as_saved(backbone, path: Path) -> None:
    from safetensors.torch import load_file

    saved, loaded = load_file(path), backbone.model.state_dict()
    assert set(saved) == set(loaded)
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("kind", ["clip", "coca"])
def test_a_local_dir_model_loads_every_tensor_as_saved(hf_clip_dir, hf_coca_dir, kind):
    """Issue 27: the CoCa's vocabulary projection was re-initialised after open_clip loaded it."""
    directory = hf_clip_dir if kind == "clip" else hf_coca_dir
    assert_every_tensor_as_saved(hf_clip(directory), directory / "open_clip_model.safetensors")


@pytest.mark.parametrize("name", ["open_clip:strata-tiny-coca", "open_clip:strata-tiny-clip", "timm:vit_tiny_patch16_224"])
def test_a_backbone_checkpoint_loads_every_tensor_as_saved(tmp_path, name):
    kwargs = {"img_size": 32, "depth": 2} if name.startswith("timm") else {}
    built = create_backbone(BackboneConfig(name=name, seed=3, kwargs=kwargs))
    with torch.no_grad():
        for tensor in built.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)  # weights no init would give
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in built.model.state_dict().items()}, path)
    assert_every_tensor_as_saved(create_backbone(BackboneConfig(name=name, checkpoint=str(path), kwargs=kwargs)), path)


def test_a_local_dir_model_without_weights_gets_an_initialised_vocabulary_projection(hf_coca_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare-coca"
    shutil.copytree(hf_coca_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    backbone = create_backbone(BackboneConfig(name=f"open_clip:local-dir:{bare}", kwargs={"pretrained_hf": False}))
    projection = backbone.model.text_decoder.text_projection
    assert torch.isfinite(projection).all() and float(projection.std()) == pytest.approx(32**-0.5, rel=0.2)
