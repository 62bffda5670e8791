"""A callback for the Slurm requeue test: park every rank after a given step until the requeue signal arrived.

The project's SlurmRequeue callback acts at the first optimizer-step boundary after the signal, wherever the
signal lands; parking every rank after step `step` until its SlurmRequeue has seen the signal only makes the step
of the checkpoint known to the test (`step`), and makes sure the signal arrives before the run ends. The hold
runs before SlurmRequeue in the same `on_train_batch_end` (ProLongCLI appends SlurmRequeue last).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from prolong_lit.callbacks.slurm_requeue import SlurmRequeue


class HoldForRequeue(Callback):
    """In a job's first run, waits after `step` optimizer steps until this rank's SlurmRequeue got the signal."""

    def __init__(self, step: int, marker_dir: str, timeout_s: float = 120.0) -> None:
        """
        Args:
            step: global step after which every rank waits.
            marker_dir: each rank touches `<marker_dir>/rank<R>` once it waits, for the test to see.
            timeout_s: give up waiting (and fail the run) after this long, so a lost signal cannot hang the job.
        """
        self.step = step
        self.marker_dir = Path(marker_dir)
        self.timeout_s = timeout_s

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            return
        requeue = [c for c in trainer.callbacks if isinstance(c, SlurmRequeue)]
        if len(requeue) != 1:
            raise RuntimeError(f"HoldForRequeue: expected one SlurmRequeue callback, found {len(requeue)}")
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        while not requeue[0].requested:  # Python runs the signal handler between these sleeps
            if time.monotonic() > deadline:
                raise RuntimeError(f"HoldForRequeue: no requeue signal within {self.timeout_s} s at step {self.step}")
            time.sleep(0.2)
