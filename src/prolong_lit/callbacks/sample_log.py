"""A record of which global samples each rank trained on: for auditing data order, resumes and sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from prolong_lit.data.format import PackedBatch


class SampleIndexLog(Callback):
    """Appends one JSON line per training micro-batch to `<dirpath>/rank<R>.jsonl`.

    Each line: `{"step": global_step, "sample_index": [...], "domain_ids": [...]}`. The sample indices are the
    mixture's global stream positions, so the files of all ranks together show exactly what the run consumed:
    disjoint across ranks, and continuing the same stream after a resume.
    """

    def __init__(self, dirpath: str) -> None:
        """
        Args:
            dirpath: directory for the per-rank files (created if missing; lines are appended across resumes).
        """
        self.dirpath = Path(dirpath)
        self._file = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a")  # noqa: SIM115

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: PackedBatch, batch_idx: int
    ) -> None:
        if self._file is None:
            return
        record = {"step": trainer.global_step, "sample_index": batch.sample_index.tolist(),
                  "domain_ids": batch.domain_ids.tolist()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
