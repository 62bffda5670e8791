"""A phase's numbers (steps, tokens, final losses and eval scores), kept inside its checkpoints.

The pipeline's summary needs what only the trainer knew at the end of a phase. Writing those numbers into a file
beside the final checkpoint leaves a window (the process killed between the two writes) in which a rerun finds the
checkpoint but not the numbers, and reports the phase as 0 steps with no loss. `FitStats` puts them into every
checkpoint the phase saves (the final one included), so the numbers are written atomically with the weights they
describe, and restores them on resume, so that a resumed phase that has nothing left to train still reports the
losses it logged before it was interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from prolong_lit.checkpoint import DCP_META_FILE, torch_load

STATS_KEY = "prolong_lit_fit_stats"  # {"steps": int, "tokens": int | None, "metrics": {name: float}}
SUMMARY_METRICS = ("train/loss", "val/loss")  # plus every eval/* metric


def summary_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics the summary shows: the final train/val loss and every eval/* score, as floats."""
    return {key: float(value) for key, value in sorted(metrics.items())
            if key in SUMMARY_METRICS or key.startswith("eval/")}


class FitStats(Callback):
    """Writes the phase's numbers so far into every checkpoint (`STATS_KEY`) and restores them on resume.

    The pipeline adds it to each phase's trainer (it is not a setting of the phase's config)."""

    def __init__(self) -> None:
        self.restored: dict[str, Any] = {}

    def stats(self, trainer: Trainer) -> dict[str, Any]:
        """Steps, tokens and metrics now; metrics not logged since a resume keep their restored values."""
        datamodule = getattr(trainer, "datamodule", None)
        tokens = self.restored.get("tokens")
        if hasattr(datamodule, "consumed_samples") and hasattr(datamodule, "seq_len"):
            tokens = int(datamodule.consumed_samples()) * int(datamodule.seq_len)
        metrics = {**self.restored.get("metrics", {}), **summary_metrics(trainer.callback_metrics)}
        return {"steps": int(trainer.global_step), "tokens": tokens, "metrics": metrics}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATS_KEY] = self.stats(trainer)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.restored = dict(checkpoint.get(STATS_KEY) or {})


def read_fit_stats(checkpoint: Path) -> dict[str, Any] | None:
    """The numbers a checkpoint holds (`FitStats`), or None if it was saved without them."""
    file = checkpoint / DCP_META_FILE if checkpoint.is_dir() else checkpoint
    saved = torch_load(file)
    return saved.get(STATS_KEY) if isinstance(saved, dict) else None
