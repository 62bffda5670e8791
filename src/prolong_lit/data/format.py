"""The on-disk contract between `prepare` and the DataModules.

A prepared dataset is a directory:

    <data_dir>/manifest.json        what was built (see `Manifest`)
    <data_dir>/<domain>/            one litdata-optimized directory per domain (index.json + chunk files)

Every sample of every domain is a dict with
    input_ids    np.int32 array of exactly `seq_len` token ids
    doc_lengths  np.int32 array, the lengths of the consecutive documents in the row (sum == seq_len)
    loss_mask    np.uint8 array of `seq_len` (1 = train on this token); only in domains with `has_loss_mask`
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
            raise FileNotFoundError(
                f"{setting}: {str(data_dir)!r} holds no {MANIFEST_NAME}; build it with `python -m prolong_lit prepare`"
            )
        raw = json.loads(path.read_text())
        domains = {name: DomainStats(**stats) for name, stats in raw.pop("domains").items()}
        return cls(domains=domains, **raw)
