"""The few torch.distributed operations the evaluation needs, as no-ops when it runs in one process.

`distributed=None` everywhere means "use torch.distributed if it is initialised". A caller that evaluates on one
rank only (while other ranks exist) must pass `distributed=False`, or the collectives below would wait forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def resolve(distributed: bool | None) -> bool:
    """Whether to shard and gather across ranks."""
    available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not available:
        raise ValueError("distributed=True but torch.distributed is not initialised with more than one process")
    return available if distributed is None else bool(distributed)


def rank_and_world(enabled: bool) -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if enabled else (0, 1)


def shard(items: Sequence[T], enabled: bool) -> list[T]:
    """This rank's slice: items rank, rank + W, rank + 2W, ..."""
    rank, world = rank_and_world(enabled)
    return list(items[rank::world])


def gather_lists(local: list[Any], enabled: bool) -> list[Any]:
    """Concatenate every rank's list (rank 0's first), on every rank (all_gather_object)."""
    if not enabled:
        return list(local)
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in (part or [])]


def max_int(value: int, device: torch.device, enabled: bool) -> int:
    """The largest `value` over ranks."""
    if not enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_true(flag: bool, device: torch.device, enabled: bool) -> bool:
    """Whether `flag` is True on at least one rank."""
    return max_int(int(flag), device, enabled) > 0
