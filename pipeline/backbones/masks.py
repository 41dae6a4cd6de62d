"""Binary masks: straight-through estimators for learning them, bit packing for storing them."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def threshold_ste(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Piggyback's rule: forward 1[score > threshold] (exactly 0/1), backward identity to the scores."""
    hard = (scores > threshold).to(scores.dtype)
    return hard + scores - scores.detach()


def gumbel_ste(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """MEAT's rule: ``logits[..., 0]`` keep, ``[..., 1]`` drop; a hard Gumbel-softmax sample of
    "keep" (exactly 0/1 forward, the soft sample's gradient backward)."""
    return F.gumbel_softmax(logits, tau=tau, hard=True)[..., 0]


def keep_by_logits(logits: torch.Tensor) -> torch.Tensor:
    """Inference rule: keep where logit_keep > logit_drop."""
    return (logits[..., 0] > logits[..., 1]).float()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask -> uint8 tensor of ceil(numel / 8) bytes, 8 mask bits per byte (big-endian bits)."""
    bits = mask.detach().flatten().cpu().numpy() > 0.5
    return torch.from_numpy(np.packbits(bits))


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), count=count)
    return torch.from_numpy(bits.astype(np.float32)).view(*shape)


def packed_bytes(numel: int) -> int:
    return (numel + 7) // 8
