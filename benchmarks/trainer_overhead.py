"""Trainer overhead: tokens/s of `Trainer.fit` with LongContextLM against a minimal hand-written loop.

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
Throughput comes from the median step after `--warmup` (a step ends after its optimizer step), by wall clock
and by this process's CPU time (see common.StepClock). The variants run interleaved (manual, lean, demo, manual,
...); the ratio is the median over the repetitions of fit / manual measured back to back.

    python benchmarks/trainer_overhead.py        # ~3 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import warnings
from typing import Any

from common import (
    StepClock,
    common_args,
    hand_written_fit,
    interleaved,
    markdown_table,
    median,
    report,
    setup_env,
    small_llama_overrides,
    spread,
)

log = logging.getLogger("trainer_overhead")

RATIO_TARGET = 0.95


def make_batches(count: int, seq_len: int, micro_batch: int, max_docs: int, vocab_size: int) -> list:
    """`count` distinct micro-batches (PackedBatch) of random documents, collated by the project's collate."""
    import numpy as np

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


def run_manual(args: argparse.Namespace, batches: list) -> dict[str, float]:
    clock = hand_written_fit(build_module(args), batches, len(batches), grad_clip=1.0, warmup=args.warmup)
    return clock.rates(args.micro_batch * args.seq_len)


def run_fit(args: argparse.Namespace, batches: list, demo_settings: bool) -> dict[str, float]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from prolong_lit.callbacks.tokens import TokenAccounting

    clock = StepClock(args.warmup)

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.tick()  # after the optimizer step (no accumulation)

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
        trainer.fit(build_module(args), train_dataloaders=DataLoader(batches, batch_size=None))
    return clock.rates(args.micro_batch * args.seq_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch (= per optimizer step)")
    parser.add_argument("--max-docs", type=int, default=4, help="documents per row: 1 to this many, random")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts (>= 1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, interleaved")
    args = common_args(parser).parse_args(argv)
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
    rows: list[list[Any]] = []
    verdicts = []
    for name, runs in results.items():
        row: list[Any] = [name]
        for clock in ("wall", "cpu"):
            values = [r[clock] for r in runs]
            ratios = [r[clock] / m[clock] for r, m in zip(runs, results["manual loop"])]
            row += [median(values), spread(values), "1" if name == "manual loop" else f"{median(ratios):.3f}",
                    "-" if name == "manual loop" else spread(ratios)]
            if name != "manual loop":
                verdict = "met" if median(ratios) >= RATIO_TARGET else "NOT met"
                verdicts.append(f"{name} by {clock} time {median(ratios):.3f} {verdict}")
        rows.append(row)
    notes = [
        f"model: hidden {args.hidden_size}, {args.layers} layers, vocabulary {args.vocab_size:,}; "
        f"{args.micro_batch} x {args.seq_len} tokens per step, 1-{args.max_docs} documents per row; fp32; "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.repeats} interleaved repetitions",
        "tokens/s: from the run's median step; wall: wall clock; cpu: this process's CPU time (all threads), "
        "insensitive to time spent waiting for a core on a shared machine",
        "fit / manual: median over repetitions of the ratio within the repetition (runs back to back)",
        f"target: fit / manual >= {RATIO_TARGET} -- " + "; ".join(verdicts),
    ]
    headers = ["variant", "tokens/s wall", "range", "fit / manual wall", "range",
               "tokens/CPU-s", "range", "fit / manual CPU", "range"]
    report("Trainer overhead", markdown_table(headers, rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
