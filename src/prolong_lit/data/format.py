"""The on-disk contract between `prepare` and the DataModules.

A prepared dataset is a directory:

    <data_dir>/manifest.json        what was built (see `Manifest`)
    <data_dir>/<domain>/            one litdata-optimized directory per domain (index.json + chunk files)

Every sample of every domain is a dict with
    input_ids    np.int32 array of exactly `seq_len` token ids
    doc_lengths  np.int32 array, the lengths of the consecutive documents in the row (sum == seq_len)
    loss_mask    np.uint8 array of `seq_len` (1 = train on this token); only in domains with `has_loss_mask`

The DataModules turn samples into `PackedBatch`es (data/collate.py), the micro-batch the LightningModule trains on
(docs/batch-contract.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prolong_lit.errors import MissingPathError

if TYPE_CHECKING:  # annotations only: `prepare` (which reads this module's contract) never imports torch
    import torch

MANIFEST_NAME = "manifest.json"
INPUT_IDS = "input_ids"
DOC_LENGTHS = "doc_lengths"
LOSS_MASK = "loss_mask"


@dataclass
class DomainStats:
    """What `prepare` built for one domain."""

    samples: int = 0
    tokens: int = 0
    max_token_id: int = -1
    has_loss_mask: bool = False
    # documents read, kept, and dropped per filter (e.g. {"read": 10, "kept": 7, "dropped_min_length": 3})
    documents: dict[str, int] = field(default_factory=dict)
    # tokens read but not written, per cause (e.g. {"slice_remainder": 812} or {"final_partial_sample": 90})
    dropped_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    seq_len: int
    domains: dict[str, DomainStats]

    def write(self, data_dir: str | Path) -> None:
        path = Path(data_dir) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, data_dir: str | Path, setting: str = "data.data_dir") -> Manifest:
        path = Path(data_dir) / MANIFEST_NAME
        if not path.is_file():
            raise MissingPathError(
                f"{setting}: {str(data_dir)!r} holds no {MANIFEST_NAME}; build it with `python -m prolong_lit prepare`"
            )
        raw = json.loads(path.read_text())
        domains = {name: DomainStats(**stats) for name, stats in raw.pop("domains").items()}
        return cls(domains=domains, **raw)


@dataclass
class PackedBatch:
    """A micro-batch of B packed rows of L tokens; documents never see each other (docs/batch-contract.md).

    Labels are NOT shifted (position t's output predicts labels[t + 1]) unless `labels_shifted`; the first token
    of every document and every masked token carry -100.
    """

    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 in every document
    cu_seq_lens: torch.Tensor  # (num_docs + 1,) int32: document boundaries over the flattened B*L tokens
    max_seqlen: int  # the longest document
    domain_ids: torch.Tensor  # (B,) each row's index in the DataModule's sorted domain list
    sample_index: torch.Tensor  # (B,) each row's global stream index (-1: a validation padding row)
    loss_tokens: torch.Tensor  # () positions with a label in this micro-batch
    step_loss_tokens: torch.Tensor  # () loss tokens of the whole optimizer step over all data-parallel ranks
    # Set by sequence-parallel sharding (a rank's chunk of every row): labels[t] is already position t's target,
    # and `sequence_exchange` says the documents cross chunk boundaries (attention must exchange heads for
    # sequence over the whole rows; else the chunk's own cu_seq_lens are exact).
    labels_shifted: bool = False
    sequence_exchange: bool = False
    # cu_seq_lens as Python ints (host side, never moved to the device), so attention needs no device-to-host
    # sync per layer; None when unknown (hand-built batches): the model then reads cu_seq_lens back once per batch
    doc_bounds: tuple[int, ...] | None = None

    def replace(self, **changes) -> PackedBatch:
        """A copy with some fields changed (new `cu_seq_lens` without new `doc_bounds` drop the stale bounds)."""
        if "cu_seq_lens" in changes and "doc_bounds" not in changes:
            changes["doc_bounds"] = None
        return replace(self, **changes)
