"""The Llama's "parallelize" step: build a LlamaForCausalLM laid out by a parallel plan.

The plan (`prolong_lit.parallel.plan`) says what to do; this module knows the Llama's parts:
- activation checkpointing wraps every `LlamaDecoderLayer` (transformers' own gradient checkpointing, inside
  FSDP2's hooks, which then stay outside the recompute), with the policy `full` (recompute the whole layer) or
  `selective` (keep each attention kernel's outputs, recompute the rest: `prolong_lit.model.checkpointing`);
- regional compilation (`model.kernels.compile_blocks`) compiles each decoder layer after the checkpointing and
  before the sharding (torchtitan's order), the attention kernel left out of the graphs;
- FSDP2 groups, bottom-up: every decoder layer (a block), then `lm_head` and `model.model` (the embedding and the
  final norm) as roots. LongContextLM calls `model.model(...)` and `model.lm_head` separately (the loss runs the
  head in chunks), so a `fully_shard` of the LlamaForCausalLM itself would never run its hooks; as roots, the
  head's parameters stay gathered from forward to backward. The `chunked` loss runs as an FSDP forward method of
  the head (`prolong_lit.model.loss`): one all-gather and one reduce-scatter of the head per micro-batch; the
  `checkpointed` loss calls the head per chunk, and FSDP2 gathers it again for every chunk of the backward.

Start-up under sharding: a local Hugging Face checkpoint is built on the meta device, sharded, materialised shard
by shard (`to_empty`) and filled from its safetensors files, each rank reading only the slices it owns
(`prolong_lit.model.weights`): no rank ever holds the whole model. A named size (random init, tests and the
demo) is built whole on every rank from the same seed, then sharded: the same weights as a single-process run.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.model.checkpointing import checkpoint_context_fn, compile_decoder_layers
from prolong_lit.model.config import build_llama_model, is_checkpoint_dir
from prolong_lit.model.weights import load_hf_weights, materialize
from prolong_lit.parallel.fsdp import ShardingConfig, mesh_device, shard_modules
from prolong_lit.parallel.plan import ParallelPlan

log = logging.getLogger(__name__)


def build_parallel_llama(name_or_path: str, config: LlamaConfig, attn_implementation: str,
                         plan: ParallelPlan, compile_blocks: bool = False) -> LlamaForCausalLM:
    """The LlamaForCausalLM of `name_or_path` (a checkpoint directory or a named size), laid out by `plan`;
    `compile_blocks` compiles each decoder layer (after activation checkpointing, before sharding)."""
    if plan.shard_mesh is None:
        llama = build_llama_model(name_or_path, config, attn_implementation)
        prepare_layers(llama, plan.activation_checkpointing, compile_blocks)
        return llama
    if not is_checkpoint_dir(name_or_path):
        llama = build_llama_model(name_or_path, config, attn_implementation)  # whole, from the seed, on every rank
        prepare_layers(llama, plan.activation_checkpointing, compile_blocks)
        return shard_llama(llama, plan.shard_mesh, plan.sharding)
    llama_config = copy.deepcopy(config)  # the model keeps (and mutates) its own copy
    llama_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    prepare_layers(llama, plan.activation_checkpointing, compile_blocks)
    shard_llama(llama, plan.shard_mesh, plan.sharding)
    # with CPU offload the shards live on the CPU; the (unsharded) RoPE buffers always on the compute device
    device = mesh_device(plan.shard_mesh)
    materialize(llama, torch.device("cpu") if plan.sharding.cpu_offload else device, device)
    read = load_hf_weights(llama, name_or_path)
    total = sum(param.numel() for param in llama.parameters())
    log.info("loaded %s sharded over %s: read %.1fM of its %.1fM parameters on this rank", name_or_path,
             tuple(plan.shard_mesh.shape), read / 1e6, total / 1e6)
    return llama


def shard_llama(model: LlamaForCausalLM, mesh, config: ShardingConfig) -> LlamaForCausalLM:
    """FSDP2 over `mesh`: every decoder layer, then `lm_head`, then `model.model`, in place; every parameter
    becomes a DTensor. Tied input/output embeddings are refused (the two groups would share one parameter)."""
    if model.config.tie_word_embeddings:
        raise ValueError(
            "model.llama.name_or_path: FSDP sharding of a model with tied input/output embeddings "
            "(tie_word_embeddings, e.g. Llama-3.2 1B/3B) is not supported: embed_tokens and lm_head are separate "
            "FSDP groups; train it without a sharding strategy (Llama-3 8B/70B are untied)"
        )
    return shard_modules(model, blocks=model.model.layers, roots=[model.lm_head, model.model], mesh=mesh,
                         config=config)


def prepare_layers(model: LlamaForCausalLM, activation_checkpointing: bool | str, compile_blocks: bool) -> None:
    """Activation checkpointing (policy `full`/True or `selective`; False: none), then regional compilation."""
    if activation_checkpointing:
        enable_activation_checkpointing(model, "full" if activation_checkpointing is True else activation_checkpointing)
    if compile_blocks:
        compile_decoder_layers(model.model.layers)


def enable_activation_checkpointing(model: LlamaForCausalLM, policy: str = "full") -> None:
    """Recompute each decoder layer's forward in backward (non-reentrant, so FSDP2's hooks work inside it):
    all of it (`full`), or all but the attention kernels' outputs (`selective`)."""
    kwargs = {"use_reentrant": False}
    context_fn = checkpoint_context_fn(policy)
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    # transformers >= 5.2x renamed gradient_checkpointing_enable; both checkpoint each decoder layer's forward
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
