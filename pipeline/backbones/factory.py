"""Backbone factory: ``create_backbone(cfg)`` is the one door in, families register themselves.

A backbone is frozen (no grads, eval mode it cannot leave), knows its input size and
normalisation, and has a stable ``backbone_id`` = name + sha256 of its weights, which every
memory-store record carries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class InputSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Backbone(nn.Module):
    """A frozen image model with a pooled-feature interface."""

    def __init__(self, name: str, model: nn.Module, feature_dim: int, input_spec: InputSpec) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.input_spec = input_spec
        self.register_buffer("_mean", torch.tensor(input_spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(input_spec.std).view(1, 3, 1, 1), persistent=False)
        model.requires_grad_(False)
        super().train(False)
        self.backbone_id = f"{name}@{weights_sha256(model)[:16]}"

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: stays in eval mode (dropout off, norm statistics fixed) whatever is asked."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> float, normalised for this model."""
        return (images.float() / 255.0 - self._mean) / self._std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features (B, feature_dim) of normalised images."""
        return self.model(images)


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
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"backbone.checkpoint: {path}: not a state dict")
    return state


Family = Callable[[str, BackboneConfig], Backbone]
_FAMILIES: dict[str, Family] = {}


def register_family(prefix: str) -> Callable[[Family], Family]:
    def deco(fn: Family) -> Family:
        _FAMILIES[prefix] = fn
        return fn

    return deco


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
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"backbone: timm cannot build {full_name!r} with {cfg.kwargs}: {exc}") from None
    if cfg.checkpoint:
        state = {k: v for k, v in load_state_dict_file(cfg.checkpoint).items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"backbone.checkpoint: {cfg.checkpoint}: does not fit {model_name} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    data_cfg = resolve_data_config({}, model=model)
    # A ViT built with img_size=... keeps its pretrained cfg's input size; the patch grid is the truth.
    grid_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = int(grid_size[-1]) if grid_size else int(data_cfg["input_size"][-1])
    spec = InputSpec(size=size, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    return Backbone(f"timm:{full_name}", model, int(model.num_features), spec)
