"""Slurm's time-limit warning (`--signal=SIGUSR1@90`): checkpoint at a step boundary on every rank, requeue, stop.

Lightning's own auto-requeue (SLURMEnvironment) saves the checkpoint inside the Python signal handler, wherever
the main thread happens to be: in the middle of a backward pass, or between the optimizer and the scheduler step,
its checkpoint describes no step boundary and the resumed run is not the interrupted one. Worse, under FSDP the
save is a collective: ranks that take the signal at different points of their step run it against each other's
training collectives (all-gathers, reduce-scatters) and can hang or mix them up.

This callback's handler only records the signal. After every optimizer step (micro-batches of an accumulation
window excluded) the ranks agree with one tiny all-reduce whether any rank got it; if so all of them save the
checkpoint where Lightning's resume looks for it (`hpc_ckpt_<N>.ckpt` in the run's root directory), rank 0 runs
`scontrol requeue`, and the run stops. Installing a handler first also keeps Lightning from installing its own
(it never replaces an existing one).

The save is atomic like every checkpoint of a run (prolong_lit.checkpoint_io): Slurm kills the job when its grace
period ends, possibly during this save, which then leaves only a hidden partial file. The requeued `fit` (and
`pipeline`) resumes from the newest checkpoint that loads, an `hpc_ckpt_<N>.ckpt` or a periodic one, with a
warning naming any newer one that does not (`ProLongCLI.before_fit`, `checkpoint_resume.resolve_resume_path`).

`ProLongCLI` adds this callback by itself to every run that Lightning detects as a Slurm job, so configs do not
have to mention it; outside Slurm it does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class SlurmRequeue(Callback):
    """Checkpoint + `scontrol requeue` + stop, at the first optimizer-step boundary after the requeue signal."""

    def __init__(self) -> None:
        self.requested = False  # set by the signal handler (this rank)
        self._signal: int | None = None
        self._previous_handler: Any = None
        self._checked_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies: none
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        self._signal = int(environment.requeue_signal or signal.SIGUSR1)
        self._previous_handler = signal.signal(self._signal, self._record_signal)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous_handler)
            self._signal = None

    def _record_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: no logging (it takes locks), no collectives.
        self.requested = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._signal is None or trainer.global_step == self._checked_step:
            return  # not a Slurm run, or inside an accumulation window (no optimizer step since the last check)
        self._checked_step = trainer.global_step
        # every rank checks after the same optimizer steps, so this all-reduce pairs up across ranks
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        # Lightning's own resume path (private, stable since 1.x): fit finds hpc_ckpt_<max N> on the requeued job.
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        if trainer.is_global_zero:
            log.info("Slurm requeue signal: checkpointing at step %d to %s", trainer.global_step, path)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue_job()
        trainer.should_stop = True


def requeue_job() -> None:
    """`scontrol requeue` this job (an array task by its array id); Slurm then ends this run and starts it again."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise RuntimeError(f"SLURM_JOB_ID {job_id!r} is not a job id")
    log.info("requeueing Slurm job %s", job_id)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s -- the checkpoint is saved; resubmit by hand with the same "
                  "command to resume", job_id, result.returncode, result.stderr.strip())
