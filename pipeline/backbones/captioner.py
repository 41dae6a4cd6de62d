"""Text generation with an open_clip CoCa backbone, for generative classifiers (GMM).

CoCa's multimodal decoder reads the image tower's attention-pooled tokens through cross-attention
and the unimodal (causal) text tower's token outputs; its logits at position j predict token j+1.
``Captioner`` exposes exactly those pieces, so a method can change the image tokens the decoder
sees (GMM's projection) and add low-rank deltas to the decoder's attention weights (``add_lora``)
while everything else stays frozen.

Two tower kinds open_clip's CoCa does not wire for generation are supported, as strata's offline
``coca-offline`` uses them: a timm image tower (its tokens are the trunk's token sequence through
the tower's own projection) and a Hugging Face text tower (a bidirectional encoder, run with a
causal mask so position j sees tokens up to j only, as a decoder must).
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
        if not model.text_decoder.batch_first:
            raise ConfigError(
                f"method.name: {method}: {backbone.name}'s decoder is not batch-first, which open_clip's CoCa always is"
            )
        self.backbone = backbone
        self.model = model
        self.tokenizer = backbone.tokenizer
        hf = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        self.sot: int = hf.cls_token_id if hf is not None else self.tokenizer.sot_token_id
        self.eot: int = hf.sep_token_id if hf is not None else self.tokenizer.eot_token_id
        self.context_length: int = int(model.context_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start and end tokens."""
        hf = getattr(self.tokenizer, "tokenizer", None)
        return list(hf.encode(text, add_special_tokens=False) if hf is not None else self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        hf = getattr(self.tokenizer, "tokenizer", None)
        return " ".join((hf.decode(ids, skip_special_tokens=True) if hf is not None else self.tokenizer.decode(ids)).split())

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen image tokens the decoder cross-attends to (B, N, width)."""
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # open_clip's TimmModel returns the pooled embedding only
            return visual.head(visual.trunk.forward_features(images))
        return self.model._encode_image(images)[1]

    @torch.no_grad()
    def text_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen text tower's causal token states (B, L, width) that the decoder reads."""
        text = self.model.text
        if hasattr(text, "transformer") and hasattr(text, "pooler"):  # a Hugging Face encoder
            n = ids.shape[1]
            future = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)
            # an additive 4D mask, which transformers passes to the attention as it is
            causal = torch.zeros(n, n, device=ids.device).masked_fill(future, torch.finfo(torch.float32).min)
            return text.transformer(input_ids=ids, attention_mask=causal.expand(len(ids), 1, n, n)).last_hidden_state
        return self.model._encode_text(ids)[1]

    def hidden(self, image_tokens: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The decoder's final states (B, L, width) given the text tower's ``text_states`` of ids
        whose first token is the start token: ``MultimodalTransformer.forward`` without the
        vocabulary projection, so callers project only the positions they need (the vocabulary is
        most of the cost). Gradients reach ``image_tokens`` and any LoRA deltas, not the towers."""
        decoder, n = self.model.text_decoder, text_states.shape[1]
        x = text_states
        for block, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
            x = block(x, attn_mask=decoder.attn_mask[:n, :n])
            x = cross(x, k_x=image_tokens, v_x=image_tokens)
        return decoder.ln_final(x)

    def logits(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, vocab) at every position of ``ids``."""
        return self.project(self.hidden(image_tokens, self.text_states(ids)))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.model.text_decoder.text_projection

    @torch.no_grad()
    def generate(self, image_tokens: torch.Tensor, prefix: list[int], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of ``[start] + prefix`` per image, up to its end token (excluded) or
        ``max_new_tokens`` (and never past the decoder's context)."""
        n = len(image_tokens)
        ids = torch.tensor([[self.sot, *prefix]] * n, device=image_tokens.device)
        done = torch.zeros(n, dtype=torch.bool, device=image_tokens.device)
        for _ in range(min(max_new_tokens, self.context_length - ids.shape[1])):
            step = self.project(self.hidden(image_tokens, self.text_states(ids))[:, -1]).argmax(dim=-1)
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
