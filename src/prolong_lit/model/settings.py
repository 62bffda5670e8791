"""LongContextLM's grouped settings: which Llama (and its RoPE), and which kernels run it.

In YAML each group is a mapping under `model.init_args` (`fit --help` lists every field with its line below):

    model:
      class_path: prolong_lit.model.module.LongContextLM
      init_args:
        llama: {name_or_path: /path/to/Meta-Llama-3-8B-Instruct, rope_theta: 8.0e+6, max_position_embeddings: 65536}
        kernels: {attn_implementation: auto, loss_chunk_size: 2048}

Not frozen: Lightning's collection utilities (which save hyper-parameters) rebuild dataclasses field by field.

Parallelism (sharding, sequence parallelism, mixed precision, activation checkpointing) is not here: the
strategy owns it (`prolong_lit.parallel.strategy.FSDP2Strategy`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from prolong_lit.errors import ConfigError
from prolong_lit.model.attention import ATTN_IMPLEMENTATIONS, DEFAULT_DOCMASK_BLOCK_SIZE
from prolong_lit.model.loss import LOSS_IMPLEMENTATIONS


@dataclass
class LlamaSettings:
    """The Llama a run trains: where it starts from and its RoPE / length overrides.

    Args:
        name_or_path: what the run starts from: a local Hugging Face checkpoint directory whose weights load as
            they are (the recipe: Llama-3-8B-Instruct, then each phase's export), or a named size for a fresh
            model (`tiny` for the demo and tests, `llama3-8b`).
        overrides: other LlamaConfig fields to change, e.g. {num_hidden_layers: 4}.
        rope_theta: RoPE base written into the config (ProLong: 8e6 at 64K, 1.28e8 at 512K); None keeps it.
        rope_scaling: RoPE scaling dict (`rope_type` plus its fields) replacing the checkpoint's; None keeps it,
            {rope_type: default} removes it (ProLong uses none).
        max_position_embeddings: written into the config; must be >= model.seq_len. None keeps the
            model's.
    """

    name_or_path: str = "tiny"
    overrides: dict[str, Any] | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None


@dataclass
class KernelSettings:
    """Which kernels run the attention, the loss and the decoder layers.

    Args:
        attn_implementation: auto (on CUDA the fastest kernel present: fa4, flash, torch_varlen; the exact
            document-masked SDPA on CPU, and on CUDA with a loud warning when none is), fa4 (FlashAttention-4),
            flash (FlashAttention-2), torch_varlen (torch.nn.attention.varlen), docmask, or transformers'
            sdpa/eager (a dense L x L packed mask; comparisons only).
        docmask_block_size: queries per SDPA call in the document-masked attention (memory ~ block x document
            length).
        loss_chunk_size: tokens per chunk of the LM head + cross-entropy (the full logits never exist; ProLong's
            LOGIT_BLOCK_SIZE=2048).
        loss_implementation: chunked (one function for the whole chunked loss: under FSDP2 the LM head is
            gathered once per micro-batch and its gradient reduce-scattered once), checkpointed (each chunk a
            checkpointed call of the head: FSDP2 gathers it again per chunk in backward), or liger (Liger-Kernel's
            fused linear cross-entropy; CUDA and the liger-kernel package).
        compile_blocks: `torch.compile` each decoder layer (regional compilation) with the attention kernel
            left out of the graphs, so varying document lengths do not recompile.
    """

    attn_implementation: str = "auto"
    docmask_block_size: int = DEFAULT_DOCMASK_BLOCK_SIZE
    loss_chunk_size: int = 2048
    loss_implementation: str = "chunked"
    compile_blocks: bool = False

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.kernels.attn_implementation: {self.attn_implementation!r} is unknown; choose one "
                f"of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        for name in ("docmask_block_size", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.kernels.{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.kernels.loss_implementation: {self.loss_implementation!r} is unknown; choose one of "
                f"{', '.join(LOSS_IMPLEMENTATIONS)}"
            )


Settings = TypeVar("Settings", LlamaSettings, KernelSettings)


def settings_from(kind: type[Settings], value: Settings | dict[str, Any]) -> Settings:
    """`value` as a `kind`: as it is, or built from a mapping of its fields (recorded hyper-parameters)."""
    if isinstance(value, kind):
        return value
    known = {f.name for f in fields(kind)}
    if not isinstance(value, dict) or not set(value) <= known:
        raise ConfigError(f"model: {value!r} is not a {kind.__name__} (fields: {', '.join(sorted(known))})")
    return kind(**value)
