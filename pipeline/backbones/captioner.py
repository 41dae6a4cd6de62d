"""Text generation with an open_clip CoCa backbone, for generative classifiers (GMM).

CoCa's multimodal decoder reads the image tower's attention-pooled tokens through cross-attention
and the unimodal (causal) text tower's token outputs; its logits at position j predict token j+1.
``Captioner`` exposes exactly those pieces, so a method can change the image tokens the decoder
sees (GMM's projection) and add low-rank deltas to the decoder's attention weights (``add_lora``)
while everything else stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.backbones.open_clip_family import ClipBackbone
from pipeline.errors import ConfigError


class LoRADelta(nn.Module):
    """W + (alpha / r) B A as a parametrization of a frozen weight; B starts at zero, so the
    parametrized weight equals W exactly until B is trained."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.a, a=5**0.5)
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.b @ self.a)


class Captioner:
    """Teacher-forced logits and greedy generation of a CoCa backbone's decoder."""

    def __init__(self, backbone: ClipBackbone, method: str) -> None:
        model = backbone.model
        if not hasattr(model, "text_decoder"):
            raise ConfigError(f"method.name: {method} needs a captioning backbone (open_clip:coca_*), not {backbone.name}")
        self.backbone = backbone
        self.model = model
        self.tokenizer = backbone.tokenizer
        self.sot: int = self.tokenizer.sot_token_id
        self.eot: int = self.tokenizer.eot_token_id
        self.context_length: int = int(model.context_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start and end tokens."""
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.tokenizer.decode(ids).split())

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen image tokens the decoder cross-attends to (B, N, width)."""
        return self.model._encode_image(images)[1]

    def logits(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, vocab) at every position of ``ids`` (B, L), whose first token
        is the start token; gradients reach ``image_tokens`` and any LoRA deltas, not the towers."""
        with torch.no_grad():
            _, token_embs = self.model._encode_text(ids)
        return self.model.text_decoder(image_tokens, token_embs)

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, prefix: list[int], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of ``[start] + prefix`` per image, up to its end token (excluded) or
        ``max_new_tokens`` (and never past the decoder's context)."""
        n = len(image_tokens)
        ids = torch.tensor([[self.sot, *prefix]] * n, device=image_tokens.device)
        done = torch.zeros(n, dtype=torch.bool, device=image_tokens.device)
        for _ in range(min(max_new_tokens, self.context_length - ids.shape[1])):
            step = self.logits(image_tokens, ids)[:, -1].argmax(dim=-1)
            step = torch.where(done, torch.full_like(step, self.eot), step)
            ids = torch.cat([ids, step[:, None]], dim=1)
            done |= step == self.eot
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 1 + len(prefix) :].tolist():
            out.append(row[: row.index(self.eot)] if self.eot in row else row)
        return out

    def add_lora(self, rank: int, alpha: float) -> list[nn.Parameter]:
        """LoRA deltas on the input projections (q, k, v) of every attention in the multimodal
        decoder, self- and cross-attention; returns their parameters, B zero-initialised."""
        params: list[nn.Parameter] = []
        for module in self.model.text_decoder.modules():
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                if parametrize.is_parametrized(module, "in_proj_weight"):
                    raise ValueError(f"{self.backbone.name}: the decoder already carries LoRA deltas; one method per backbone")
                out_features, in_features = module.in_proj_weight.shape
                delta = LoRADelta(out_features, in_features, rank, alpha).to(module.in_proj_weight.device)
                parametrize.register_parametrization(module, "in_proj_weight", delta)
                params += [delta.a, delta.b]
        return params
