"""Adapter hooks on a frozen backbone: the one place where methods change what a model computes.

Methods never copy model code; they fill *banks* on hooks installed into the library's modules:

- ``HookedAttention`` wraps a timm ``Attention`` or an open_clip ``nn.MultiheadAttention`` and
  recomputes attention from the wrapped module's own weights, adding per-layer prefix keys and
  values (prefix tuning), a residual attention branch (extra head-split K_r, V_r with its own
  softmax, added before the output projection, scaled by a per-sample gate), and token masks
  inside the softmax (psi_ij = m_j exp(a_ij) / sum_s m_s exp(a_is); a token always attends to
  itself and CLS is always kept). It also wraps a Hugging Face BERT ``BertSelfAttention`` (the
  text tower of open_clip's HF text encoders), whose output projection lives in the next module:
  there only the residual branch is supported, added to the module's own attention output.
- ``HookedWeight`` wraps a linear or conv layer and uses ``W_s = W * M_s + LM_s @ RM_s``, the
  output scaled per channel by ``F_s`` and shifted by ``B_s`` (weight masks; low-rank
  rectification; scaling factors; SSF's scale and shift).
- ``PromptInsertion`` inserts prompt tokens into the token sequence after position embedding.

A bank is a sequence indexed by *slot* (a task, usually). ``Routing`` says which slot each
sample of the current forward uses (-1: none, the frozen path) and its gate, so one batch may
mix samples routed to different tasks. Weight banks are applied per slot present in the batch
(one weight materialised per slot, never per sample); attention banks are gathered per sample.
With no routing, or only empty banks, every hook calls the wrapped module unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


AttentionKind = Literal["timm", "mha", "bert"]


class Routing:
    """Per-forward state shared by every hook of one backbone."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # (B,) long, -1 = no adapter
        self.gate: torch.Tensor | None = None  # (B,) in [0, 1]; None = 1
        self.prompts: torch.Tensor | None = None  # (B, L, D) tokens to insert

    @contextlib.contextmanager
    def __call__(
        self, slots: torch.Tensor | int | None, gate: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Route the forwards inside the block: ``slots`` is one slot for the whole batch or one per sample."""
        saved = (self.slots, self.gate, self.prompts)
        self.slots = torch.tensor(slots, dtype=torch.long) if isinstance(slots, int) else slots
        self.gate, self.prompts = gate, prompts
        try:
            yield
        finally:
            self.slots, self.gate, self.prompts = saved

    def per_sample(self, batch: int, device: torch.device) -> torch.Tensor:
        assert self.slots is not None
        slots = self.slots.to(device)
        return slots.expand(batch) if slots.dim() == 0 else slots

    def groups(self, batch: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        """(slot, sample indices) for every slot >= 0 present in the batch."""
        slots = self.per_sample(batch, device)
        return [(int(s), torch.nonzero(slots == s).flatten()) for s in torch.unique(slots) if s >= 0]

    def weights(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Per-sample branch weight: the gate where a slot is routed, 0 where it is not."""
        active = (self.per_sample(batch, device) >= 0).to(dtype)
        return active if self.gate is None else active * self.gate.to(device, dtype)


def _gather(bank: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(bank))[slots.clamp(min=0)]


class HookedAttention(nn.Module):
    """Self-attention with optional prefix K/V, residual K_r/V_r and token masks, per slot."""

    def __init__(self, inner: nn.Module, routing: Routing, kind: AttentionKind) -> None:
        super().__init__()
        self.inner = inner
        self.routing = routing
        self.kind = kind
        self.num_heads = int(inner.num_attention_heads if kind == "bert" else inner.num_heads)
        self.head_dim = int(inner.attention_head_size if kind == "bert" else inner.head_dim)
        # Banks: sequences over slots. Shapes per slot: prefix/residual (H, L, head_dim); token_keep (N,).
        self.prefix_k: Sequence[torch.Tensor] = ()
        self.prefix_v: Sequence[torch.Tensor] = ()
        self.residual_k: Sequence[torch.Tensor] = ()
        self.residual_v: Sequence[torch.Tensor] = ()
        self.token_keep: Sequence[torch.Tensor] = ()

    def _active(self) -> bool:
        return self.routing.slots is not None and bool(self.prefix_k or self.residual_k or self.token_keep)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        inner = self.inner
        if self.kind == "timm":
            qkv = inner.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return inner.q_norm(q), inner.k_norm(k), v
        q, k, v = F.linear(x, inner.in_proj_weight, inner.in_proj_bias).chunk(3, dim=-1)
        return tuple(t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n = o.shape[0], o.shape[2]
        o = o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        inner = self.inner
        if self.kind == "timm":
            o = inner.norm(o)
            if getattr(inner, "gate", None) is not None:
                o = o * inner.gate(x).sigmoid()
            return inner.proj_drop(inner.proj(o))
        return inner.out_proj(o)

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        routing = self.routing
        assert routing.slots is not None
        b, n = x.shape[0], x.shape[1]
        slots = routing.per_sample(b, x.device)
        routed = slots >= 0
        q, k, v = self._project(x)
        bias = None
        if attn_mask is not None:
            bias = (
                torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else attn_mask.to(q.dtype)
            )
            bias = bias.expand(b, 1, n, n)
        if self.prefix_k:
            pk, pv = _gather(self.prefix_k, slots), _gather(self.prefix_v, slots)  # (B, H, P, d)
            blocked = torch.zeros(b, 1, n, pk.shape[2], dtype=q.dtype, device=q.device).masked_fill(
                ~routed.view(b, 1, 1, 1), float("-inf")
            )
            bias = torch.cat(
                [blocked, bias if bias is not None else torch.zeros(b, 1, n, n, dtype=q.dtype, device=q.device)], dim=-1
            )
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if self.token_keep and not self._keeps_every_token(slots):
            out = self._masked_attention(q, k, v, bias, slots)
        else:
            # The libraries' own kernel: with no adapter in effect this is the frozen computation.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.residual_k:
            out = out + self._residual(q, slots)
        return self._output(out, x)

    def _residual(self, q: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """gate * softmax(Q K_r^T / sqrt(d)) V_r, per sample's slot: (B, H, N, d)."""
        rk, rv = _gather(self.residual_k, slots), _gather(self.residual_v, slots)  # (B, H, R, d)
        weight = self.routing.weights(q.shape[0], q.device, q.dtype).view(-1, 1, 1, 1)
        return weight * F.scaled_dot_product_attention(q, rk.to(q.dtype), rv.to(q.dtype))

    def _bert_forward(self, x: torch.Tensor, *args, **kwargs):
        """BERT self-attention: its own output plus the residual branch (the projection W_O follows)."""
        if self.prefix_k or self.token_keep:
            raise NotImplementedError("BERT attention hooks support the residual branch only")
        out, *rest = self.inner(x, *args, **kwargs)
        if self.residual_k:
            b, n = x.shape[0], x.shape[1]
            q = self.inner.query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            residual = self._residual(q, self.routing.per_sample(b, x.device))
            out = out + residual.transpose(1, 2).reshape(b, n, -1).to(out.dtype)
        return (out, *rest)

    def _keeps_every_token(self, slots: torch.Tensor) -> bool:
        """True when no routed sample's mask drops a token and no gradient must reach the masks:
        then the frozen kernel computes exactly what the mask formula would (up to rounding)."""
        keep = _gather(self.token_keep, slots)
        return not (torch.is_grad_enabled() and keep.requires_grad) and bool((keep[slots >= 0] > 0.5).all())

    def _masked_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor
    ) -> torch.Tensor:
        """psi_ij = m_j exp(a_ij) / sum_s m_s exp(a_is), with m_i = 1 for the query itself and CLS."""
        b, n = q.shape[0], q.shape[2]
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        keep = _gather(self.token_keep, slots).to(probs.dtype)  # (B, N)
        keep = torch.where((slots >= 0).unsqueeze(1), keep, torch.ones_like(keep))
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        keep = torch.maximum(keep.view(b, 1, 1, n), torch.eye(n, dtype=keep.dtype, device=keep.device))
        prefix = probs.shape[-1] - n
        if prefix:
            keep = torch.cat([torch.ones(b, 1, n, prefix, dtype=keep.dtype, device=keep.device), keep], dim=-1)
        probs = probs * keep
        return (probs / probs.sum(dim=-1, keepdim=True)) @ v

    def forward(self, x: torch.Tensor, *args, **kwargs):  # the wrapped module's own signature
        if not self._active():
            return self.inner(x, *args, **kwargs)
        if self.kind == "bert":
            return self._bert_forward(x, *args, **kwargs)
        if self.kind == "timm":
            return self._attend(x, kwargs.get("attn_mask", args[0] if args else None))
        key = kwargs.get("key", args[0] if args else x)
        if key is not x:
            raise NotImplementedError("adapters hook self-attention only")
        return self._attend(x, kwargs.get("attn_mask")), None


class HookedWeight(nn.Module):
    """A linear or conv layer computed with W_s = W * M_s + LM_s @ RM_s, its output scaled by F_s
    and shifted by B_s.

    The scale multiplies the layer's whole output (bias included), as RKR scales feature maps and
    SSF (Lian et al., NeurIPS 2022) scales and shifts them.
    The wrapped module runs with the slot's weight through ``torch.func.functional_call``, so
    any subclass (timm's same-padding convs, say) keeps its own forward.
    """

    def __init__(self, inner: nn.Linear | nn.Conv2d, routing: Routing) -> None:
        super().__init__()
        self.inner = inner
        self.routing = routing
        self.mask: Sequence[torch.Tensor] = ()  # per slot: the shape of W, values in {0, 1}
        self.lm: Sequence[torch.Tensor] = ()  # per slot: (out, K)
        self.rm: Sequence[torch.Tensor] = ()  # per slot: (K, numel(W) / out)
        self.scale: Sequence[torch.Tensor] = ()  # per slot: (out,)
        self.shift: Sequence[torch.Tensor] = ()  # per slot: (out,)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight (library code reads it, e.g. for its dtype)."""
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def slot_weight(self, slot: int) -> torch.Tensor:
        weight = self.inner.weight
        if self.mask:
            weight = weight * self.mask[slot]
        if self.lm:
            weight = weight + (self.lm[slot] @ self.rm[slot]).view_as(weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing.slots is None or not (self.mask or self.lm or self.scale or self.shift):
            return self.inner(x)
        groups = routing.groups(x.shape[0], x.device)
        if len(groups) == 1 and len(groups[0][1]) == x.shape[0]:  # one slot for the whole batch
            return self._slot_forward(groups[0][0], x)
        out = self.inner(x)
        if not groups:
            return out
        out = out.clone()
        for slot, idx in groups:
            out[idx] = self._slot_forward(slot, x[idx]).to(out.dtype)
        return out

    def _slot_forward(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(self.inner, {"weight": self.slot_weight(slot)}, (x,))
        shape = [1] * y.dim()
        shape[1 if isinstance(self.inner, nn.Conv2d) else -1] = -1
        if self.scale:
            y = y * self.scale[slot].view(shape)
        if self.shift:
            y = y + self.shift[slot].view(shape)
        return y


class PromptInsertion:
    """Forward hook on the module whose output is the position-embedded token sequence.

    ``cls_position`` (the CLS token's position embedding) is added to every prompt when given;
    by default prompts carry no position embedding (L2P's default).
    """

    def __init__(
        self, routing: Routing, position: Literal["prepend", "after_cls"] = "prepend", cls_position: torch.Tensor | None = None
    ) -> None:
        self.routing = routing
        self.position = position
        self.cls_position = cls_position

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        prompts = self.routing.prompts
        if prompts is None:
            return output
        prompts = prompts.to(output.dtype)
        if self.cls_position is not None:
            prompts = prompts + self.cls_position.to(output.device, output.dtype)
        if self.position == "prepend":
            return torch.cat([prompts, output], dim=1)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)
