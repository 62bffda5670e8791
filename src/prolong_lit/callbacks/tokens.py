"""Token accounting and throughput: how much of each domain the run has seen, and how fast.

Logged once per optimizer step (every `log_every_n_steps`):
    train/tokens_seen               all tokens of all ranks since the start of the run (resumes included)
    train/tokens_seen/<domain>      the same, per domain of the mixture
    train/tokens_per_sec            global throughput over the last logging window
    train/tokens_per_sec_per_device the same divided by the number of data-parallel ranks
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from prolong_lit.data.format import PackedBatch


class TokenAccounting(Callback):
    """Counts the tokens each domain contributes and the training throughput.

    Per-domain counts need every micro-batch's `domain_ids` (the mixture collate's contract). Counts are summed
    over ranks with one small all-reduce per logged step, so they are exact, not rank 0 times the world size.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        """
        Args:
            log_every_n_steps: how often to log; None follows the Trainer's `log_every_n_steps`.
        """
        self.log_every_n_steps = log_every_n_steps
        self._domains: list[str] = []
        self._pending = torch.zeros(0, dtype=torch.float64)  # tokens per domain on this rank since last sync
        self._seen = torch.zeros(0, dtype=torch.float64)  # global tokens per domain, synced
        self._window_start: float | None = None
        self._window_tokens = 0.0
        self._validation_started: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        self._domains = list(getattr(datamodule, "domains", None) or ["all"])
        if self._pending.numel() != len(self._domains):
            self._pending = torch.zeros(len(self._domains), dtype=torch.float64)
            self._seen = torch.zeros(len(self._domains), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"domains": self._domains, "seen": self._seen.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("domains") == self._domains or not self._domains:
            self._seen = torch.tensor(state_dict["seen"], dtype=torch.float64)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window_start = time.perf_counter()
        self._window_tokens = 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation time is not training time: move the throughput window's start past it.
        if self._window_start is not None and self._validation_started is not None:
            self._window_start += time.perf_counter() - self._validation_started
        self._validation_started = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: PackedBatch, batch_idx: int
    ) -> None:
        input_ids = batch.input_ids  # (B, L): under sequence parallelism this rank's chunk of every row
        domain_ids = batch.domain_ids
        row_tokens = float(input_ids.shape[-1])
        if domain_ids is None or len(self._domains) == 1:
            self._pending[0] += row_tokens * input_ids.shape[0]
        else:
            counts = torch.bincount(domain_ids.cpu(), minlength=len(self._domains)).to(torch.float64)
            self._pending += counts * row_tokens
        # Log at optimizer-step boundaries only: every rank reaches them together, so the collective is safe.
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step_done and trainer.global_step % every == 0:
            self._sync_and_log(trainer, pl_module)

    def _sync_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending = self._pending.clone()
        if dist.is_available() and dist.is_initialized():
            device = pl_module.device if dist.get_backend() == "nccl" else torch.device("cpu")
            pending = pending.to(device)
            dist.all_reduce(pending)
            pending = pending.cpu()
        self._pending.zero_()
        self._seen += pending
        now = time.perf_counter()
        self._window_tokens += float(pending.sum())
        metrics = {"train/tokens_seen": float(self._seen.sum())}
        if len(self._domains) > 1:
            metrics.update({f"train/tokens_seen/{d}": float(n) for d, n in zip(self._domains, self._seen)})
        if self._window_start is not None and now > self._window_start:
            tokens_per_sec = self._window_tokens / (now - self._window_start)
            metrics["train/tokens_per_sec"] = tokens_per_sec
            metrics["train/tokens_per_sec_per_device"] = tokens_per_sec / max(1, trainer.world_size)
        self._window_start, self._window_tokens = now, 0.0
        # Already global: log on rank zero's logger without another reduction.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True)

    @property
    def tokens_seen(self) -> dict[str, float]:
        """Global tokens per domain as of the last sync."""
        return dict(zip(self._domains, self._seen.tolist()))
