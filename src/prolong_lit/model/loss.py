"""Chunked LM head + cross-entropy: the full (L, vocab) logits never exist.

At 64K tokens and Llama-3's 128,256-token vocabulary the logits alone are 33.6 GB in fp32. Like ProLong
(`LOGIT_BLOCK_SIZE=2048`), the loss-bearing positions are split into chunks and each chunk's logits exist only
while that chunk is computed, in forward and again in backward. Peak extra memory: one chunk's logits
(2048 x 128256, 1 GB in fp32) instead of all of them. Two implementations (`model.kernels.loss_implementation`):

    chunked       one autograd function for the whole loss (`ChunkedLinearCrossEntropy`), given the LM head's
                  full weight: forward keeps only the scalar, backward recomputes each chunk's logits and adds
                  each chunk's weight gradient into one full-size fp32 buffer. Under FSDP2 it runs as an FSDP
                  forward method of `lm_head` (`register_fsdp_forward_method`), so the head's weight is
                  all-gathered once per micro-batch and its gradient reduce-scattered once.
    checkpointed  each chunk a separate non-reentrant checkpoint calling `lm_head` as a module: the same numbers,
                  but FSDP2's hooks run per chunk, gathering the head again for every chunk of the backward
                  (31 extra all-gathers of 1 GB (bf16) per micro-batch at 64K for Llama-3-8B).

`liger` (Liger-Kernel's fused linear cross-entropy, Triton on CUDA) lives in `prolong_lit.model.liger_loss`.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.errors import ConfigError

LOSS_IMPLEMENTATIONS = ("chunked", "checkpointed", "liger")
HEAD_LOSS_METHOD = "chunked_cross_entropy_sum"  # the method set on (and registered with FSDP2 for) lm_head


def _chunk_cross_entropy(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)  # (n, V)
    # CE in at least fp32 even under bf16 autocast, as transformers does
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(states[i] @ weight.T, targets[i]) (at least fp32), `chunk_size` rows at a time in forward and backward.

    The matrix products run in `compute_dtype` (the autocast dtype under autocast, else the weight's: what
    `F.linear` would do), the softmax in fp32. Backward returns the weight gradient accumulated over all chunks
    in one fp32 buffer (at least as exact as autograd adding the chunks' gradients in the weight's dtype)."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(compute_dtype)  # (V, d)
        total = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=states.device)
        for start in range(0, states.shape[0], chunk_size):
            logits = _chunk_logits(states[start : start + chunk_size], w)  # (n, V) fp32
            total += F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum",
                                     ignore_index=IGNORE_INDEX)
        ctx.save_for_backward(states, weight, targets)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        states, weight, targets = ctx.saved_tensors
        w = weight.to(ctx.compute_dtype)  # (V, d)
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None  # (N, d)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                      device=weight.device)  # (V, d)
        for start in range(0, states.shape[0], ctx.chunk_size):
            part = slice(start, start + ctx.chunk_size)
            x = states[part].to(ctx.compute_dtype)  # (n, d)
            grad_logits = _cross_entropy_grad(_chunk_logits(x, w), targets[part], grad_total)  # (n, V)
            grad_logits = grad_logits.to(ctx.compute_dtype)  # as autograd casts it back through `.to(fp32)`
            if grad_states is not None:
                grad_states[part] = (grad_logits @ w).to(states.dtype)  # (n, d)
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, x)  # (V, d), in place: no second full-size tensor
                else:
                    grad_weight += grad_logits.T @ x  # (V, d) in the compute dtype, added in fp32
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_states, grad_weight, None, None, None


def _chunk_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = x.to(w.dtype) @ w.T  # (n, V)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, grad_total: torch.Tensor) -> torch.Tensor:
    """d(sum CE)/d logits: (softmax - one_hot(target)) * grad, zero on ignored rows; fp32 (n, V). No host sync
    (no boolean indexing), so CUDA chunks queue back to back."""
    grad = torch.softmax(logits, dim=-1)  # (n, V)
    keep = targets != IGNORE_INDEX  # (n,)
    index = targets.clamp(min=0)[:, None]  # (n, 1)
    grad.scatter_add_(1, index, torch.full(index.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return grad.mul_((keep.to(grad.dtype) * grad_total)[:, None])


def compute_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype where autocast is on for the weight's device."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def head_cross_entropy_sum(lm_head: nn.Linear, states: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int) -> torch.Tensor:
    """The chunked loss against `lm_head`'s whole weight (under FSDP2 the gathered one: this runs as the head's
    registered forward method, between its pre-forward all-gather and post-forward hooks)."""
    if lm_head.bias is not None:
        raise ConfigError("model: the chunked loss needs an LM head without bias (Llama's)")
    weight = lm_head.weight  # (V, d)
    return ChunkedLinearCrossEntropy.apply(states, weight, targets, chunk_size, compute_dtype_of(weight))


def fsdp_forward_method(module: nn.Module, name: str, function: Callable) -> Callable:
    """`function` bound to `module` as its method `name`, set on first use and registered as an FSDP2 forward
    method (a no-op when the module is not an FSDP module), so that FSDP2 gathers the weight for it as for
    `forward`. The chunked loss and Liger's fused loss both run on the LM head this way."""
    method = getattr(module, name, None)
    if method is None:
        setattr(module, name, types.MethodType(function, module))
        register_fsdp_forward_method(module, name)
        method = getattr(module, name)
    return method


def head_loss_method(lm_head: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """`lm_head`'s chunked-loss method (`fsdp_forward_method`)."""
    return fsdp_forward_method(lm_head, HEAD_LOSS_METHOD, head_cross_entropy_sum)


def loss_positions(hidden: torch.Tensor, labels: torch.Tensor, labels_shifted: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states (n, d), targets (n,), count): the positions that carry a label, shifted per row unless
    `labels_shifted`."""
    width = hidden.shape[-1]
    if labels_shifted:
        states = hidden.reshape(-1, width)  # (B*L, d)
        targets = labels.reshape(-1)  # (B*L,)
    else:
        states = hidden[:, :-1].reshape(-1, width)  # (B*(L-1), d)
        targets = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    keep = targets != IGNORE_INDEX
    return states[keep], targets[keep], keep.sum()


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,  # (B, L, d): the final norm's output
    labels: torch.Tensor,  # (B, L): NOT shifted (position t's output predicts labels[t + 1]) unless labels_shifted
    lm_head: nn.Module,
    chunk_size: int = 2048,
    labels_shifted: bool = False,
    implementation: str = "chunked",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of loss tokens) over labels != -100, shifted per row.

    Only positions with a label are projected, so masked tokens (SFT prompts, document starts) cost nothing.
    With `labels_shifted`, labels[t] is already position t's target (sequence parallelism shifts the whole row
    before cutting it into chunks, so a chunk's last position keeps the next chunk's first token as target).
    `implementation`: `chunked` or `checkpointed` (module docstring); `liger` is dispatched by the caller.
    """
    if chunk_size < 1:
        raise ConfigError(f"model.kernels.loss_chunk_size must be >= 1, got {chunk_size}")
    if implementation not in ("chunked", "checkpointed"):
        raise ConfigError(f"model.kernels.loss_implementation: {implementation!r} is not chunked or checkpointed")
    states, targets, count = loss_positions(hidden, labels, labels_shifted)  # (n, d), (n,)
    if states.shape[0] == 0:
        # No loss token: a zero-weighted one-token chunk keeps the graph (and, under DDP/FSDP, every rank's
        # collectives) the same as on a micro-batch with loss tokens.
        states, targets = hidden.reshape(-1, hidden.shape[-1])[:1], labels.new_zeros(1)  # (1, d), (1,)
        return _loss_sum(lm_head, states, targets, chunk_size, implementation) * 0.0, count
    return _loss_sum(lm_head, states, targets, chunk_size, implementation), count


def _loss_sum(lm_head: nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_size: int,
              implementation: str) -> torch.Tensor:
    if implementation == "chunked":
        return head_loss_method(lm_head)(states, targets, chunk_size)
    total = None
    for start in range(0, states.shape[0], chunk_size):
        part = checkpoint(
            _chunk_cross_entropy, lm_head, states[start : start + chunk_size], targets[start : start + chunk_size],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    return total
