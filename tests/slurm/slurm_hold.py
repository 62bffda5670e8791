"""A callback for the Slurm requeue test: park every rank at a step boundary so the signal lands there.

Lightning's SLURMEnvironment handles SIGUSR1 inside a Python signal handler, wherever the main thread happens to
be: in the middle of a backward pass or between the optimizer step and the scheduler step, its checkpoint would
describe no step boundary and the resumed run could not match an uninterrupted one exactly. Parking every rank
after step `step` (after the optimizer, the LR scheduler and the sample log, before the next batch) makes the
test deterministic while the checkpoint, the requeue and the resume stay Lightning's own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class HoldForRequeue(Callback):
    """In a job's first run, waits after `step` optimizer steps until Slurm ends the run (SIGTERM on requeue)."""

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
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        # Python runs signal handlers between these sleeps: SIGUSR1 (checkpoint + `scontrol requeue`), then the
        # SIGTERM Slurm sends when it requeues, after which Lightning stops the run at the next batch.
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HoldForRequeue: no SIGTERM within {self.timeout_s} s at step {self.step}")
            time.sleep(0.2)
