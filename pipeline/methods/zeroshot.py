"""Zero-shot CLIP: class names through a prompt template, no training (DIKI's reference row).

A test image is assigned the candidate class whose text embedding of "a photo of a {c}." has
the highest cosine similarity with its image embedding. It reads no training data and stores
an empty record per task, so its accuracy matrix is the frozen model's on every task.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from pipeline.backbones import ClipBackbone
from pipeline.backbones.open_clip_family import DEFAULT_TEMPLATE
from pipeline.errors import ConfigError
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, register_method


class ZeroShotConfig(MethodParams):
    template: str = DEFAULT_TEMPLATE


def clip_logits(backbone: ClipBackbone, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP logits: exp(logit_scale) * cosine(image, text); both inputs unnormalised."""
    return backbone.logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T


def require_clip(backbone: object, method: str) -> ClipBackbone:
    if not isinstance(backbone, ClipBackbone):
        raise ConfigError(f"method.name: {method} needs an open_clip backbone (backbone.name: open_clip:...)")
    return backbone


@register_method("zeroshot")
class ZeroShot(Method):
    """CLIP with class-name prompts and no training: the zero-shot reference."""

    scenarios = frozenset({"dcil", "cil", "dil", "til"})
    Config = ZeroShotConfig
    zero_shot = True
    consumes_data = False
    cfg: ZeroShotConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip = require_clip(self.backbone, self.name)

    def training_step(self, batch: Batch) -> None:
        return None

    def end_task(self) -> TaskRecord:
        return TaskRecord({})

    def apply_record(self, record: TaskRecord) -> None:
        return None  # nothing is learned: the records are empty

    @torch.no_grad()
    def score(self, images, candidates, candidate_names, task_ids=None) -> torch.Tensor:
        return clip_logits(self.clip, self.clip.features(images), self.clip.class_embeddings(candidate_names, self.cfg.template))
