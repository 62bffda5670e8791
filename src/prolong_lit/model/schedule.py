"""AdamW parameter groups and ProLong's learning-rate schedule (linear warmup, cosine to a floor).

The schedule is Hugging Face's `get_cosine_schedule_with_warmup` with ProLong's `min_lr_ratio` bound
(reference §2): factor(step) = step / warmup during warmup (so the very first optimizer step runs at lr 0, as in
the paper's code), then min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * progress)) with progress going
from 0 after warmup to 1 at `total_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (linear layers, embeddings), none on norms and biases.

    ProLong's released code probably decays its RMSNorm weights too (reference §2: Hugging Face excludes only
    modules in ALL_LAYERNORM_LAYERS and names containing "bias", and ProLong's own LlamaRMSNorm class is not
    registered there); we follow the usual rule instead. With weight_decay 0.1 at lr <= 1e-5 the difference is
    a relative shrink of at most 1e-6 per step.
    """
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """`warmup_steps` if given, else ceil(warmup_ratio * total_steps) (Hugging Face's rounding)."""
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        return int(warmup_steps)
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"model.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The LambdaLR factor of optimizer step `step` (0-based)."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    total_steps: int,
    warmup_ratio: float,
    warmup_steps: int | None,
    min_lr_ratio: float,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `model`'s parameter groups and its per-optimizer-step warmup + cosine LambdaLR."""
    if total_steps < 1:
        raise ValueError(
            f"trainer.max_steps must be set (> 0, got {total_steps}): the cosine schedule needs the run's length"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model.named_parameters(), weight_decay), lr=lr, betas=tuple(betas), eps=eps
    )
    warmup = resolve_warmup_steps(total_steps, warmup_ratio, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps, min_lr_ratio))
    return optimizer, scheduler
