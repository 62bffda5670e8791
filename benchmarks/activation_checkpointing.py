"""Activation checkpointing policies and compiled decoder layers: peak memory and step time against length.

A small Llama (hidden 256, 4 layers, 4 heads of 64 / 2 kv heads, vocabulary 2,048: the length-dependent part of
a step is what is measured) trains on one packed row of `--docs` equal documents (document-masked attention,
the CPU path of `auto`; chunked loss), fp32, one forward + backward per step. Variants:

    none        no activation checkpointing
    full        every layer recomputed in backward (the recipe's `activation_checkpointing: true`)
    selective   every layer recomputed except its attention kernels (outputs and log-sum-exp kept)
    full+compile, selective+compile   the same with `model.kernels.compile_blocks: true` (inductor, C++ on CPU)

Memory: each (policy, length) in a fresh process under the tensor accounting of common.py (compiled variants are
not measured: their graphs do not run under a dispatch mode). Time: all variants built in this process, warmed up
(compilation included in the warm-up), then timed interleaved, one step per variant per repetition, by CPU time
and wall clock; the table gives medians, the spread (min-max) and each variant's ratio to `full` within a
repetition.

    python benchmarks/activation_checkpointing.py                      # 8K and 16K, ~25 min on 2 loaded cores
    python benchmarks/activation_checkpointing.py --lengths 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import time

from common import (
    common_args,
    markdown_table,
    measure_isolated,
    median,
    report,
    setup_env,
    small_llama_overrides,
    spread,
)
from memory_vs_length import packed_batch

log = logging.getLogger("activation_checkpointing")

POLICIES = {"none": False, "full": "full", "selective": "selective"}
VARIANTS = ("none", "full", "selective", "full+compile", "selective+compile")


def build_step(variant: str, tokens: int, docs: int, vocab_size: int, hidden_size: int, layers: int,
               block_size: int):
    """The module and batch of a variant; returns one forward + backward as a callable."""
    import torch

    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings
    from prolong_lit.parallel.plan import ParallelPlan

    policy, _, compiled = variant.partition("+")
    torch.manual_seed(0)
    module = LongContextLM(
        llama=LlamaSettings(name_or_path="tiny", overrides=small_llama_overrides(vocab_size, hidden_size, layers),
                            max_position_embeddings=tokens),
        seq_len=tokens,
        kernels=KernelSettings(attn_implementation="docmask", docmask_block_size=block_size,
                               compile_blocks=bool(compiled)),
    )
    module.set_parallel_plan(ParallelPlan(activation_checkpointing=POLICIES[policy]))
    module.configure_model()
    module.train()
    batch = packed_batch(tokens, docs, vocab_size)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        loss_sum, count = module.compute_loss_sum(batch)
        (loss_sum / count).backward()

    return step


def timed(step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    start, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384], help="row lengths in tokens")
    parser.add_argument("--docs", type=int, default=2, help="documents per row")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=1024, help="model.kernels.docmask_block_size")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per variant (interleaved)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)
    model = dict(docs=args.docs, vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers,
                 block_size=args.block_size)

    rows = []
    for tokens in sorted(args.lengths):
        memory = {}
        for variant in (v for v in args.variants if "+" not in v):
            memory[variant] = measure_isolated("activation_checkpointing:build_step",
                                               dict(variant=variant, tokens=tokens, **model), args.threads)
            log.info("%d tokens %s memory %s", tokens, variant, memory[variant])
        steps = {v: build_step(v, tokens, **model) for v in args.variants}
        for variant, step in steps.items():  # warm-up: first-step allocations, compilation and its recompile
            for _ in range(3 if "compile" in variant else 1):
                step()
        wall: dict[str, list[float]] = {v: [] for v in steps}
        cpu: dict[str, list[float]] = {v: [] for v in steps}
        for rep in range(args.repeats):
            for variant, step in steps.items():
                seconds, cpu_seconds = timed(step)
                wall[variant].append(seconds)
                cpu[variant].append(cpu_seconds)
            log.info("%d tokens rep %d: wall %s cpu %s", tokens, rep + 1, {v: round(t[-1], 2) for v, t in wall.items()},
                     {v: round(t[-1], 2) for v, t in cpu.items()})
        del steps
        for variant in args.variants:
            peak = memory.get(variant, {}).get("tensor_peak_mib")
            row = [f"{tokens:,}", variant, f"{peak:,.0f}" if peak else "-",
                   f"{peak / memory['full']['tensor_peak_mib']:.2f}" if peak and "full" in memory else "-"]
            for times in (cpu, wall):
                ratios = [t / f for t, f in zip(times[variant], times["full"])]
                row += [f"{median(times[variant]):.3g}", spread(times[variant]), f"{median(ratios):.3f}",
                        spread(ratios)]
            rows.append(row)
    headers = ["tokens", "variant", "peak MiB", "peak / full", "CPU s", "range", "CPU / full", "range", "wall s",
               "range", "wall / full", "range"]
    notes = [
        f"model: hidden {args.hidden_size}, {args.layers} layers, 4 heads / 2 kv heads, vocabulary "
        f"{args.vocab_size:,}; {args.docs} equal documents per row; docmask block {args.block_size}; fp32",
        f"CPU s / wall s: median of {args.repeats} interleaved warm steps (one forward + backward) by this process's "
        "CPU time (what the step computes, whatever else runs) and by wall clock; x / full: the ratio within each "
        "repetition, then the median; peak MiB: tensor accounting of one step in a fresh process",
    ]
    report("Activation checkpointing and compiled layers", markdown_table(headers, rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
