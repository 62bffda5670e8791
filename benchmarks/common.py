"""Shared helpers of the benchmarks: environment, interleaved timing, isolated peak-memory measurement, tables.

Timing. The development machines are small and shared, so the compared variants run interleaved (A B A B ...)
in one process and every figure is a median over the repetitions: a burst of load from another process then
lands on both variants instead of biasing one of them. Within a run, a rate comes from the median step
(`StepClock`), by wall clock and by the process's CPU time.

Peak memory (CPU). Each configuration runs in a fresh Python process (`measure_isolated`): the process builds
its model and inputs, then runs one step under two independent accountings:

- tensor accounting: a TorchDispatchMode (`TensorMemory`) adds the bytes of every storage an operator creates
  during the step (forward, saved activations, backward, gradients) and subtracts them when the storage is
  freed; its maximum is the step's peak above what existed before. It is exact, deterministic, insensitive to
  the allocator and to other processes, and counts what a GPU caching allocator would have to hold
  (`torch.cuda.max_memory_allocated`), including zero-filled tensors whose pages the OS maps lazily.
- resident memory: the kernel's high-water mark of the process (VmHWM), reset to the current RSS right before
  the step (`/proc/self/clear_refs` = 5), minus that RSS. It is the physical truth, including buffers that are
  not tensors (oneDNN scratch, OpenMP). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so large
  freed tensors go back to the OS at once instead of lingering in the heap and blurring the high-water mark.

Both are reported; they agree within a few MiB on these workloads, and the targets are judged on the tensor
accounting. A fresh process per configuration keeps one configuration's freed-but-cached memory, imports and
model build out of another's figure. (`torch.profiler`'s memory events are too sparse on CPU to give a peak.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MIB = 2**20
RESULT_MARKER = "BENCHMARK_RESULT "
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# Pinned glibc mmap threshold for the measuring processes (see the module docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

log = logging.getLogger(__name__)


def setup_env(threads: int | None = 1) -> None:
    """Offline, quiet, reproducible: what every benchmark process needs before importing the project.
    `threads` > 0 sets torch's intra-op threads (see `common_args`); 0 keeps torch's default."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PROLONG_LIT_CACHE", str(REPO / ".cache" / "prolong_lit"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    if threads and threads > 0:
        torch.set_num_threads(threads)


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # On a shared 2-core machine whose cores other processes keep busy, 2 OpenMP threads spend their time waiting
    # for each other at barriers: steps measured 2.5-25x slower than with 1 thread, and erratic. 1 thread gives
    # stable figures; the compared variants always run with the same setting.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared machine; 0: torch's default)")
    return parser


# -- machine and tables ----------------------------------------------------------------------------------------


def machine() -> str:
    """One line naming the machine and the library versions the figures were measured with."""
    import lightning
    import torch
    import transformers

    cpu = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    mem = _meminfo_kib("MemTotal") / 2**20
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {torch.get_num_threads()} torch threads, "
        f"load average {load:.1f} at start; Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, transformers {transformers.__version__}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, table: str, notes: Sequence[str] = ()) -> None:
    """Print a benchmark's result (stdout): a heading, the machine, the table and notes."""
    print(f"### {title}\n\nMachine: {machine()}\n\n{table}\n")
    for note in notes:
        print(f"- {note}")
    sys.stdout.flush()


def small_llama_overrides(vocab_size: int, hidden_size: int, layers: int) -> dict[str, Any]:
    """LlamaSettings `overrides` of the `tiny` size (4 query heads, 2 kv heads) at another width, depth and
    vocabulary."""
    overrides: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 172 // 64,  # tiny's MLP ratio
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if vocab_size <= 128_001:  # Llama-3's BOS/EOS ids would fall outside a cut vocabulary
        overrides.update(bos_token_id=1, eos_token_id=2)
    return overrides


def module_from_config(model: dict[str, Any], seq_len: int) -> Any:
    """The LongContextLM of a config's `model.init_args` (YAML as loaded: the settings groups as mappings, the
    optimizer and scheduler as class_path/init_args entries), built as the CLI builds it; `seq_len` is the
    data's (the CLI links data.init_args.seq_len to the model)."""
    from functools import partial

    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    factories = {}
    for key in ("optimizer", "scheduler"):
        if model.get(key):
            module_name, _, name = model[key]["class_path"].rpartition(".")
            component = getattr(importlib.import_module(module_name), name)
            factories[key] = partial(component, **(model[key].get("init_args") or {}))
    return LongContextLM(llama=LlamaSettings(**(model.get("llama") or {})), seq_len=seq_len,
                         kernels=KernelSettings(**(model.get("kernels") or {})), **factories)


# -- timing ----------------------------------------------------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run every variant once per repetition, in turn (A B A B ...); each call returns one measurement."""
    results: dict[str, list[Any]] = {name: [] for name in variants}
    for rep in range(repeats):
        for name, run in variants.items():
            value = run()
            results[name].append(value)
            log.info("repetition %d/%d  %-36s %s", rep + 1, repeats, name, value)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def spread(values: Sequence[float]) -> str:
    """min-max of the repetitions, for the tables."""
    return f"{_number(min(values))}-{_number(max(values))}"


class StepClock:
    """Wall-clock and process CPU time at every step's end; rates from the median step after `warmup`.

    The median step (rather than total time over all steps) keeps a burst of load from another process on a
    shared machine out of the figure. Process CPU time (all threads of this process) does not count time this
    process waited for a core, so it is far less sensitive to other processes than the wall clock; both are
    reported.
    """

    def __init__(self, warmup: int) -> None:
        if warmup < 1:
            raise ValueError("--warmup must be >= 1: the first timed step starts at the end of the last warm-up step")
        self.warmup = warmup
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def rates(self, units_per_step: float) -> dict[str, float]:
        """{"wall": units per second of the median step, "cpu": units per CPU-second of the median step}."""
        if len(self.wall) <= self.warmup:
            raise RuntimeError(f"only {len(self.wall)} steps timed, need more than warmup={self.warmup}")

        def per_step(stamps: list[float]) -> float:
            return median([b - a for a, b in zip(stamps[self.warmup - 1 : -1], stamps[self.warmup :])])

        return {"wall": units_per_step / per_step(self.wall), "cpu": units_per_step / per_step(self.cpu)}


def hand_written_fit(module: Any, batches: Sequence[Any], total_steps: int, grad_clip: float | None,
                     warmup: int) -> StepClock:
    """The training step `Trainer.fit` runs, written by hand: the baseline of the trainer-overhead and data
    benchmarks. `module` is a LongContextLM, `batches` PackedBatches; forward + loss, backward, clip, optimizer
    and schedule step per batch, with the optimizer and schedule the module configures (as its
    `configure_optimizers` does, over `total_steps`)."""
    import torch

    from prolong_lit.model.optim import param_groups

    module.configure_model()
    module.train()
    optimizer = module.optimizer_factory(param_groups(module.model.named_parameters()))
    scheduler = module.scheduler_factory(optimizer, total_steps)
    clock = StepClock(warmup)
    for batch in batches:
        loss_sum, _ = module.compute_loss_sum(batch)
        (loss_sum / batch.step_loss_tokens.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock


# -- memory ----------------------------------------------------------------------------------------------------


def _tensor_memory_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class TensorMemory(TorchDispatchMode):
        """Peak bytes of the CPU storages created by operators while active, net of those freed since."""

        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self._storages: dict[int, tuple[weakref.ref, int]] = {}

        def _freed(self, key: int, nbytes: int) -> None:
            if self._storages.pop(key, None) is not None:
                self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                    continue
                storage = tensor.untyped_storage()
                nbytes, key = storage.nbytes(), storage.data_ptr()
                if nbytes == 0 or key in self._storages:
                    continue  # a view of a storage already counted (or of one that existed before)
                ref = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
                self._storages[key] = (ref, nbytes)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            return out

    return TensorMemory


def _meminfo_kib(field: str, path: str = "/proc/meminfo") -> int:
    found = re.search(rf"^{field}:\s+(\d+)", Path(path).read_text(), re.MULTILINE)
    return int(found.group(1)) if found else 0


def available_mib() -> float:
    """Memory the machine can still give (MemAvailable), to skip configurations that cannot fit."""
    return _meminfo_kib("MemAvailable") / 1024


def measure_step(step: Callable[[], Any]) -> dict[str, float]:
    """Run `step` once in this process under both accountings; returns MiB above the state before and seconds."""
    status = "/proc/self/status"
    baseline = _meminfo_kib("VmRSS", status)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    tracker = _tensor_memory_class()()
    start = time.perf_counter()
    with tracker:
        step()
    seconds = time.perf_counter() - start
    return {
        "tensor_peak_mib": tracker.peak / MIB,
        "rss_peak_mib": (_meminfo_kib("VmHWM", status) - baseline) / 1024,
        "rss_before_mib": baseline / 1024,
        "seconds": seconds,
    }


def measure_isolated(target: str, kwargs: dict[str, Any], threads: int = 1) -> dict[str, float]:
    """Peak memory of one step in a fresh process.

    `target` is "module:function" of a benchmark script (a file in benchmarks/); the function takes `kwargs`,
    builds everything (model, inputs) and returns the step as a zero-argument callable, which is measured by
    `measure_step` in that process.
    """
    command = [sys.executable, str(BENCH_DIR / "common.py"), "--worker", target, "--kwargs", json.dumps(kwargs),
               "--threads", str(threads)]
    done = subprocess.run(command, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, cwd=REPO)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(f"{target}({kwargs}) failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def _worker(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="measure one step's peak memory (run by measure_isolated)")
    parser.add_argument("--worker", required=True, help="module:function returning the step callable")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the function")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup_env(args.threads)
    module_name, function_name = args.worker.split(":")
    build = getattr(importlib.import_module(module_name), function_name)
    step = build(**json.loads(args.kwargs))
    print(RESULT_MARKER + json.dumps(measure_step(step)), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
