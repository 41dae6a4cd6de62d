"""Reference architectures that strata builds from offline weights (see ``bench/build_backbones.py``).

``strata_hybrid_vit_effl0`` is a timm ``VisionTransformer`` whose patch embedding is the stem of
EfficientNet-Lite0 (conv stem and the first five block stages: 112 channels at stride 16), as in
timm's hybrid ViTs: CNN stages -> token grid -> 1x1 projection -> transformer blocks. It is
registered with timm on import, so ``timm:strata_hybrid_vit_effl0`` plus a local ``checkpoint``
goes through the normal backbone factory; the weights come from the bench build, never a hub.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import timm
from timm.layers import HybridEmbed
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

EFFL0_STEM_STAGES = 5  # blocks.0-4 of tf_efficientnet_lite0: stride 16, 112 channels
EFFL0_STEM_PREFIXES = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(EFFL0_STEM_STAGES)))


def efficientnet_lite0_stem() -> nn.Sequential:
    """The stride-16 stem of ``tf_efficientnet_lite0`` under its own parameter names."""
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    return nn.Sequential(OrderedDict(conv_stem=cnn.conv_stem, bn1=cnn.bn1, blocks=cnn.blocks[:EFFL0_STEM_STAGES]))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # tf_efficientnet_lite0's own normalisation, so the stem sees what it was trained on.
    return {"num_classes": 0, "input_size": (3, 96, 96), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), **kwargs}


default_cfgs = generate_default_cfgs({"strata_hybrid_vit_effl0": _cfg()})


@register_model
def strata_hybrid_vit_effl0(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EfficientNet-Lite0 stem + 4 ViT blocks (width 192, 3 heads) at 96x96: 37 tokens."""
    if pretrained:
        raise ValueError("strata_hybrid_vit_effl0 has no hub weights: build them with bench/build_backbones.py hybrid-vit")
    args: dict[str, Any] = {"img_size": 96, "patch_size": 1, "embed_dim": 192, "depth": 4, "num_heads": 3, **kwargs}
    args["embed_layer"] = partial(HybridEmbed, backbone=efficientnet_lite0_stem())
    return build_model_with_cfg(VisionTransformer, "strata_hybrid_vit_effl0", pretrained=False, **args)
