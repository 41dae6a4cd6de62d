"""MEAT — meta-attention masks for ViTs (Xue et al., CVPR 2022), task-incremental, after the paper.

Per task: a binary mask over image tokens in the attention of each chosen block, applied inside
the softmax (psi_ij = m_j exp(a_ij) / sum_s m_s exp(a_is); a token always attends to itself;
CLS always kept), and a binary mask over the FFN weights (fc1, fc2) of every block. Each mask
entry has two logits (keep, drop): training samples it with straight-through hard
Gumbel-softmax (tau = 1); inference keeps an entry when logit_keep > logit_drop. Logits start
at the constant (gamma, -gamma), gamma = 4, as the official code does, so a task starts from
the frozen model (``init: uniform`` samples U(-gamma, gamma), one reading of the paper's text:
it drops ~half of all entries at step 0 and leaves features at cosine ~0.5 to the frozen ones).
Loss = CE + alpha * sum over token-masked blocks l of (lambda - mean(m_l))^2, m_l block l's
token keep-mask, alpha = 2, lambda = 0.9: the official code (``MaskKeepLoss``) sums over the
blocks and regularises the attention masks only (``drop_control: all`` adds the FFN masks of
each block, a reading of the paper).
Mask logits train at ``lr`` = 0.1 (official), the head at ``head_lr``.
Stored per task: every mask bit-packed, plus the head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.backbones.masks import gumbel_ste, keep_by_logits, pack_bits, unpack_bits
from pipeline.errors import ConfigError
from pipeline.methods.base import ParamGroup, register_method
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot


class MEATConfig(TaskwiseParams):
    gamma: float = 4.0
    init: Literal["constant", "uniform"] = "constant"
    tau: float = 1.0
    alpha: float = 2.0
    keep_target: float = 0.9  # lambda
    drop_control: Literal["tokens", "all"] = "tokens"
    lr: float = 0.1  # the mask logits' (official)
    head_lr: float | None = 3e-3
    token_layers: list[int] | None = Field(default=None, description="blocks with token masks; None = all (the paper)")


@register_method("meat")
class MEAT(TaskwiseMethod):
    """Per-task binary token masks in attention and FFN weight masks (ViT only)."""

    Config = MEATConfig
    cfg: MEATConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.backbone.model
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise ConfigError(f"method.name: meat needs a timm VisionTransformer backbone, not {self.backbone.name}")
        self.attention = self.backbone.attention_hooks()
        weights = self.backbone.weight_hooks()
        depth = len(model.blocks)
        layers = list(range(depth)) if self.cfg.token_layers is None else self.cfg.token_layers
        if any(not 0 <= layer < depth for layer in layers):
            raise ConfigError(f"method.token_layers: {layers} must lie in 0..{depth - 1}")
        self.token_layers = layers
        self.num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        self.ffn = {b: [weights[f"blocks.{b}.mlp.fc1"], weights[f"blocks.{b}.mlp.fc2"]] for b in range(depth)}
        self.logits: dict[str, nn.Parameter] = {}

    def _init_logits(self, *shape: int) -> nn.Parameter:
        gamma = self.cfg.gamma
        if self.cfg.init == "constant":
            logits = torch.empty(*shape, 2, device=self.device)
            logits[..., 0], logits[..., 1] = gamma, -gamma
            return nn.Parameter(logits)
        return nn.Parameter(torch.empty(*shape, 2, device=self.device).uniform_(-gamma, gamma))

    def new_task(self, slot: int) -> list[ParamGroup]:
        self.logits = {f"tokens.{b}": self._init_logits(self.num_tokens - 1) for b in self.token_layers}
        for b, (fc1, fc2) in self.ffn.items():
            self.logits[f"fc1.{b}"] = self._init_logits(*fc1.inner.weight.shape)
            self.logits[f"fc2.{b}"] = self._init_logits(*fc2.inner.weight.shape)
        return [ParamGroup("mask_logits", list(self.logits.values()), self.cfg.lr)]

    def _set(self, slot: int, masks: dict[str, torch.Tensor]) -> None:
        for b in self.token_layers:
            keep = torch.cat([torch.ones(1, device=self.device), masks[f"tokens.{b}"].to(self.device)])  # CLS kept
            self.attention[b].token_keep = set_slot(self.attention[b].token_keep, slot, keep)
        for b, (fc1, fc2) in self.ffn.items():
            fc1.mask = set_slot(fc1.mask, slot, masks[f"fc1.{b}"].to(self.device))
            fc2.mask = set_slot(fc2.mask, slot, masks[f"fc2.{b}"].to(self.device))

    def before_step(self, slot: int) -> None:
        self._sampled = {name: gumbel_ste(logits, self.cfg.tau) for name, logits in self.logits.items()}
        self._set(slot, self._sampled)

    def extra_loss(self) -> torch.Tensor:
        """alpha * sum_l (lambda - mean(m_l))^2 over the masks sampled for this step."""
        if self.cfg.drop_control == "all":
            return drop_control_loss(self._sampled, list(self.ffn), self.cfg.alpha, self.cfg.keep_target)
        if not self.token_layers:
            return 0.0
        tokens = {name: m for name, m in self._sampled.items() if name.startswith("tokens.")}
        return drop_control_loss(tokens, self.token_layers, self.cfg.alpha, self.cfg.keep_target)

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {f"mask.{name}": pack_bits(keep_by_logits(logits)) for name, logits in self.logits.items()}

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        masks = {}
        for b in self.token_layers:
            masks[f"tokens.{b}"] = unpack_bits(tensors[f"mask.tokens.{b}"], (self.num_tokens - 1,))
        for b, (fc1, fc2) in self.ffn.items():
            masks[f"fc1.{b}"] = unpack_bits(tensors[f"mask.fc1.{b}"], fc1.inner.weight.shape)
            masks[f"fc2.{b}"] = unpack_bits(tensors[f"mask.fc2.{b}"], fc2.inner.weight.shape)
        self._set(slot, masks)


def drop_control_loss(masks: dict[str, torch.Tensor], blocks: list[int], alpha: float, keep_target: float) -> torch.Tensor:
    terms = []
    for b in blocks:
        entries = [m.flatten() for name, m in masks.items() if name.endswith(f".{b}")]
        terms.append((keep_target - torch.cat(entries).mean()) ** 2)
    return alpha * torch.stack(terms).sum()
