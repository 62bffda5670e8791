"""FSDP2 (`fully_shard`) of the Llama, built so that no rank ever holds the whole model from a checkpoint.

Groups, bottom-up: every `LlamaDecoderLayer`, then `lm_head`, then `model.model` (the embedding and the final
norm). LongContextLM calls `model.model(...)` and `model.lm_head` separately (the loss runs the head in chunks),
so a `fully_shard` of the LlamaForCausalLM itself would never run its hooks and its own parameters would never be
gathered; `model.model` and `lm_head` are therefore FSDP2 roots, and a root keeps its parameters gathered from
forward to backward (FSDP2's default for roots), so the chunked loss all-gathers the head once per forward.

Mesh: a 1-D mesh shards every parameter over all its ranks (FSDP, placement `Shard(0)`); a 2-D
("replicate", "shard") mesh shards within each replica group and replicates across the groups (HSDP, placements
`(Replicate(), Shard(0))`; gradients are reduce-scattered within a group, then all-reduced across groups).

Start-up: a local Hugging Face checkpoint is built on the meta device, sharded, materialised shard by shard
(`to_empty`) and filled from its safetensors files, each rank reading only the slices it owns
(`prolong_lit.parallel.hf_load`). A named size (random init, tests and the demo) is built whole on every rank
from the same seed, then sharded: the same weights as a single-process run with that seed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.model.config import build_llama_model, is_checkpoint_dir
from prolong_lit.parallel.hf_load import load_hf_weights, materialize

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPLICATE_DIM, SHARD_DIM = "replicate", "shard"  # prolong_lit.parallel.strategy.FSDP2Strategy's mesh
LIGHTNING_DP_DIM, LIGHTNING_TP_DIM = "data_parallel", "tensor_parallel"  # Lightning's ModelParallelStrategy's mesh


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How FSDP2 shards and computes (LongContextLM's `fsdp_*` settings).

    Args:
        param_dtype: dtype of the gathered parameters, i.e. of forward/backward compute and of the all-gather
            (`bfloat16` for the recipe); None computes in the parameters' own dtype (fp32: full precision). The
            sharded parameters the optimizer steps keep their own dtype (fp32 master weights).
        reduce_dtype: dtype of the gradient reduce-scatter / all-reduce (`float32` keeps the sum exact-ish under
            bf16 compute); None reduces in param_dtype.
        cpu_offload: keep the sharded parameters, gradients and optimizer states in (pinned) CPU memory; the
            optimizer step then runs on the CPU.
        reshard_after_forward: free each decoder layer's gathered parameters after its forward and gather them
            again in backward (less memory, one more all-gather per layer).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for setting, value in (("model.fsdp_param_dtype", self.param_dtype),
                               ("model.fsdp_reduce_dtype", self.reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{setting}: {value!r} is not one of {', '.join(DTYPES)} (or null)")

    def mp_policy(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(
            param_dtype=DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )

    def offload_policy(self) -> OffloadPolicy:
        # pinned: FSDP2 then also moves shards back to the CPU if a `module.to(device)` (Lightning's setup) moved them
        return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()


def fsdp_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The mesh to shard over, from the strategy's device mesh: FSDP2Strategy's ("replicate", "shard") mesh (2-D
    for HSDP when there is more than one replica, else its "shard" dimension), or the "data_parallel" dimension of
    Lightning's ModelParallelStrategy mesh when it has no tensor parallelism."""
    names = tuple(device_mesh.mesh_dim_names or ())
    if REPLICATE_DIM in names and SHARD_DIM in names:
        if device_mesh[REPLICATE_DIM].size() > 1:
            return device_mesh[REPLICATE_DIM, SHARD_DIM]
        return device_mesh[SHARD_DIM]
    if LIGHTNING_DP_DIM in names:
        tensor_parallel = device_mesh[LIGHTNING_TP_DIM].size() if LIGHTNING_TP_DIM in names else 1
        if tensor_parallel != 1:
            raise ValueError(
                f"trainer.strategy: ModelParallelStrategy puts {tensor_parallel} ranks into tensor parallelism, which "
                "prolong_lit does not implement (its 'auto' sizes do this on a single node); set "
                "data_parallel_size to the world size and tensor_parallel_size: 1, or use "
                "prolong_lit.parallel.strategy.FSDP2Strategy"
            )
        return device_mesh[LIGHTNING_DP_DIM]
    raise ValueError(
        f"trainer.strategy: a device mesh with dimensions {names} is not one prolong_lit can shard over; use "
        "prolong_lit.parallel.strategy.FSDP2Strategy"
    )


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device this rank computes on: the mesh's device type (the current CUDA device for `cuda`)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def shard_model(model: LlamaForCausalLM, mesh: DeviceMesh, config: ShardingConfig) -> LlamaForCausalLM:
    """`fully_shard` every decoder layer, then `lm_head`, then `model.model`, in place; every parameter becomes a
    DTensor. Tied input/output embeddings are refused (the two groups would share one parameter)."""
    if model.config.tie_word_embeddings:
        raise ValueError(
            "model.model: FSDP sharding of a model with tied input/output embeddings (tie_word_embeddings, e.g. "
            "Llama-3.2 1B/3B) is not supported: embed_tokens and lm_head are separate FSDP groups; train it with "
            "trainer.strategy: ddp (Llama-3 8B/70B are untied)"
        )
    common = {"mesh": mesh, "mp_policy": config.mp_policy(), "offload_policy": config.offload_policy()}
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=config.reshard_after_forward, **common)
    # reshard_after_forward=None: FSDP2 decides at its lazy init, keeping the roots' parameters gathered
    fully_shard(model.lm_head, reshard_after_forward=None, **common)
    fully_shard(model.model, reshard_after_forward=None, **common)
    plain = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
    if plain:  # a parameter outside every group would be neither gathered nor synchronised
        raise RuntimeError(f"FSDP sharding left parameters outside every group: {plain[:5]}")
    return model


def build_sharded_llama(
    model: str,
    config: LlamaConfig,
    attn_implementation: str,
    mesh: DeviceMesh,
    sharding: ShardingConfig,
    prepare: Callable[[LlamaForCausalLM], None] | None = None,
) -> LlamaForCausalLM:
    """The LlamaForCausalLM of `model` (a checkpoint directory or a named size), sharded over `mesh`.

    `prepare` runs on the unsharded (for a checkpoint: meta-device) model before sharding, e.g. to enable
    activation checkpointing, which must wrap each layer inside its FSDP group.
    """
    device = mesh_device(mesh)
    if not is_checkpoint_dir(model):
        llama = build_llama_model(model, config, attn_implementation)  # whole, from the seed, on every rank
        if prepare is not None:
            prepare(llama)
        return shard_model(llama, mesh, sharding)
    llama_config = copy.deepcopy(config)  # the model keeps (and mutates) its own copy
    llama_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config)
    if prepare is not None:
        prepare(llama)
    shard_model(llama, mesh, sharding)
    # with CPU offload the shards live on the CPU; the (unsharded) RoPE buffers always on the compute device
    materialize(llama, torch.device("cpu") if sharding.cpu_offload else device, device)
    read = load_hf_weights(llama, model)
    total = sum(param.numel() for param in llama.parameters())
    log.info("loaded %s sharded over %s: read %.1fM of its %.1fM parameters on this rank", model,
             tuple(mesh.shape), read / 1e6, total / 1e6)
    return llama
