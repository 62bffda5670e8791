"""The pipeline tests' phases (the demo config on tiny data) and the callbacks they add: a probe of the
optimizer/scheduler state, and a crash."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from prolong_lit.callbacks.optimizer_handoff import optimizer_param_names

SEQ_LEN, MICRO_BATCH, LR = 128, 2, 1e-3


def phase(name: str, steps: int, data_dir: Path, probes: Path, **extra) -> dict:
    """A phase: the demo pretrain config on tiny data, checkpointing every 2 steps, plus a probe callback.

    Its one ModelCheckpoint keeps save_last and has no dirpath: it writes to `<run_dir>/<phase>/checkpoints`, the
    phase's default_root_dir, where the pipeline resumes an interrupted phase from."""
    overrides = {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": steps,
        "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
        "trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "step{step}",
                          "auto_insert_metric_name": False, "save_last": True}},
            {"class_path": "prolong_lit.callbacks.tokens.TokenAccounting"},
        ],
        "data.init_args.data_dir": str(data_dir),
        "data.init_args.seq_len": SEQ_LEN,
        "data.init_args.micro_batch_size": MICRO_BATCH,
        "data.init_args.val_samples_per_domain": 2,
        "data.init_args.num_workers": 0,
        "data.init_args.weights": {"code": 0.5, "docs": 0.5},
        "model.init_args.optimizer.init_args.lr": LR,
        "model.init_args.scheduler.init_args.warmup_steps": 2,
        **extra.pop("overrides", {}),
    }
    probe = {"class_path": "tests.helpers.pipeline_helpers.OptimizerProbe",
             "init_args": {"dirpath": str(probes), "tag": name}}
    callbacks = [probe, *extra.pop("callbacks", [])]
    return {"name": name, "config": "configs/demo/pretrain.yaml", "overrides": overrides, "callbacks": callbacks,
            **extra}


def write_pipeline(path: Path, run_dir: Path, phases: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "phases": phases}, sort_keys=False))
    return path


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
