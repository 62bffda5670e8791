"""One prepared GPU check: attention kernel parity, FSDP2 model parity, host syncs and kernel names, throughput.

Runs in <= 9 minutes on one H100 with the GPU image's packages (torch, transformers, lightning; no litdata,
jsonargparse or omegaconf: nothing here imports them) plus the wheels of `make gpu-wheels`:

    PYTHONPATH=src python benchmarks/gpu/check.py --out $OUT      # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu/check.py --cpu-smoke --out /tmp/check   # the same code on CPU, tiny

Sections (each guarded: a failure is recorded in the tables and the next section runs; a global time budget
skips what no longer fits):
1. kernel parity: every available kernel (fa4, flash, torch_varlen) and the docmask path against an exact fp32
   reference (each document alone through SDPA), forward and backward, bf16, documents of 1 token to 64K, GQA
   32/8 heads, head dim 128; isolation: perturbing one document changes no other's outputs or gradients.
2. model parity: 2 decoder layers of Llama-3-8B width under FSDP2 (a world of 1) with bf16 parameters and fp32
   gradient reduction, the recipe's path (no autocast): loss and gradients of each kernel against docmask.
3. host syncs per training step (`torch.cuda.set_sync_debug_mode`) and the profiler's attention kernel names.
4. throughput of the 2-layer model at 8K/16K/64K per kernel: tokens/s, peak memory, MFU by two conventions.
5. the longest length with 2 and 4 layers (auto's kernel), extrapolated to 32 layers: tokens/s per GPU, MFU.
Writes check.md and check.json to --out (default $OUT, else benchmarks/gpu/results).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # check_report, check_sections beside this file

import torch  # noqa: E402
from check_report import Report  # noqa: E402
from check_sections import (  # noqa: E402
    environment,
    extrapolate_32_layers,
    kernel_parity,
    model_parity,
    syncs_and_kernel_names,
    throughput,
)

GPU_SHAPES = {"heads": 32, "kv_heads": 8, "head_dim": 128, "longest": 65536, "total": 131072,
              "model_len": 8192, "lengths": (8192, 16384, 65536), "size": "llama3-8b"}
CPU_SHAPES = {"heads": 4, "kv_heads": 2, "head_dim": 16, "longest": 200, "total": 512,
              "model_len": 256, "lengths": (128, 256), "size": "tiny"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/gpu/results",
                        help="folder for check.md and check.json (default: $OUT)")
    parser.add_argument("--budget-s", type=float, default=510.0, help="global time budget in seconds")
    parser.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                        help="tiny shapes on the CPU, docmask only: the code path and the tables, fast")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per throughput row (after 1 warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: by GPU name)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("check.py: no CUDA device; use --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    shapes = CPU_SHAPES if args.cpu_smoke else GPU_SHAPES
    report = Report(args.budget_s)
    report.environment = environment(device, args)
    kernels = report.environment["kernels"]
    with report.section("1. kernel parity", needs_s=20) as entry:
        if entry is not None:
            kernel_parity(entry, device, shapes, kernels)
    model = None
    with report.section("2. model parity (FSDP2, bf16 params, fp32 reduce)", needs_s=60) as entry:
        if entry is not None:
            model = model_parity(entry, device, shapes, kernels)
    with report.section("3. host syncs and kernel names", needs_s=30) as entry:
        if entry is not None:
            syncs_and_kernel_names(entry, device, shapes, kernels, model)
    with report.section("4. throughput (2 layers)", needs_s=30) as entry:
        if entry is not None:
            throughput(entry, device, shapes, kernels, model, report, args)
    with report.section("5. 32 layers, extrapolated from 2 and 4", needs_s=60) as entry:
        if entry is not None:
            extrapolate_32_layers(entry, device, shapes, model, args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    paths = report.write(Path(args.out))
    print(f"[check] wrote {', '.join(map(str, paths))}; all ok: {report.ok()} ({report.elapsed():.0f} s)")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
