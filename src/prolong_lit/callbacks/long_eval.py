"""LongContextEval: the long-context evaluation every N optimizer steps and at the end of fit, logged and reported.

Each evaluation (at optimizer step s = trainer.global_step) writes
- scalars (HELMET's 0-100 scale) to every logger of the trainer (TensorBoard included), at step s:
  `eval/<task>@<length>`, HELMET's category scores `eval/category/<category>@<length>` and their means over the
  lengths `eval/category/<category>` (complete categories only: `prolong_lit.evals.categories`); they also enter
  `trainer.callback_metrics`, so a ModelCheckpoint can monitor e.g. `eval/category/recall`;
- pictures to a TensorBoardLogger: `eval/score_vs_length` and `eval/needle/<task>` (score by depth x length);
- `<log_dir>/evals/step<s:06d>/`: `eval_results.json`, `eval_report.md`, HELMET's table (`helmet_table.csv`,
  `helmet_table.md`: lengths x categories and tasks) and the same pictures as PNG
  (`prolong_lit.evals.write_report`; `<log_dir>` is `trainer.log_dir` unless `output_dir` is given).

The evaluation itself is `prolong_lit.evals.run_evaluation` on the LightningModule's Hugging Face model
(`pl_module.model`), in eval mode, without gradients, inside the precision plugin's forward context (autocast
under `*-mixed`); train mode is restored afterwards. Under several ranks every rank evaluates its share of the
examples (FSDP shards need every rank's forward passes anyway) and rank zero logs and writes.

Every check (task names, lengths against the model's `max_position_embeddings`, depths, HELMET files present and
every line well-formed, the tokenizer against the model's vocabulary) runs in `setup`, before the first training
step. What to evaluate is an `EvalSettings` (`prolong_lit.evals.settings`), given in YAML as a mapping:

    init_args: {tokenizer: llama3, every_n_steps: 10, settings: {lengths: [2048], samples_per_task: 2}}

`python -m prolong_lit eval` (`prolong_lit.commands.eval`) runs the same evaluation on a saved model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError
from prolong_lit.evals import (
    EvalResults,
    EvalSettings,
    check_settings,
    figure_to_array,
    make_figures,
    run_evaluation,
    write_report,
)
from prolong_lit.evals.helmet import HelmetData
from prolong_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SETTING = "LongContextEval"  # prefix of every error, so it names the callback's init_args to fix


class LongContextEval(Callback):
    """Runs the long-context evaluation during `fit` and logs scalars, pictures and a report (see module doc)."""

    def __init__(
        self,
        tokenizer: str = "llama3",
        settings: EvalSettings | None = None,
        every_n_steps: int | None = None,
        eval_at_start: bool = False,
        eval_at_end: bool = True,
        output_dir: str | None = None,
        log_images: bool = True,
    ) -> None:
        """
        Args:
            tokenizer: the model's tokenizer: a local Hugging Face tokenizer directory, or `llama3`.
            settings: what to evaluate (tasks, lengths, depths, samples_per_task, ...; see EvalSettings); None:
                the defaults (the five synthetic recall tasks at the model's max_position_embeddings).
            every_n_steps: evaluate every N optimizer steps; None: only at the start/end (below).
            eval_at_start: also evaluate before the first training step (the starting model's scores).
            eval_at_end: evaluate at the end of fit (skipped if that step was just evaluated).
            output_dir: where the `step<N>/` report folders go; None: `<trainer.log_dir>/evals`.
            log_images: send the heatmaps and the score-vs-length plot to a TensorBoardLogger.
        """
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ConfigError(f"{SETTING}.every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        if settings is not None and not isinstance(settings, EvalSettings):
            raise TypeError(f"{SETTING}.settings: expected EvalSettings (or a mapping of its fields in YAML)")
        self.tokenizer_name = tokenizer
        self.settings = settings if settings is not None else EvalSettings()
        self.every_n_steps = every_n_steps
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.output_dir = output_dir
        self.log_images = log_images
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.max_position_embeddings: int | None = None
        self.last_results: EvalResults | None = None
        self._last_eval_step: int | None = None  # checkpointed: a resume does not evaluate the same step again
        self._seen_step: int | None = None
        self._helmet_data: HelmetData = {}  # the HELMET files as read by the checks in setup

    # -- checks --------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Load the tokenizer and run every check before training starts."""
        if stage != "fit":
            return
        vocab_size, self.max_position_embeddings = model_limits(pl_module)
        self.tokenizer = load_tokenizer(self.tokenizer_name, setting=f"{SETTING}.tokenizer")
        self._helmet_data = check_settings(self.settings, self.tokenizer, vocab_size, self.max_position_embeddings,
                                           prefix=f"{SETTING}.settings.", tokenizer_setting=f"{SETTING}.tokenizer")
        manifest = getattr(getattr(trainer, "datamodule", None), "manifest", None)
        if manifest is not None and manifest.vocab_size != len(self.tokenizer) and trainer.is_global_zero:
            log.warning(
                "%s.tokenizer %r has %d tokens but the training data was tokenized with %r (%d tokens): the scores "
                "will mean little unless they are the same tokenizer",
                SETTING, self.tokenizer_name, len(self.tokenizer), manifest.tokenizer, manifest.vocab_size,
            )

    # -- scheduling ----------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step = trainer.global_step
        if self.eval_at_start and self._last_eval_step != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step moves once per optimizer step, so this fires at accumulation boundaries only, on every rank
        # together (the evaluation has collectives).
        step = trainer.global_step
        if step == self._seen_step:
            return
        self._seen_step = step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_eval_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.eval_at_end and self._last_eval_step != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self._last_eval_step, "settings": asdict(self.settings),
                "tokenizer": self.tokenizer_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_eval_step = state_dict.get("last_eval_step")

    # -- the evaluation ------------------------------------------------------------------------------------

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> EvalResults:
        """Evaluate now (every rank must call this), then log and write the report on rank zero."""
        if self.tokenizer is None:
            raise RuntimeError(f"{SETTING}: evaluate() before setup(); the Trainer calls setup first")
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{SETTING}: the LightningModule has no Hugging Face model in `.model`")
        step = trainer.global_step
        out_root = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "evals"  # all ranks
        started = time.perf_counter()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            results = run_evaluation(model, self.tokenizer, self.settings, self.max_position_embeddings,
                                     distributed=trainer.world_size > 1, helmet_data=self._helmet_data)
        self._last_eval_step = step
        self.last_results = results
        metrics = results.flat()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            self._log(trainer, results, metrics, step)
            paths = write_report(results, out_root / f"step{step:06d}",
                                 title=f"Long-context evaluation, step {step}", overwrite=True)
            log.info("long-context evaluation at step %d took %.1f s; report in %s: %s", step,
                     time.perf_counter() - started, paths["markdown"].parent,
                     ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
        return results

    def _log(self, trainer: Trainer, results: EvalResults, metrics: dict[str, float], step: int) -> None:
        # Straight to the loggers: `pl_module.log` on_step would drop values outside log_every_n_steps, and it
        # is not allowed in on_train_end.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not self.log_images:
            return
        boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if boards:
            for name, figure in make_figures(results).items():
                image = figure_to_array(figure)  # (H, W, 3) uint8
                for board in boards:
                    board.experiment.add_image(f"eval/{name}", image, global_step=step, dataformats="HWC")


def model_limits(pl_module: LightningModule) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of the module's Hugging Face config, before the model is built."""
    config = getattr(pl_module, "hf_config", None)
    if config is None and isinstance(getattr(pl_module, "model", None), torch.nn.Module):
        config = getattr(pl_module.model, "config", None)
    if config is None:
        raise TypeError(
            f"{SETTING}: the LightningModule exposes no Hugging Face config (`.hf_config` or `.model.config`); "
            "the callback evaluates a transformers causal LM held in `.model`"
        )
    return int(config.vocab_size), int(config.max_position_embeddings)
