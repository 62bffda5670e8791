"""What each decoder layer keeps for backward, and how it is compiled.

Activation checkpointing policies (`trainer.strategy.init_args.activation_checkpointing`):

    full       each layer keeps only its input and recomputes its whole forward in backward (least memory).
    selective  each layer also keeps its attention kernels' outputs and log-sum-exp (the outputs of the SDPA /
               FlashAttention ops, which their backward needs) and recomputes everything else (norms, projections,
               RoPE, MLP): the attention forward, the costliest part at long context (O(sum doc_len^2)), runs once.
               Memory per layer: + one (L, H x D) attention output and an (H, L) fp32 log-sum-exp.

Selective checkpointing is torch's `create_selective_checkpoint_contexts`: a policy sees every operator the
recomputed region dispatches and marks the attention ones MUST_SAVE; the recompute then takes their saved outputs
instead of running them again, so the gradients are those of full recompute (or none) exactly.

Regional compilation (`model.kernels.compile_blocks`): each decoder layer is `torch.compile`d on its own (one graph
compiled once and reused by every layer), with the attention kernel left out of the graphs
(`torch.compiler.disable` on the registered attention functions): it depends on the documents of each batch
(their number, their lengths, the Python loop over them), which would otherwise recompile the graph per batch.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from prolong_lit.errors import ConfigError
from prolong_lit.parallel.strategy import AC_POLICIES

# the attention kernels' operators as the dispatcher sees them: SDPA's fused kernels (CPU flash, CUDA flash,
# memory-efficient, cuDNN), flash-attn's own (registered torch custom ops since flash-attn 2.7) and torch's varlen
# attention (`torch.nn.attention.varlen`: the custom op, and the aten FA2 kernel it calls). FlashAttention-4 is an
# autograd.Function around CuTe DSL kernels, no dispatcher op: under `selective` its forward is recomputed.
ATTENTION_OP_NAMES = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "flash_attn::_flash_attn_varlen_forward",
    "flash_attn::_flash_attn_forward",
    "torch_attn::_varlen_attn",
    "aten::_flash_attention_forward",
)


def is_attention_op(func) -> bool:
    """Whether a dispatched operator is one of the attention kernels (by its schema name)."""
    name = getattr(func, "name", None)
    return callable(name) and name() in ATTENTION_OP_NAMES


def _keep_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_attention_op(func) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The (forward, recompute) context pair for one checkpointed call (a new pair per call, as torch requires)."""
    return create_selective_checkpoint_contexts(_keep_attention)


def checkpoint_context_fn(policy: str) -> Callable | None:
    """`torch.utils.checkpoint`'s context_fn for a policy: None for full recompute."""
    if policy not in AC_POLICIES:
        raise ConfigError(
            f"trainer.strategy.init_args.activation_checkpointing: {policy!r} is not a policy; choose true (= full), "
            f"false, {' or '.join(AC_POLICIES)}"
        )
    return selective_contexts if policy == "selective" else None


def compile_decoder_layers(layers: Iterable[nn.Module]) -> None:
    """Compile each layer's own forward, in place, after its activation checkpointing is set and before FSDP2
    shards it (torchtitan's order; FSDP2's hooks stay outside the compiled code).

    What is compiled is the layer class's forward beneath transformers' checkpointing wrapper, so a compiled
    region never contains the checkpoint itself (Dynamo cannot trace transformers' checkpointed call as one
    higher-order op: it mutates state outside it, and the whole layer would silently run eagerly): the checkpoint
    runs the compiled forward, and runs it again in backward. One compiled function serves every layer."""
    for layer in layers:
        layer.forward = types.MethodType(_compiled_layer_forward, layer)


@functools.cache
def _compiled(forward: Callable) -> Callable:
    return torch.compile(forward)


def _layer_forward(layer: nn.Module) -> Callable:
    """The class's own forward: transformers wraps it (functools.wraps) to add its checkpointing."""
    forward = type(layer).forward
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    return forward


def _compiled_layer_forward(self: nn.Module, *args, **kwargs):
    compiled = _compiled(_layer_forward(self))
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
    return compiled(self, *args, **kwargs)


