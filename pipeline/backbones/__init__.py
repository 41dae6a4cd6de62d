"""Frozen backbones and the adapter hooks. Importing this package registers every family."""

from pipeline.backbones import open_clip_family, reference  # noqa: F401  (register open_clip:, timm:strata_hybrid_vit_effl0)
from pipeline.backbones.factory import Backbone, InputSpec, create_backbone, register_family, verify_weight_files, weight_files
from pipeline.backbones.hooks import HookedAttention, HookedWeight, PromptInsertion, Routing
from pipeline.backbones.open_clip_family import ClipBackbone

__all__ = [
    "Backbone",
    "ClipBackbone",
    "HookedAttention",
    "HookedWeight",
    "InputSpec",
    "PromptInsertion",
    "Routing",
    "create_backbone",
    "register_family",
    "verify_weight_files",
    "weight_files",
]
