"""torch.distributed behind the methods' ``Collective`` protocol (Ray Train sets up the group)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.methods import Collective, LocalCollective


class TorchCollective:
    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor


def current_collective() -> Collective:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()
