"""A linear classifier over "all classes seen so far" that grows at the end of the label space."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HeadInit = Literal["linear", "zeros"]


class GrowingLinear(nn.Module):
    """New rows start at ``nn.Linear``'s init (``"linear"``) or at zero (``"zeros"``: L2P's
    official head, so that no task starts with a random offset against the others)."""

    def __init__(self, in_features: int, init: HeadInit = "linear") -> None:
        super().__init__()
        self.in_features = in_features
        self.init = init
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_classes: int) -> None:
        """Add rows for new classes (``self.init``); existing rows are kept as they are."""
        new = num_classes - self.num_classes
        if new <= 0:
            return
        fresh = nn.Linear(self.in_features, new, device=self.weight.device)
        if self.init == "zeros":
            nn.init.zeros_(fresh.weight), nn.init.zeros_(fresh.bias)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), fresh.weight.detach()]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), fresh.bias.detach()]))

    def load(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.to(self.weight.device, torch.float32).clone())
        self.bias = nn.Parameter(bias.to(self.bias.device, torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)
