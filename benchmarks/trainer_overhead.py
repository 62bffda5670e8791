"""Trainer overhead: what `Trainer.fit` adds to a step of LongContextLM, against a minimal hand-written loop.

The same model (LongContextLM, a small Llama: hidden 256, 4 layers, 4 heads / 2 kv heads, document-masked
attention, chunked loss) and the same pre-built micro-batches (made by the project's collate) go through:

- manual: forward + loss via the module's own `compute_loss_sum`, backward, gradient clipping at 1.0, AdamW step,
  LR-scheduler step, zero_grad; the optimizer and schedule are the module's own (its `optimizer` and `scheduler`
  factories over `param_groups`, as its `configure_optimizers` builds them);
- fit (lean): `Trainer.fit` over a DataLoader of the batches, gradient_clip_val 1.0, with logger, progress bar,
  checkpointing and model summary disabled: the training loop itself;
- fit (demo settings): what configs/demo/pretrain.yaml runs with: TensorBoard logger in `<root>/logs` (the CLI's
  default logger; log_every_n_steps 5), progress bar, ModelCheckpoint in `<root>/checkpoints` (every 20 steps,
  save_last), model summary and the TokenAccounting callback.

Both fit variants also run what the module does around each step that the manual loop does not (the step's exact
loss reduced across ranks, the gradient norm and the learning rate logged): it is part of what `fit` costs.

Why not just time both and divide: on this shared 2-core machine a step's length moves by 10-30% with the other
processes, so the ratio of two runs' tokens/s scattered over 0.68-1.24 between repetitions. Instead every step of
every run is split, by the clock of that same step, into

    model work = forward + loss (`compute_loss_sum`) + backward + the optimizer's update (AdamW, after the closure)
    other      = the rest of the step: clipping, scheduler, zero_grad, data, hooks, logging, the loop itself

Model work is the same computation in every variant; other is what a trainer (or the hand-written loop) adds.
A burst of load stretches a whole step, but `other` is measured in milliseconds, so its median is steady. The
predicted ratio is

    fit / manual tokens/s = (W + O_manual) / (W + O_fit)

with W the median model work over all steps of all variants and O the variant's median other, with a 95%
bootstrap interval (steps resampled within each variant). Clocks: this process's CPU time (all its threads,
including TensorBoard's writer; blind to time spent waiting for a core) and the wall clock. The direct ratio of
the runs' median steps is still reported beside it, with its spread. `--inject-ms N` checks the method: it burns
N ms of CPU per step in a fit callback, and the fit variants' `other` must grow by N.

    python benchmarks/trainer_overhead.py        # ~5 min on 2 idle cores, ~10 min under load 8
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
from common import common_args, interleaved, markdown_table, median, report, setup_env, small_llama_overrides

log = logging.getLogger("trainer_overhead")

RATIO_TARGET = 0.95
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


class StepParts:
    """Per step, by both clocks: the whole step and its model work (forward + backward + optimizer update)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.total: dict[str, list[float]] = {c: [] for c in CLOCKS}
        self.work: dict[str, list[float]] = {c: [] for c in CLOCKS}
        self._open: dict[str, float] = {}
        self._work = {c: 0.0 for c in CLOCKS}
        self._last_end: dict[str, float] | None = None

    @staticmethod
    def now() -> dict[str, float]:
        return {c: clock() for c, clock in CLOCKS.items()}

    def begin(self, part: str) -> None:
        self._open[part] = self.now()  # type: ignore[assignment]

    def end(self, part: str) -> None:
        start, stop = self._open.pop(part), self.now()
        for c in CLOCKS:
            self._work[c] += stop[c] - start[c]  # type: ignore[index]

    def step_end(self) -> None:
        """A step (and its optimizer step) ended: the time since the previous step's end is this step's total."""
        stop = self.now()
        if self._last_end is not None:
            for c in CLOCKS:
                self.total[c].append(stop[c] - self._last_end[c])
                self.work[c].append(self._work[c])
        self._last_end = stop
        self._work = {c: 0.0 for c in CLOCKS}

    def __repr__(self) -> str:
        total, work = self.timed("cpu")
        return (f"median step {np.median(total) * 1000:.0f} ms CPU, model work {np.median(work) * 1000:.0f} ms, "
                f"other {np.median(total - work) * 1000:.1f} ms")

    def timed(self, clock: str) -> tuple[np.ndarray, np.ndarray]:
        """(total, model work) seconds of the steps after warm-up (the first step has no start: it is dropped)."""
        skip = max(0, self.warmup - 1)
        return np.array(self.total[clock][skip:]), np.array(self.work[clock][skip:])


def instrument(module: Any, parts: StepParts) -> None:
    """Time the module's forward + loss (every variant calls `compute_loss_sum`)."""
    forward = module.compute_loss_sum

    def timed_forward(batch):
        parts.begin("forward")
        out = forward(batch)
        parts.end("forward")
        return out

    module.compute_loss_sum = timed_forward


def instrument_optimizer(optimizer: Any, parts: StepParts) -> None:
    """Time the optimizer's own update: from the end of the closure (Lightning runs forward, backward, hooks and
    clipping inside it) to the end of `step`."""
    step = optimizer.step

    def timed_step(closure=None, **kwargs):
        if closure is None:
            parts.begin("update")
            out = step(**kwargs)
        else:
            def closure_then_start():
                result = closure()
                parts.begin("update")
                return result

            out = step(closure=closure_then_start, **kwargs)
        parts.end("update")
        return out

    # the LR scheduler marks the step it wrapped; keep the mark so it does not warn about an overridden step
    timed_step._wrapped_by_lr_sched = getattr(step, "_wrapped_by_lr_sched", True)  # type: ignore[attr-defined]
    optimizer.step = timed_step


def make_batches(count: int, seq_len: int, micro_batch: int, max_docs: int, vocab_size: int) -> list:
    """`count` distinct micro-batches (PackedBatch) of random documents, collated by the project's collate."""
    from prolong_lit.data.collate import collate_samples

    rng = np.random.default_rng(0)
    batches = []
    for b in range(count):
        samples = []
        for _ in range(micro_batch):
            cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(0, max_docs)), replace=False))
            samples.append({
                "input_ids": rng.integers(0, vocab_size, size=seq_len, dtype=np.int32),
                "doc_lengths": np.diff(np.concatenate([[0], cuts, [seq_len]])).astype(np.int32),
            })
        start = b * micro_batch
        batches.append(collate_samples(samples, [0] * micro_batch, list(range(start, start + micro_batch))))
    return batches


def build_module(args: argparse.Namespace):
    from functools import partial

    import torch

    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.optim import AdamW, WarmupCosine
    from prolong_lit.model.settings import LlamaSettings

    torch.manual_seed(0)
    overrides = small_llama_overrides(args.vocab_size, args.hidden_size, args.layers)
    return LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=overrides), seq_len=args.seq_len,
                         optimizer=partial(AdamW, lr=1e-4), scheduler=partial(WarmupCosine, warmup_steps=2))


def run_manual(args: argparse.Namespace, batches: list) -> StepParts:
    """The step `fit` runs, by hand (as common.hand_written_fit), with the model work timed."""
    import torch

    from prolong_lit.model.optim import param_groups

    module = build_module(args)
    parts = StepParts(args.warmup)
    module.configure_model()
    module.train()
    instrument(module, parts)
    optimizer = module.optimizer_factory(param_groups(module.model.named_parameters()))
    scheduler = module.scheduler_factory(optimizer, len(batches))
    instrument_optimizer(optimizer, parts)
    parts.step_end()  # the first step starts here
    for batch in batches:
        loss_sum, _ = module.compute_loss_sum(batch)
        loss = loss_sum / batch.step_loss_tokens.clamp(min=1)
        parts.begin("backward")
        loss.backward()
        parts.end("backward")
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        parts.step_end()
    return parts


def run_fit(args: argparse.Namespace, batches: list, demo_settings: bool) -> StepParts:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from prolong_lit.callbacks.tokens import TokenAccounting

    parts = StepParts(args.warmup)

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            instrument_optimizer(trainer.optimizers[0], parts)
            parts.step_end()  # the first step starts here

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            parts.begin("backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            parts.end("backward")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            busy = time.process_time() + args.inject_ms / 1000  # a known framework cost (validation)
            while time.process_time() < busy:
                pass

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            parts.step_end()  # after the optimizer step (no accumulation)

    module = build_module(args)
    instrument(module, parts)
    # the progress bar and model summary still render (their cost is measured) but on stderr, off the table
    with tempfile.TemporaryDirectory(prefix="trainer_overhead_") as root, contextlib.redirect_stdout(sys.stderr):
        common = dict(accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches),
                      gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)
        if demo_settings:
            checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=20, save_top_k=-1,
                                         save_last=True)
            logger = TensorBoardLogger(save_dir=root, name="", version="logs")  # as ProLongCLI's default logger
            trainer = pl.Trainer(**common, logger=logger, log_every_n_steps=5,
                                 callbacks=[Clock(), checkpoint, TokenAccounting()])
        else:
            trainer = pl.Trainer(**common, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, callbacks=[Clock()])
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return parts


# -- statistics ------------------------------------------------------------------------------------------------


def pooled(runs: list[StepParts], clock: str) -> tuple[np.ndarray, np.ndarray]:
    """(total, model work) seconds of every timed step of every repetition of a variant."""
    totals, works = zip(*(r.timed(clock) for r in runs))
    return np.concatenate(totals), np.concatenate(works)


def predicted_ratios(results: dict[str, list[StepParts]], clock: str, resamples: int,
                     rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    """fit / manual tokens/s = (W + O_manual) / (W + O_variant): the estimate and a 95% bootstrap interval."""
    steps = {name: pooled(runs, clock) for name, runs in results.items()}
    all_work = np.concatenate([work for _, work in steps.values()])
    other = {name: total - work for name, (total, work) in steps.items()}

    def ratio(work: np.ndarray, mine: np.ndarray, base: np.ndarray) -> float:
        w = float(np.median(work))
        return (w + float(np.median(base))) / (w + float(np.median(mine)))

    out = {}
    base = other["manual loop"]
    for name, mine in other.items():
        boot = [ratio(rng.choice(all_work, all_work.size), rng.choice(mine, mine.size), rng.choice(base, base.size))
                for _ in range(resamples)]
        out[name] = (ratio(all_work, mine, base), *np.percentile(boot, [2.5, 97.5]))
    return out


def direct_ratios(results: dict[str, list[StepParts]], clock: str) -> dict[str, list[float]]:
    """Per repetition: the manual loop's median step / the variant's median step (runs back to back)."""
    def median_step(parts: StepParts) -> float:
        return float(np.median(parts.timed(clock)[0]))

    return {name: [median_step(m) / median_step(r) for r, m in zip(runs, results["manual loop"])]
            for name, runs in results.items()}


def table(results: dict[str, list[StepParts]], args: argparse.Namespace) -> tuple[str, list[str]]:
    rng = np.random.default_rng(0)
    rows: list[list[Any]] = []
    verdicts = []
    predicted = {clock: predicted_ratios(results, clock, args.resamples, rng) for clock in CLOCKS}
    direct = {clock: direct_ratios(results, clock) for clock in CLOCKS}
    for name, runs in results.items():
        total, work = pooled(runs, "cpu")
        other_ms = (total - work) * 1000
        lo, hi = np.percentile([np.median(rng.choice(other_ms, other_ms.size)) for _ in range(args.resamples)],
                               [2.5, 97.5])
        row: list[Any] = [name, f"{np.median(total) * 1000:,.0f}", f"{np.median(work) * 1000:,.0f}",
                          f"{np.median(other_ms):.1f} ({lo:.1f}-{hi:.1f})"]
        for clock in ("cpu", "wall"):
            estimate, low, high = predicted[clock][name]
            d = direct[clock][name]
            row += [f"{estimate:.3f} ({low:.3f}-{high:.3f})", f"{median(d):.3f} ({min(d):.2f}-{max(d):.2f})"]
            if name != "manual loop":
                verdict = "met" if low >= RATIO_TARGET else ("NOT met" if high < RATIO_TARGET else "undecided")
                verdicts.append(f"{name} by {clock} time {estimate:.3f} [{low:.3f}, {high:.3f}] {verdict}")
        rows.append(row)
    headers = ["variant", "step ms (CPU)", "model work ms", "other ms (95% CI)",
               "fit/manual CPU: attributed (95% CI)", "fit/manual CPU: direct (range)",
               "fit/manual wall: attributed (95% CI)", "fit/manual wall: direct (range)"]
    notes = [
        f"model: hidden {args.hidden_size}, {args.layers} layers, vocabulary {args.vocab_size:,}; "
        f"{args.micro_batch} x {args.seq_len} tokens per step, 1-{args.max_docs} documents per row; fp32; "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.repeats} interleaved repetitions"
        + (f"; {args.inject_ms} ms of CPU burnt per step in a fit callback (validation)" if args.inject_ms else ""),
        "model work = forward + loss + backward + the optimizer's update, timed inside each step; other = the "
        "rest of the step; step, work and other are medians over all timed steps of all repetitions, by CPU time",
        "attributed: (W + other_manual) / (W + other_variant), W = median model work over every step of every "
        f"variant; 95% bootstrap interval over steps ({args.resamples} resamples)",
        "direct: manual's median step / the variant's median step, per repetition; median (min-max)",
        f"target: fit / manual >= {RATIO_TARGET} (judged on the attributed interval) -- " + "; ".join(verdicts),
    ]
    return markdown_table(headers, rows), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (= per optimizer step)")
    parser.add_argument("--max-docs", type=int, default=4, help="documents per row: 1 to this many, random")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts (>= 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--inject-ms", type=float, default=0.0,
                        help="validation: burn this much CPU per step in a fit callback; `other` must grow by it")
    args = common_args(parser).parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    setup_env(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    distinct = make_batches(4, args.seq_len, args.micro_batch, args.max_docs, args.vocab_size)
    batches = [distinct[i % len(distinct)] for i in range(args.warmup + args.steps)]
    results = interleaved(
        {
            "manual loop": lambda: run_manual(args, batches),
            "fit (lean)": lambda: run_fit(args, batches, demo_settings=False),
            "fit (demo settings)": lambda: run_fit(args, batches, demo_settings=True),
        },
        args.repeats,
    )
    markdown, notes = table(results, args)
    report("Trainer overhead", markdown, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
