"""Sequence parallelism (Ulysses): the P ranks of a group share every row of a micro-batch.

Layout: a device mesh (dp, sp) of (world / P, P) ranks, sp the inner dimension, so a group is P consecutive ranks
(one node when P <= GPUs per node, as ProLong's `new_subgroups(8)`). The ranks of a group read the same
micro-batch: the data-parallel rank is the group's index, global_rank // P (`data_parallel_rank_and_size`).

`shard_batch` cuts a collated micro-batch (the COMMON.md contract) into rank r's share, after it reached the
device:
  - labels are shifted over the whole row first (labels[t] := labels[t + 1], the last -100), so a chunk's last
    position keeps its target, the next chunk's first token, and the loss takes them as they are
    (`labels_shifted`);
  - each rank keeps the contiguous r-th 1/P of every row: input_ids, labels, position_ids. The positions restart
    at 0 per document over the whole row, so a chunk's slice gives RoPE the global positions;
  - `cu_seq_lens` / `max_seqlen` stay global and the attention (parallel/ulysses.py) runs over the whole rows.
    Documents that straddle a chunk boundary keep their full context: ProLong's released code switches the
    exchange off whenever the longest document fits in a chunk and so cuts them (its open issue #17). Here the
    exchange is skipped only when every chunk boundary is a document boundary: then every document lies inside
    one chunk and attention within the chunk, with the chunk's own boundaries, is exact;
  - `loss_tokens` becomes the chunk's count (the group's counts add up to the row's); `step_loss_tokens` is the
    DataModule's count for the whole step, counted once per group.

Gradients: each rank's loss covers different tokens of the same rows, and the all-to-all's backward returns
every gradient to the rank whose parameters produced it, so the gradients of a group's ranks add up to the
rows' gradient. DDP/FSDP average over all world = W * P ranks, so the module scales its loss by the world size
(not W = world / P): see LongContextLM.gradient_average_size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from prolong_lit.parallel.ulysses import SP_KWARG, kv_head_repeats

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LABELS_SHIFTED = "labels_shifted"  # batch key: labels[t] is position t's target already
SP_DIM = "sp"  # the device-mesh dimension of a sequence-parallel group
DP_DIM = "dp"


class SequenceParallel:
    """This rank's sequence-parallel group: `size` ranks sharing rows, this rank's position `rank` in it.

    A plain class, not a dataclass: Lightning's collection utilities treat it as a leaf when it rides in a batch.
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int, mesh: DeviceMesh | None = None) -> None:
        self.group, self.rank, self.size, self.mesh = group, rank, size, mesh

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, size={self.size})"


def init_sequence_parallel(size: int, device_type: str, mesh: DeviceMesh | None = None) -> SequenceParallel:
    """The group of this rank: the `sp` dimension of `mesh` when it has one, else of a new (dp, sp) mesh.

    Needs the default process group. Every rank must call it (creating the groups is collective).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"model.sequence_parallel_size ({size}) needs a distributed run: set trainer.devices (x num_nodes) to "
            "a multiple of it with a DDP or FSDP strategy"
        )
    world = dist.get_world_size()
    if world % size:
        raise ValueError(
            f"model.sequence_parallel_size ({size}) must divide the number of ranks ({world} = trainer.devices x "
            "trainer.num_nodes)"
        )
    if mesh is not None and mesh.mesh_dim_names and SP_DIM in mesh.mesh_dim_names:
        sp_mesh = mesh[SP_DIM]
    else:
        mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=(DP_DIM, SP_DIM))
        sp_mesh = mesh[SP_DIM]
    group = sp_mesh.get_group()
    ranks = dist.get_process_group_ranks(group)
    first = dist.get_rank() // size * size
    if sp_mesh.size() != size or ranks != list(range(first, first + size)):
        # the DataModule maps global rank g to data-parallel rank g // P: groups must be consecutive ranks
        raise ValueError(
            f"the device mesh's {SP_DIM!r} dimension must group model.sequence_parallel_size ({size}) consecutive "
            f"ranks; rank {dist.get_rank()}'s group is {ranks}"
        )
    log.info("sequence parallelism: rank %d is %d of %d in its group %s", dist.get_rank(),
             sp_mesh.get_local_rank(), size, ranks)
    return SequenceParallel(group, sp_mesh.get_local_rank(), size, mesh)


def data_parallel_rank_and_size(global_rank: int, world_size: int, sequence_parallel_size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): the ranks of one sequence-parallel group read the same data."""
    if sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise ValueError(
            f"model.sequence_parallel_size ({sequence_parallel_size}) must divide the number of ranks "
            f"({world_size} = trainer.devices x trainer.num_nodes)"
        )
    return global_rank // sequence_parallel_size, world_size // sequence_parallel_size


def sequence_parallel_size_of(module: Any) -> int:
    """The sequence-parallel size a LightningModule declares (`sequence_parallel_size`; 1 when it has none)."""
    return int(getattr(module, "sequence_parallel_size", 1) or 1)


def check_sequence_parallel_shape(size: int, seq_len: int, num_attention_heads: int,
                                  num_key_value_heads: int) -> None:
    """Clear errors, at construction, for a row length or a head count that P does not divide."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"model.sequence_parallel_size must be an integer >= 1, got {size!r}")
    if seq_len % size:
        raise ValueError(
            f"model.seq_len ({seq_len}) must be a multiple of model.sequence_parallel_size ({size}): every rank "
            "holds an equal contiguous chunk of each row"
        )
    kv_head_repeats(num_attention_heads, num_key_value_heads, size)


def chunk_boundaries(bounds: Sequence[int], rows: int, length: int, size: int, rank: int) -> list[int] | None:
    """cu_seq_lens of rank `rank`'s chunks over its flattened (B, L/P) tokens when every chunk boundary is a
    document boundary (each document inside one chunk: local attention is exact); None otherwise."""
    chunk = length // size
    present = set(bounds)
    if any(b * length + r * chunk not in present for b in range(rows) for r in range(1, size)):
        return None
    local = []
    for b in range(rows):
        low = b * length + rank * chunk  # a boundary: a row start or a chunk boundary
        local.extend(x - low + b * chunk for x in bounds if low <= x < low + chunk)
    local.append(rows * chunk)
    return local


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t] := labels[t + 1] within each row; the last position has no target."""
    shifted = torch.full_like(labels, IGNORE_INDEX)  # (B, L)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def shard_batch(batch: dict[str, Any], sp: SequenceParallel, check_same: bool = True) -> dict[str, Any]:
    """This rank's share of a collated micro-batch (see the module docstring); the ranks must hold the same one.

    With `check_same` the group compares a small fingerprint of the batch (one tiny all-gather) and raises if
    a DataModule gave the ranks of a group different samples.
    """
    input_ids = batch["input_ids"]  # (B, L)
    rows, length = input_ids.shape
    if length % sp.size:
        raise ValueError(
            f"sequence parallelism: rows of {length} tokens do not split into model.sequence_parallel_size "
            f"({sp.size}) equal chunks; set model.seq_len (data.seq_len follows it) to a multiple of {sp.size}"
        )
    if check_same and sp.group is not None:
        _check_same_batch(batch, sp)
    chunk = length // sp.size
    part = slice(sp.rank * chunk, (sp.rank + 1) * chunk)
    labels = shift_labels(batch["labels"])[:, part].contiguous()  # (B, L/P)
    local = dict(batch)
    local.update(
        input_ids=input_ids[:, part].contiguous(),  # (B, L/P)
        labels=labels,
        position_ids=batch["position_ids"][:, part].contiguous(),  # (B, L/P): global positions
        loss_tokens=(labels != IGNORE_INDEX).sum(),
    )
    local[LABELS_SHIFTED] = True
    cu_seq_lens = batch["cu_seq_lens"]
    inside = chunk_boundaries(cu_seq_lens.tolist(), rows, length, sp.size, sp.rank)
    if inside is None:
        local[SP_KWARG] = sp  # documents cross chunk boundaries: global cu_seq_lens, attention exchanges
    else:
        local[SP_KWARG] = None
        local["cu_seq_lens"] = torch.tensor(inside, dtype=cu_seq_lens.dtype, device=cu_seq_lens.device)
        local["max_seqlen"] = max(b - a for a, b in zip(inside, inside[1:]))
    return local


def _check_same_batch(batch: dict[str, Any], sp: SequenceParallel) -> None:
    input_ids = batch["input_ids"]
    device = input_ids.device
    fingerprint = torch.stack([
        input_ids.sum(),
        input_ids[:, 1::3].sum(),
        torch.as_tensor(batch.get("sample_index", 0), device=device).sum(),
        torch.tensor(input_ids.numel(), device=device),
    ]).to(torch.int64)  # (4,)
    gathered = [torch.empty_like(fingerprint) for _ in range(sp.size)]
    dist.all_gather(gathered, fingerprint, group=sp.group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            "sequence parallelism: the ranks of one sequence-parallel group got different micro-batches; the "
            "DataModule must give global ranks g and g' the same samples when g // P == g' // P "
            "(P = model.sequence_parallel_size), as MixtureDataModule does"
        )
