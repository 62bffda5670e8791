"""Shared by the run-level tests: the demo config pointed at tiny data, and readers for what a run wrote.

A run made from `demo_config(tmp_path, data_dir, run, ...)` keeps everything under its root directory
`tmp_path / run` (trainer.default_root_dir): the TensorBoard events and the saved config in `<root>/logs`, the
checkpoints in `<root>/checkpoints`, the per-rank sample logs in `<root>/samples`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]
DOMAINS = {"code_repos": 24, "prose": 24, "docstrings": 24}
SEQ_LEN = 128
MICRO_BATCH = 2
LOGS = "logs"  # the default logger's folder under trainer.default_root_dir (prolong_lit.cli)
CHECKPOINTS = "checkpoints"  # where a ModelCheckpoint without dirpath writes, under trainer.default_root_dir


def demo_config(tmp_path: Path, data_dir: Path, run: str, max_steps: int, stop_at: int | None = None) -> Path:
    """The demo pretrain config, pointed at tiny data, its run directory (default_root_dir) `tmp_path / run`."""
    config = yaml.safe_load((REPO / "configs/demo/pretrain.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=max_steps, val_check_interval=4, limit_val_batches=2, log_every_n_steps=1,
                   default_root_dir=str(run_dir(tmp_path, run)))
    checkpoint, *others = trainer["callbacks"]
    checkpoint["init_args"].update(every_n_train_steps=2)
    others.append(
        {
            "class_path": "prolong_lit.callbacks.sample_log.SampleIndexLog",
            "init_args": {"dirpath": str(run_dir(tmp_path, run) / "samples")},
        }
    )
    if stop_at is not None:
        others.append({"class_path": "tests.helpers.run_helpers.StopAtStep", "init_args": {"step": stop_at}})
    trainer["callbacks"] = [checkpoint, *others]
    config["data"]["init_args"].update(
        data_dir=str(data_dir), seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, val_samples_per_domain=2
    )
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(tmp_path: Path, run: str) -> Path:
    """The root directory (trainer.default_root_dir) of the run `demo_config(tmp_path, ..., run, ...)` makes."""
    return tmp_path / run


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under `log_dir`: a run's root directory or its `logs` folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def final_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a single-file checkpoint (e.g. `<root>/checkpoints/last.ckpt`)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def seen_samples(samples_dir: Path) -> list[int]:
    """The sample indices rank 0 trained on, in order (SampleIndexLog's `<root>/samples`)."""
    lines = (samples_dir / "rank0.jsonl").read_text().splitlines()
    return [i for line in lines for i in json.loads(line)["sample_index"]]


class StopAtStep(Callback):
    """Interrupts a run after `step` optimizer steps, as a crash or a time limit would (same max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
