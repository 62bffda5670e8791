"""`model.kernels.loss_implementation: liger`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only).

Liger computes each chunk's logits, their cross-entropy and the gradients of the hidden states and of the LM
head's weight in one pass of the forward (its backward only scales them), so the logits are never recomputed.
It needs the `liger-kernel` package (pure Python, `pip install -e '.[gpu]'`) and Triton on a CUDA device; the
module refuses the setting elsewhere with one message. Under FSDP2 it runs, like the `chunked` implementation, as a
registered forward method of `lm_head`, so the head's weight is gathered once per micro-batch.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.errors import ConfigError
from prolong_lit.model.loss import fsdp_forward_method, loss_positions

LIGER_METHOD = "liger_cross_entropy_sum"


@functools.cache
def liger_loss_class():
    """Liger's LigerFusedLinearCrossEntropyLoss, or None without the package."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def check_liger_available(device: torch.device) -> None:
    """A clear error where the fused kernel cannot run (no CUDA tensors, or no liger-kernel package)."""
    if device.type != "cuda" or liger_loss_class() is None:
        raise ConfigError(
            "model.kernels.loss_implementation: 'liger' needs a CUDA device and the liger-kernel package "
            f"(pip install -e '.[gpu]'); this run computes on {device.type}"
            + ("" if liger_loss_class() is not None else " without liger-kernel")
            + "; use 'chunked'"
        )


def _head_liger_sum(lm_head: nn.Linear, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = liger_loss_class()(ignore_index=IGNORE_INDEX, reduction="sum")
    weight = lm_head.weight  # (V, d): the gathered one under FSDP2
    return loss(weight, states.to(weight.dtype), targets).float()


def _liger_method(lm_head: nn.Module):
    return fsdp_forward_method(lm_head, LIGER_METHOD, _head_liger_sum)


def liger_cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                            labels_shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of loss tokens), as `chunked_cross_entropy_sum`, by Liger's kernel."""
    check_liger_available(hidden.device)
    states, targets, count = loss_positions(hidden, labels, labels_shifted)  # (n, d), (n,)
    if states.shape[0] == 0:  # keep the graph and the collectives (see chunked_cross_entropy_sum)
        states, targets = hidden.reshape(-1, hidden.shape[-1])[:1], labels.new_zeros(1)
        return _liger_method(lm_head)(states, targets) * 0.0, count
    return _liger_method(lm_head)(states, targets), count
