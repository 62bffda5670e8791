"""Data throughput: samples/s the mixture DataModule delivers against samples/s the demo model consumes.

Both sides are the demo exactly as configs/demo/pretrain.yaml sets it up (read from that file): the demo corpus
(configs/data/demo.yaml, built with `prepare` into --data-dir when it is missing), MixtureDataModule with the
demo's weights, seq_len and micro-batch size, and the demo's LongContextLM (tiny, 128,256-token vocabulary).

- delivered: micro-batches pulled from `train_dataloader()` with nothing else running: litdata reads, mixture
  lookup, the step's loss-token count and collate, in the demo's dataloader worker (`num_workers` from the
  config) and also in the training process itself (num_workers 0, the bare cost of a batch);
- consumed: training steps (forward, backward, clip, AdamW, schedule) of the demo model on micro-batches fetched
  beforehand from the same DataModule: the rate a loader must keep up with. It is measured without Trainer,
  which only makes the consumer faster and the test stricter.

The variants run interleaved; the ratio is the median over repetitions of delivered / consumed.

    python benchmarks/data_throughput.py                          # builds the demo data in a temp dir
    python benchmarks/data_throughput.py --data-dir data/demo     # reuse prepared demo data
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    common_args,
    hand_written_fit,
    interleaved,
    markdown_table,
    median,
    module_from_config,
    report,
    setup_env,
    spread,
)

log = logging.getLogger("data_throughput")

RATIO_TARGET = 20.0
DEMO_TRAIN = REPO / "configs" / "demo" / "pretrain.yaml"
DEMO_DATA = REPO / "configs" / "data" / "demo.yaml"


def demo_settings() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(data init_args, model init_args, trainer settings) of the demo config, as the file writes them (the
    model's seq_len is the data's: the module reads it from the DataModule at set-up)."""
    import yaml

    config = yaml.safe_load(DEMO_TRAIN.read_text())
    return dict(config["data"]["init_args"]), dict(config["model"]["init_args"]), config["trainer"]


def ensure_demo_data(data_dir: Path) -> None:
    """Build the demo corpus into `data_dir` with `prepare` unless it already holds prepared data."""
    if (data_dir / "manifest.json").is_file():
        return
    log.info("building the demo data into %s (python -m prolong_lit prepare, ~30 s)", data_dir)
    subprocess.run([sys.executable, "-m", "prolong_lit", "prepare", "--config", str(DEMO_DATA),
                    "--output_dir", str(data_dir)], check=True, cwd=REPO)


def datamodule(data_dir: Path, data: dict[str, Any], num_workers: int):
    from prolong_lit.data.datamodule import MixtureDataModule

    module = MixtureDataModule(**{**data, "data_dir": str(data_dir), "num_workers": num_workers})
    module.setup("fit")
    return module


def delivered(data_dir: Path, data: dict[str, Any], num_workers: int, batches: int) -> float:
    """Samples/s from the train dataloader, after its first batch (worker start-up and first reads)."""
    module = datamodule(data_dir, data, num_workers)
    iterator = iter(module.train_dataloader())
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # stops the worker
    return batches * module.micro_batch_size / seconds


def consumed(model_args: dict[str, Any], seq_len: int, trainer: dict[str, Any], batches: list, warmup: int,
             micro_batch: int) -> float:
    """Samples/s of the demo model's training steps on pre-fetched micro-batches."""
    import torch

    torch.manual_seed(0)
    module = module_from_config(model_args, seq_len)
    clock = hand_written_fit(module, batches, trainer["max_steps"], trainer.get("gradient_clip_val"), warmup)
    return clock.rates(micro_batch)["wall"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="prepared demo data; built there if missing (default: a temporary directory)")
    parser.add_argument("--loader-batches", type=int, default=100, help="micro-batches timed per loader run")
    parser.add_argument("--warmup", type=int, default=1, help="model steps before timing starts (>= 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed model steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)

    data, model_args, trainer = demo_settings()
    with tempfile.TemporaryDirectory(prefix="demo_data_") as tmp:
        data_dir = args.data_dir or Path(tmp) / "demo"
        ensure_demo_data(data_dir)
        prefetch = datamodule(data_dir, data, num_workers=0).train_stream(rank=0, world_size=1)
        batches = [prefetch.micro_batch(m) for m in range(args.warmup + args.steps)]
        workers = int(data["num_workers"])
        variants = {f"DataModule, {workers} worker(s) (demo)": lambda: delivered(data_dir, data, workers,
                                                                                   args.loader_batches)}
        if workers != 0:
            variants["DataModule, in-process (0 workers)"] = lambda: delivered(data_dir, data, 0, args.loader_batches)
        variants["demo model training"] = lambda: consumed(model_args, data["seq_len"], trainer, batches,
                                                           args.warmup, data["micro_batch_size"])
        results = interleaved(variants, args.repeats)

    model = results["demo model training"]
    rows, verdicts = [], []
    for name, values in results.items():
        ratios = [v / m for v, m in zip(values, model)]
        is_model = name == "demo model training"
        rows.append([name, median(values), spread(values), "-" if is_model else f"{median(ratios):,.0f}",
                     "-" if is_model else spread(ratios)])
        if not is_model:
            verdicts.append(f"{name}: {median(ratios):,.0f}x {'met' if median(ratios) >= RATIO_TARGET else 'NOT met'}")
    notes = [
        f"demo settings: seq_len {data['seq_len']}, micro-batch {data['micro_batch_size']}, weights {data['weights']}, "
        f"model {model_args['llama']['name_or_path']}; loader: {args.loader_batches} micro-batches after the first; "
        f"model: {args.warmup} warm-up + {args.steps} timed steps; {args.repeats} interleaved repetitions",
        "ratio: median over repetitions of delivered / consumed samples/s of the same repetition",
        f"target: delivered >= {RATIO_TARGET:.0f}x consumed -- " + "; ".join(verdicts),
    ]
    report("Data throughput", markdown_table(
        ["variant", "samples/s (median)", "samples/s (range)", "delivered / consumed", "ratio range"], rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
