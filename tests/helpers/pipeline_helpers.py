"""Callbacks the pipeline tests put into phases: a probe of the optimizer/scheduler state, and a crash."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from prolong_lit.callbacks.optimizer_handoff import optimizer_param_names


class OptimizerProbe(Callback):
    """Saves `<dirpath>/<tag>-start.pt` at train start: global step, scheduler step, learning rates, the model's
    weights and the optimizer state by parameter name; and the learning rate of each of the first batches."""

    def __init__(self, dirpath: str, tag: str) -> None:
        self.dirpath, self.tag = Path(dirpath), tag
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        names = [n for group in optimizer_param_names(optimizer, pl_module) for n in group]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        record = {
            "global_step": trainer.global_step,
            "scheduler_last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "rope_theta": pl_module.hf_config.rope_parameters["rope_theta"],
            "state": {n: {k: v.detach().clone() for k, v in optimizer.state[p].items()} for n, p in zip(names, params)},
            "weights": {n: p.detach().clone() for n, p in zip(names, params)},
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.dirpath / f"{self.tag}-start.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        torch.save(self.lrs, self.dirpath / f"{self.tag}-lrs.pt")


class CrashAtStep(Callback):
    """Raises before optimizer step `step + 1` starts (the checkpoint of step `step` is written by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")
