"""Backbone factory: ``create_backbone(cfg)`` is the one door in, families register themselves.

A backbone is frozen (no grads, eval mode it cannot leave), knows its input size and
normalisation, and has a stable ``backbone_id`` = name + sha256 of its weights, which every
memory-store record carries.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.backbones.hooks import AttentionKind, HookedAttention, HookedWeight, PromptInsertion, Routing
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class InputSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Backbone(nn.Module):
    """A frozen image model with a pooled-feature interface and adapter hooks.

    Families subclass it to say where their hooks go (``_attention_sites``, ``_tower``,
    ``_token_module``). Hooks are installed on demand by the methods that need them; until
    then the model runs exactly as the library built it.
    """

    def __init__(self, name: str, model: nn.Module, feature_dim: int, input_spec: InputSpec) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.token_dim = int(getattr(model, "embed_dim", feature_dim))  # width of tokens()
        self.input_spec = input_spec
        self.routing = Routing()
        self._attention_hooks: dict[str, list[HookedAttention]] = {}
        self._weight_hooks: dict[str, dict[str, HookedWeight]] = {}
        self._prompt_hook: PromptInsertion | None = None
        self.register_buffer("_mean", torch.tensor(input_spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(input_spec.std).view(1, 3, 1, 1), persistent=False)
        model.requires_grad_(False)
        super().train(False)
        self.backbone_id = f"{name}@{weights_sha256(model)[:16]}"

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: stays in eval mode (dropout off, norm statistics fixed) whatever is asked."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> float, normalised for this model."""
        return (images.float() / 255.0 - self._mean) / self._std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features (B, feature_dim) of normalised images."""
        return self.model(images)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every output token (B, N, D) of a transformer, or the last feature map of a CNN."""
        return self.model.forward_features(images)

    # --- where hooks go (per family) ---
    def _tower(self, tower: str) -> nn.Module:
        if tower != "image":
            raise ValueError(f"{self.name} has no {tower} tower")
        return self.model

    def _attention_sites(self, tower: str) -> list[tuple[nn.Module, str, AttentionKind]]:
        """(parent, attribute, kind) of every self-attention module of ``tower``, in depth order."""
        return timm_attention_sites(self._tower(tower))

    def _token_module(self) -> nn.Module:
        return self.model.patch_drop

    def _cls_position(self) -> torch.Tensor:
        return self.model.pos_embed[0, 0]

    # --- installing hooks ---
    def attention_hooks(self, tower: str = "image") -> list[HookedAttention]:
        """Hook every self-attention block of ``tower`` (in depth order); idempotent."""
        if tower not in self._attention_hooks:
            hooks = []
            for parent, name, kind in self._attention_sites(tower):
                hook = HookedAttention(getattr(parent, name), self.routing, kind)
                setattr(parent, name, hook)
                hooks.append(hook)
            self._attention_hooks[tower] = hooks
        return self._attention_hooks[tower]

    def weight_hooks(self, tower: str = "image") -> dict[str, HookedWeight]:
        """Hook every linear and conv layer of ``tower`` (the classifier head excluded); idempotent."""
        if tower not in self._weight_hooks:
            root = self._tower(tower)
            sites = [(name, module) for name, module in root.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)]
            hooks = {}
            for name, module in sites:
                if name.split(".")[-1] in ("head", "fc", "classifier", "out_proj"):
                    continue  # heads are the method's; MultiheadAttention reads out_proj.weight itself
                parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
                hook = HookedWeight(module, self.routing)
                setattr(parent, name.rpartition(".")[2], hook)
                hooks[name] = hook
            self._weight_hooks[tower] = hooks
        return self._weight_hooks[tower]

    def prompt_hook(self, position: Literal["prepend", "after_cls"] = "prepend", pos_embed: bool = False) -> PromptInsertion:
        """Insert ``routing.prompts`` into the token sequence right after position embedding;
        with ``pos_embed`` each prompt also gets the CLS token's position embedding."""
        if self._prompt_hook is None:
            self._prompt_hook = PromptInsertion(self.routing)
            self._token_module().register_forward_hook(self._prompt_hook)
        self._prompt_hook.position = position
        self._prompt_hook.cls_position = self._cls_position().detach() if pos_embed else None
        return self._prompt_hook


def timm_attention_sites(root: nn.Module) -> list[tuple[nn.Module, str, AttentionKind]]:
    from timm.layers import Attention

    return [
        (parent, name, "timm") for parent in root.modules() for name, child in parent.named_children() if type(child) is Attention
    ]


def weights_sha256(model: nn.Module) -> str:
    """Digest of every tensor (name, dtype, shape, bytes) in key order; file format independent."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors file or a torch state dict (never unpickles objects)."""
    if not Path(path).is_file():
        raise ConfigError(f"backbone.checkpoint: {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zipfile and unpickler errors share no base class
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"backbone.checkpoint: {path}: not a readable weights file ({reason[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"backbone.checkpoint: {path}: not a state dict")
    return state


def remap_in_order(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Pair the checkpoint's tensors with the model's, in order, shape for shape.

    Tensors left over at the end of the checkpoint (a classifier the headless model lacks) are
    dropped; anything else that does not pair up is an error naming the first mismatch.
    """
    targets = list(model.state_dict().items())
    sources = list(state.items())
    if len(sources) < len(targets):
        raise ConfigError(f"backbone.key_remap: checkpoint has {len(sources)} tensors, the model needs {len(targets)}")
    out = {}
    for (key, target), (src_key, tensor) in zip(targets, sources, strict=False):
        if tuple(tensor.shape) != tuple(target.shape):
            raise ConfigError(
                f"backbone.key_remap: checkpoint tensor {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(target.shape)}"
            )
        out[key] = tensor
    return out


def load_checkpoint(model: nn.Module, cfg: BackboneConfig) -> None:
    """Load ``cfg.checkpoint`` strictly, after the optional key remap; heads the model lacks are dropped."""
    assert cfg.checkpoint is not None
    state = load_state_dict_file(cfg.checkpoint)
    if cfg.key_remap == "in_order":
        state = remap_in_order(state, model)
    elif cfg.key_remap:
        module_name, _, fn_name = cfg.key_remap.partition(":")
        try:
            state = getattr(importlib.import_module(module_name), fn_name)(state, model)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"backbone.key_remap: cannot use {cfg.key_remap!r} ({exc})") from None
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(("head.", "fc.", "classifier."))}
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConfigError(
                f"backbone.checkpoint: {cfg.checkpoint}: {key} has shape {tuple(tensor.shape)}, "
                f"{cfg.name} needs {tuple(expected[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"backbone.checkpoint: {cfg.checkpoint}: does not fit {cfg.name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


Family = Callable[[str, BackboneConfig], Backbone]
LocalFiles = Callable[[str], list[Path]]  # model name -> the local files a family reads to build it
_FAMILIES: dict[str, Family] = {}
_LOCAL_FILES: dict[str, LocalFiles] = {}


def register_family(prefix: str, local_files: LocalFiles | None = None) -> Callable[[Family], Family]:
    def deco(fn: Family) -> Family:
        _FAMILIES[prefix] = fn
        if local_files is not None:
            _LOCAL_FILES[prefix] = local_files
        return fn

    return deco


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def weight_files(cfg: BackboneConfig) -> dict[str, str]:
    """sha256 by path of every local file that building ``cfg`` reads: the checkpoint, and a
    family's own (an open_clip ``local-dir:`` folder's config and weights)."""
    family, _, model_name = cfg.name.partition(":")
    paths = _LOCAL_FILES[family](model_name) if family in _LOCAL_FILES else []
    if cfg.checkpoint:
        paths = [*paths, Path(cfg.checkpoint)]
    return {str(path): file_sha256(path) for path in paths if path.is_file()}


def verify_weight_files(cfg: BackboneConfig, pinned: dict[str, str], origin: str) -> None:
    """Refuse, before anything is read as weights, a local file that is not the one ``pinned``
    (by a registry card) names: changed since, absent, or one the card does not pin."""
    found = weight_files(cfg)
    for path in sorted(set(found) | set(pinned)):
        if found.get(path) != pinned.get(path):
            now = found.get(path, "no file")[:12]
            then = pinned.get(path, "nothing")[:12]
            raise ConfigError(
                f"{origin}: {path}: sha256 {now}, but the model version pins {then}; its weights are not the ones it was made with"
            )


def create_backbone(cfg: BackboneConfig) -> Backbone:
    family, sep, model_name = cfg.name.partition(":")
    if not sep or family not in _FAMILIES:
        raise ConfigError(f"backbone.name: {cfg.name!r} must be FAMILY:MODEL with FAMILY in {sorted(_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _FAMILIES[family](model_name, cfg)


@register_family("timm")
def _timm(model_name: str, cfg: BackboneConfig) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    pretrained_tag = cfg.pretrained if isinstance(cfg.pretrained, str) else None
    full_name = f"{model_name}.{pretrained_tag}" if pretrained_tag else model_name
    try:
        model = timm.create_model(full_name, pretrained=bool(cfg.pretrained), num_classes=0, **cfg.kwargs)
    except OSError as exc:  # huggingface_hub's "not in the cache and cannot reach the Hub"
        raise ConfigError(
            f"backbone.pretrained: {full_name}: weights not in the local cache and not downloadable "
            f"({exc.__class__.__name__}); this needs network, or a local backbone.checkpoint"
        ) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"backbone: timm cannot build {full_name!r} with {cfg.kwargs}: {exc}") from None
    if cfg.checkpoint:
        load_checkpoint(model, cfg)
    data_cfg = resolve_data_config({}, model=model)
    # A ViT built with img_size=... keeps its pretrained cfg's input size; the patch grid is the truth.
    grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = int(grid_size[-1]) if grid_size else int(data_cfg["input_size"][-1])
    spec = InputSpec(size=size, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    return Backbone(f"timm:{full_name}", model, int(model.num_features), spec)
