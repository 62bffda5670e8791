"""Training throughput and MFU of 8B-shaped Llama layers at long context on GPUs: tokens/s per GPU, MFU.

The real training path: `Trainer.fit` with `FSDP2Strategy` (bf16 compute, fp32 master weights and gradient
reduction: the recipe configs' settings), the project's LongContextLM (`attn_implementation: auto`, the fastest
varlen kernel present, printed in the table; chunked LM head + loss, activation checkpointing per decoder layer)
and, with `--sp P`, Ulysses sequence parallelism over P GPUs. Rows
are synthetic packed rows (one document per row by default, the costliest case for attention). Every rank runs
on its own GPU; Lightning launches the processes (`--devices`, default: all visible GPUs).

    python benchmarks/gpu/throughput.py --seq-len 65536                  # stage 1 shape: 64K, FSDP over all GPUs
    python benchmarks/gpu/throughput.py --seq-len 524288 --sp 8          # stage 2 shape: 512K, 8-way SP
    python benchmarks/gpu/throughput.py --layers 4 --seq-len 65536       # fewer layers to fit fewer GPUs
    python benchmarks/gpu/throughput.py --cpu-smoke                      # the code path on 2 CPU processes

MFU counts the model FLOPs of a training step (forward + backward = 3 x forward; activation recomputation is
not counted, as in the usual MFU definition): per token 6 x (parameters in matmuls, the LM head included) plus
causal attention, 12 x layers x (query heads x head dim) x (attended keys per query: (n+1)/2 on average for a
document of n tokens).
Peak bf16 dense throughput per GPU from `--peak-tflops`, or looked up from the GPU's name (H100 SXM 989, H200
989, A100 312). ProLong reports 3,095 tokens/s per H100 at 64K for Llama-3-8B (about 31% MFU); the goal is 45%.
The table goes to stdout; record it with the GPU model in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from prolong_lit.data.collate import collate_samples  # noqa: E402
from prolong_lit.data.format import PackedBatch  # noqa: E402
from prolong_lit.model.module import LongContextLM  # noqa: E402
from prolong_lit.model.optim import AdamW, WarmupCosine  # noqa: E402
from prolong_lit.model.settings import KernelSettings, LlamaSettings  # noqa: E402
from prolong_lit.parallel.strategy import FSDP2Strategy  # noqa: E402

log = logging.getLogger("gpu_throughput")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


class StepTimer(Callback):
    """Wall time between consecutive optimizer-step ends on rank 0, so everything of a step counts (loading and
    moving the batch, the sequence-parallel cut, the scheduler and logging too)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # inside an accumulation window
        self._last_step = trainer.global_step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first `warmup` ones (warmup >= 1: the first step has no start)."""
        stamps = self.stamps[warmup - 1:]
        return [b - a for a, b in zip(stamps[:-1], stamps[1:])]


class SyntheticRows(torch.utils.data.Dataset):
    """Packed rows of random tokens: `docs` equal documents per row, collated by the project's collate."""

    def __init__(self, seq_len: int, docs: int, vocab_size: int, rows: int) -> None:
        self.seq_len, self.docs, self.vocab_size, self.rows = seq_len, docs, vocab_size, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(index)
        lengths = np.full(self.docs, self.seq_len // self.docs, dtype=np.int32)
        lengths[-1] += self.seq_len - int(lengths.sum())
        return {"input_ids": rng.integers(0, self.vocab_size, self.seq_len, dtype=np.int32), "doc_lengths": lengths}


def collate(samples: list[dict[str, np.ndarray]]) -> PackedBatch:
    return collate_samples(samples, domain_ids=[0] * len(samples), sample_index=list(range(len(samples))))


def model_flops_per_token(config: Any, seq_len: int, docs: int) -> float:
    """Training FLOPs per token (3 x forward), matmul parameters + causal attention, no recomputation."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * config.intermediate_size
    matmul_params = layers * per_layer + hidden * config.vocab_size  # the LM head; the embedding is a lookup
    doc = seq_len / docs
    attended = (doc + 1) / 2  # keys per query, on average, in a causal document of `doc` tokens
    attention = layers * 2 * 2 * q_dim * attended  # QK^T and AV, 2 FLOPs per multiply-add
    return 3 * (2 * matmul_params + attention)


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=65536, help="tokens per packed row")
    parser.add_argument("--sp", type=int, default=1, help="sequence-parallel size P (Ulysses)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of Llama-3-8B's shape (8B: 32)")
    parser.add_argument("--docs", type=int, default=1, help="documents per row (1: the costliest attention)")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per GPU and micro-batch")
    parser.add_argument("--devices", type=int, default=None, help="GPUs (default: all visible)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak per GPU (default: from the GPU name)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny model on 2 CPU processes (gloo, exact CPU attention): checks the code path")
    parser.add_argument("--json", help="also write the raw numbers here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or pass --cpu-smoke to check the code path")
    overrides: dict[str, Any] = {"num_hidden_layers": args.layers}
    size = "llama3-8b"
    if cpu:
        size, overrides = "tiny", {}
        args.seq_len, args.devices, args.steps, args.warmup = min(args.seq_len, 2048), 2, 2, 1
    devices = args.devices or torch.cuda.device_count()
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first timed step starts where a warm-up step ends)")
    if devices % args.sp:
        raise SystemExit(f"--sp {args.sp} must divide the number of devices ({devices})")
    module = LongContextLM(
        llama=LlamaSettings(name_or_path=size, overrides=overrides, max_position_embeddings=args.seq_len,
                            rope_theta=8.0e6 if args.seq_len <= 65536 else 1.28e8),
        seq_len=args.seq_len, kernels=KernelSettings(attn_implementation="auto"),
        optimizer=partial(AdamW, lr=1e-5), scheduler=partial(WarmupCosine, warmup_steps=1),
    )
    # the parallel settings are the strategy's: FSDP over all GPUs, Ulysses over --sp of them, bf16 compute
    strategy = FSDP2Strategy(
        replicate_size=1, sequence_parallel_size=args.sp, activation_checkpointing=not args.no_activation_checkpointing,
        param_dtype=None if cpu else "bfloat16", reduce_dtype="float32",
    )
    total_steps = args.warmup + args.steps
    data_parallel = devices // args.sp
    rows = total_steps * args.micro_batch  # every rank reads the whole loader (no distributed sampler)
    loader = torch.utils.data.DataLoader(SyntheticRows(args.seq_len, args.docs, module.hf_config.vocab_size, rows),
                                         batch_size=args.micro_batch, collate_fn=collate)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            accelerator="cpu" if cpu else "cuda", devices=devices, num_nodes=1,
            strategy=strategy,
            precision="32-true",  # fp32 master weights and AdamW state; bf16 compute from the strategy's param_dtype
            max_steps=total_steps, gradient_clip_val=1.0, callbacks=[timer], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=scratch, use_distributed_sampler=False,
        )
        trainer.fit(module, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return
    timed = timer.step_seconds(args.warmup)
    step_s = statistics.median(timed)
    # each SP group processes micro_batch rows of seq_len tokens per step; data_parallel groups in parallel
    tokens_per_step = args.micro_batch * args.seq_len * data_parallel
    tokens_per_gpu = tokens_per_step / step_s / devices
    flops = model_flops_per_token(module.hf_config, args.seq_len, args.docs)
    achieved_tflops = tokens_per_gpu * flops / 1e12
    peak = None if cpu else peak_tflops(args)
    device_name = "CPU (smoke run)" if cpu else torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.max_memory_allocated() / 2**30 if not cpu else float("nan")
    result = {
        "device": device_name, "devices": devices, "sp": args.sp, "seq_len": args.seq_len, "layers":
        module.hf_config.num_hidden_layers, "docs": args.docs, "micro_batch": args.micro_batch,
        "step_s_median": step_s, "step_s": timed, "tokens_per_s_per_gpu": tokens_per_gpu,
        "model_tflops_per_gpu": achieved_tflops, "mfu": None if peak is None else achieved_tflops / peak,
        "peak_tflops": peak, "max_memory_gib_rank0": memory_gib, "attn_kernel": module.attn_kernel,
    }
    log.info("%s", result)
    mfu = "-" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    print("| device | attention kernel | GPUs | SP | tokens/row | layers | step s (median) | tokens/s per GPU | "
          "TFLOPS per GPU | MFU | max mem GiB (rank 0) |")  # noqa: T201
    print("|---|---|---|---|---|---|---|---|---|---|---|")  # noqa: T201
    print(f"| {device_name} | {module.attn_kernel} | {devices} | {args.sp} | {args.seq_len:,} | {result['layers']} | "
          f"{step_s:.2f} | {tokens_per_gpu:,.0f} | {achieved_tflops:.1f} | {mfu} | {memory_gib:.1f} |")  # noqa: T201
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
