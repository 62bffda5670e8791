"""LongContextEval: the long-context evaluation every N optimizer steps and at the end of fit, logged and reported.

Each evaluation (at optimizer step s = trainer.global_step) writes
- scalars `eval/<task>@<length>` and `eval/<category>` (HELMET's 0-100 scale) to every logger of the trainer, at
  step s; they also enter `trainer.callback_metrics`, so a ModelCheckpoint can monitor e.g. `eval/recall`;
- pictures to a TensorBoardLogger: `eval/score_vs_length` and `eval/needle/<task>` (score by depth x length);
- `<log_dir>/evals/step<s:06d>/`: `eval_results.json`, `eval_report.md` and the same pictures as PNG
  (`prolong_lit.evals.write_report`; `<log_dir>` is `trainer.log_dir` unless `output_dir` is given).

The evaluation itself is `prolong_lit.evals.run_evaluation` on the LightningModule's Hugging Face model
(`pl_module.model`), in eval mode, without gradients, inside the precision plugin's forward context (autocast
under `*-mixed`); train mode is restored afterwards. Under several ranks every rank evaluates its share of the
examples (FSDP shards need every rank's forward passes anyway) and rank zero logs and writes.

Every check (task names, lengths against the model's `max_position_embeddings`, depths, HELMET files present and
every line well-formed, the tokenizer against the model's vocabulary) runs in `setup`, before the first training
step. `python -m prolong_lit eval` (`prolong_lit.eval_command`) runs the same evaluation on a saved model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import (
    DEFAULT_DEPTHS,
    EvalResults,
    figure_to_array,
    make_figures,
    registry,
    run_evaluation,
    write_report,
)
from prolong_lit.evals.helmet import HelmetData, load_helmet_task
from prolong_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# The synthetic recall tasks: they need no files, so the callback works on any run out of the box.
DEFAULT_TASKS = ("ruler_niah_s_1", "ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv", "json_kv")
SETTING = "LongContextEval"  # prefix of every error, so it names the callback's init_args to fix


@dataclass
class EvalSettings:
    """What to evaluate; shared by the callback and the `eval` command (same names as the callback's args)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] | None = None  # None: the model's max_position_embeddings
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples_per_task: int = 10
    seed: int = 42
    helmet_dir: str | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    use_cache: bool = True

    def resolved_lengths(self, max_position_embeddings: int) -> list[int]:
        return list(self.lengths) if self.lengths else [int(max_position_embeddings)]

    def run(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int,
            distributed: bool, helmet_data: HelmetData | None = None) -> EvalResults:
        """`run_evaluation` with these settings; `helmet_data`: what `check_settings` read (None: read again)."""
        return run_evaluation(
            model,
            tokenizer,
            self.tasks,
            self.resolved_lengths(max_position_embeddings),
            depths=self.depths,
            samples_per_task=self.samples_per_task,
            seed=self.seed,
            helmet_dir=self.helmet_dir,
            max_position_embeddings=max_position_embeddings,
            batch_size=self.batch_size,
            use_cache=self.use_cache,
            max_new_tokens=self.max_new_tokens,
            distributed=distributed,
            helmet_data=helmet_data,
        )


def check_settings(
    settings: EvalSettings, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_position_embeddings: int,
    prefix: str = f"{SETTING}.",
) -> HelmetData:
    """Every check that can fail before an evaluation starts, HELMET lines included.

    Errors name the setting to fix after `prefix` (`LongContextEval.lengths: ...`, or `--lengths: ...`). Returns the
    HELMET task data it read, {(task, length): data}, for the evaluations to use instead of reading the files again.
    """
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{prefix}tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}; give the tokenizer the model was trained with"
        )
    if settings.batch_size < 1:
        raise ValueError(f"{prefix}batch_size must be >= 1, got {settings.batch_size}")
    lengths = settings.resolved_lengths(max_position_embeddings)
    try:  # its messages start with the setting's name ("lengths: ...", "helmet_dir: ...")
        specs = registry.validate_request(
            settings.tasks, lengths, settings.depths, settings.samples_per_task, settings.helmet_dir,
            max_position_embeddings, tokenizer, settings.max_new_tokens,
        )
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{prefix}{err}") from err
    try:  # reads every line of every file: a malformed one is reported as file:line
        return {
            (spec.name, length): load_helmet_task(
                spec.name, settings.helmet_dir, length, settings.samples_per_task, settings.seed
            )
            for spec in specs
            if spec.source == "helmet"
            for length in lengths
        }
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{prefix}helmet_dir: {err}") from err


class LongContextEval(Callback):
    """Runs the long-context evaluation during `fit` and logs scalars, pictures and a report (see module doc)."""

    def __init__(
        self,
        tokenizer: str = "llama3",
        tasks: list[str] | None = None,
        lengths: list[int] | None = None,
        depths: list[float] | None = None,
        samples_per_task: int = 10,
        every_n_steps: int | None = None,
        eval_at_start: bool = False,
        eval_at_end: bool = True,
        seed: int = 42,
        helmet_dir: str | None = None,
        batch_size: int = 1,
        max_new_tokens: int | None = None,
        output_dir: str | None = None,
        log_images: bool = True,
    ) -> None:
        """
        Args:
            tokenizer: the model's tokenizer: a local Hugging Face tokenizer directory, or `llama3`.
            tasks: task names (prolong_lit.evals.registry.TASKS); None: the five synthetic recall tasks.
            lengths: evaluation lengths in tokens, each <= the model's max_position_embeddings; None: that maximum.
            depths: needle depths (0.0 = start of the context, 1.0 = end) of the synthetic tasks; None: 0, .25,
                .5, .75, 1.
            samples_per_task: examples per synthetic task and length (taking the depths in turn); test items per
                HELMET task.
            every_n_steps: evaluate every N optimizer steps; None: only at the start/end (below).
            eval_at_start: also evaluate before the first training step (the starting model's scores).
            eval_at_end: evaluate at the end of fit (skipped if that step was just evaluated).
            seed: makes the prompts reproducible (the same examples at every evaluation).
            helmet_dir: HELMET's `data/` folder, needed by the HELMET file tasks.
            batch_size: prompts decoded together; 1 avoids padded attention at long lengths.
            max_new_tokens: caps every task's generation length (None: HELMET's per-task lengths).
            output_dir: where the `step<N>/` report folders go; None: `<trainer.log_dir>/evals`.
            log_images: send the heatmaps and the score-vs-length plot to a TensorBoardLogger.
        """
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"{SETTING}.every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        self.tokenizer_name = tokenizer
        self.settings = EvalSettings(
            tasks=list(tasks) if tasks is not None else list(DEFAULT_TASKS),
            lengths=list(lengths) if lengths is not None else None,
            depths=list(depths) if depths is not None else list(DEFAULT_DEPTHS),
            samples_per_task=samples_per_task,
            seed=seed,
            helmet_dir=helmet_dir,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
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
        self._helmet_data = check_settings(self.settings, self.tokenizer, vocab_size, self.max_position_embeddings)
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
            results = self.settings.run(
                model, self.tokenizer, self.max_position_embeddings, trainer.world_size > 1, self._helmet_data
            )
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
