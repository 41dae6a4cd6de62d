"""Frozen backbones and the adapter hooks. Importing this package registers every family."""

from pipeline.backbones import open_clip_family  # noqa: F401  (registers open_clip:)
from pipeline.backbones.factory import Backbone, InputSpec, create_backbone, register_family
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
]
