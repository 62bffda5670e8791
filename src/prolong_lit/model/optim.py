"""The optimizer and the learning-rate schedule: swappable components with the recipe's defaults.

LongContextLM takes both as callables, configured by `class_path` like any component:

    optimizer:                              # any torch optimizer; called with the parameter groups below
      class_path: prolong_lit.model.optim.AdamW
      init_args: {lr: 1.0e-5}
    scheduler:                              # called with (optimizer, trainer.max_steps)
      class_path: prolong_lit.model.optim.WarmupCosine
      init_args: {warmup_ratio: 0.1, min_lr_ratio: 0.1}

Parameter groups (`param_groups`): weight decay on matrices (linear layers, embeddings), none on norms and biases,
whatever the optimizer: the no-decay group sets `weight_decay: 0.0`, the other takes the optimizer's own.

The schedule is Hugging Face's `get_cosine_schedule_with_warmup` with ProLong's `min_lr_ratio` bound
(docs/recipe.md, Optimizer and schedule): factor(step) = step / warmup during warmup (so the very first optimizer
step runs at lr 0, as in the paper's code), then min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * progress))
with progress going from 0 after warmup to 1 at the run's last step.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prolong_lit.errors import ConfigError

# What LongContextLM's `optimizer` and `scheduler` settings are (jsonargparse builds them from class_path entries).
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


class AdamW(torch.optim.AdamW):
    """torch's AdamW with the ProLong recipe's defaults.

    Args:
        params: the parameter groups (LongContextLM passes `param_groups`).
        lr: peak learning rate (paper: 1e-5 for both continued-pretraining stages; SFT 2e-5).
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decay of the matrices (the no-decay group of norms and biases overrides it with 0).
    """

    def __init__(self, params: Iterable, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Two groups: the matrices (linear layers, embeddings) with the optimizer's weight decay, then norms and
    biases without.

    ProLong's released code probably decays its RMSNorm weights too (docs/recipe.md, Weight decay and RMSNorm:
    Hugging Face excludes only modules in
    ALL_LAYERNORM_LAYERS and names containing "bias", and ProLong's own LlamaRMSNorm class is not registered
    there); we follow the usual rule instead. With weight_decay 0.1 at lr <= 1e-5 the difference is a relative
    shrink of at most 1e-6 per step.
    """
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """`warmup_steps` if given, else ceil(warmup_ratio * total_steps) (Hugging Face's rounding)."""
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ConfigError(f"model.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        return int(warmup_steps)
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"model.scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The LambdaLR factor of optimizer step `step` (0-based)."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"model.scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup from 0, then a cosine down to `min_lr_ratio` x lr at the run's last optimizer step.

    Args:
        optimizer: the optimizer whose learning rates it sets (per optimizer step).
        total_steps: the run's length in optimizer steps (LongContextLM passes trainer.max_steps).
        warmup_ratio: warmup length as a fraction of total_steps (ignored if warmup_steps is set).
        warmup_steps: warmup length in optimizer steps.
        min_lr_ratio: the cosine decays to this fraction of the peak learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1,
                 warmup_steps: int | None = None, min_lr_ratio: float = 0.1) -> None:
        if total_steps < 1:
            raise ConfigError(
                f"trainer.max_steps must be set (> 0, got {total_steps}): the cosine schedule needs the run's length"
            )
        warmup = resolve_warmup_steps(total_steps, warmup_ratio, warmup_steps)
        super().__init__(optimizer, warmup_cosine(warmup, total_steps, min_lr_ratio))


def class_path_of(factory: Callable) -> dict[str, Any] | Callable:
    """A component factory as a plain `{class_path, init_args}` mapping (how configs write it), for a class or a
    partial of one (jsonargparse's partials carry the class among their arguments); anything else as it is."""
    if isinstance(factory, type):
        return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": {}}
    if isinstance(factory, functools.partial):
        classes = [arg for arg in (factory.func, *factory.args) if isinstance(arg, type)]
        if len(classes) == 1:
            return {**class_path_of(classes[0]), "init_args": dict(factory.keywords)}
    return factory


def factory_from(value: Callable | dict[str, Any]) -> Callable:
    """A component factory from a `{class_path, init_args}` mapping (recorded hyper-parameters), or as it is."""
    if not isinstance(value, dict):
        return value
    module, _, name = str(value.get("class_path", "")).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"model: cannot import the component {value.get('class_path')!r}: {err}") from err
    return functools.partial(target, **(value.get("init_args") or {}))


def apply_configured_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any,
                                     configured: torch.optim.Optimizer) -> None:
    """After a resume restored `optimizer` and `scheduler` from a checkpoint, make the configured optimizer's
    hyper-parameters (those of `configured`, a fresh optimizer built from the config over the same parameter
    groups) apply from the resumed step on: every group setting but the parameters is taken from `configured`;
    the peak learning rate becomes the configured one and the current one is the configured schedule's value at
    the resumed step (`scheduler.last_epoch`). The moments (the optimizer's state) are kept.

    With nothing changed this recomputes exactly what the checkpoint held (LambdaLR's own `base_lr * factor`)."""
    if len(configured.param_groups) != len(optimizer.param_groups):
        raise ConfigError(
            f"model.optimizer: the configured optimizer has {len(configured.param_groups)} parameter groups, the "
            f"resumed one {len(optimizer.param_groups)}"
        )
    for group, fresh in zip(optimizer.param_groups, configured.param_groups):
        for key, value in fresh.items():
            if key not in ("params", "lr", "initial_lr"):
                group[key] = value
        group["initial_lr"] = fresh.get("initial_lr", fresh["lr"])  # the peak (a scheduler sets initial_lr)
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        return
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise ConfigError(
            f"model.scheduler: {type(scheduler).__name__} is not a LambdaLR; changing the optimizer's settings on "
            "resume needs a scheduler whose learning rate is base_lr x factor(step)"
        )
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_optimizer_settings(optimizer_factory: Callable, scheduler_factory: Callable, total_steps: int) -> None:
    """Build the configured optimizer and scheduler over one throw-away parameter, so that a bad setting
    (min_lr_ratio 2, trainer.max_steps unset, ...) is refused before a run writes anything, not at its first
    step."""
    optimizer = optimizer_factory([{"params": [nn.Parameter(torch.zeros(1))]}])
    scheduler_factory(optimizer, total_steps)
