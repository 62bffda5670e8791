"""The LM head under FSDP2: collectives, bytes and time per micro-batch, `checkpointed` against `chunked` loss.

Two CPU processes (gloo) shard a small Llama (hidden 256, 2 layers, vocabulary 32,768: a head of 8.4M
parameters, 32 MiB in fp32) with FSDP2 as the recipe does (every layer a group, `lm_head` and `model.model`
roots) and run one micro-batch's forward + backward of `--tokens` tokens with the loss in chunks of `--chunk`:

    checkpointed  each chunk a checkpointed call of the head module: FSDP2 gathers the head again for every
                  chunk of the backward after the first
    chunked       one autograd function for the whole loss, an FSDP forward method of the head: gathered once

Every all-gather / reduce-scatter of the head is counted with the bytes this rank receives or sends
((W - 1) / W of the full tensor); steps are timed interleaved (a barrier before each), medians over repetitions.

    python benchmarks/lm_head_gather.py                       # ~3 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

from common import common_args, markdown_table, median, report, setup_env, small_llama_overrides, spread

VARIANTS = ("checkpointed", "chunked")


class HeadCollectives:
    """Counts (and sizes) the collectives on a tensor of `numel` elements while patched into torch.distributed."""

    def __init__(self, dist, full_numel: int, world: int) -> None:
        self.dist, self.full, self.world = dist, full_numel, world
        self.counts: Counter = Counter()
        self.originals = {}

    def _wrap(self, kind: str, original):
        def counted(*args, **kwargs):
            output = args[0] if args else kwargs["output"]
            full = output.numel() * (self.world if kind == "reduce_scatter" else 1)
            if full == self.full:
                self.counts[kind] += 1
                self.counts[kind + "_bytes"] += full * output.element_size() * (self.world - 1) // self.world
            return original(*args, **kwargs)
        return counted

    def __enter__(self):
        for kind, name in (("all_gather", "all_gather_single"), ("reduce_scatter", "reduce_scatter_single")):
            self.originals[name] = getattr(self.dist, name)
            setattr(self.dist, name, self._wrap(kind, self.originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(self.dist, name, original)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    setup_env(args.threads)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    from memory_vs_length import packed_batch

    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings
    from prolong_lit.parallel.fsdp import ShardingConfig
    from prolong_lit.parallel.plan import build_plan

    steps, counts = {}, {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        module = LongContextLM(
            llama=LlamaSettings(name_or_path="tiny", overrides=small_llama_overrides(args.vocab_size, 256, 2),
                                max_position_embeddings=args.tokens),
            seq_len=args.tokens,
            kernels=KernelSettings(attn_implementation="docmask", loss_chunk_size=args.chunk,
                                   loss_implementation=variant))
        module.set_parallel_plan(build_plan("cpu", rank, world, sharding=ShardingConfig()))
        module.configure_model()
        batch = packed_batch(args.tokens, 4, args.vocab_size, seed=rank)

        def step(module=module, batch=batch) -> None:
            loss_sum, count = module.compute_loss_sum(batch)
            (loss_sum / count).backward()
            module.zero_grad(set_to_none=True)

        step()  # warm-up (FSDP2's lazy init)
        with HeadCollectives(dist, module.model.lm_head.weight.numel(), world) as counted:
            step()
        steps[variant], counts[variant] = step, dict(counted.counts)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            dist.barrier()
            start = time.perf_counter()
            steps[variant]()
            times[variant].append(time.perf_counter() - start)
    if rank == 0:
        torch.save({"counts": counts, "times": times}, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="model.kernels.loss_chunk_size")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=7)
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from tests.helpers.ports import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_rank, args=(2, free_port(), args, out), nprocs=2)
        result = torch.load(out)
    counts, times = result["counts"], result["times"]
    ratios = [c / k for c, k in zip(times["chunked"], times["checkpointed"])]
    rows = []
    for variant in VARIANTS:
        c = counts[variant]
        rows.append([variant, c.get("all_gather", 0), f"{c.get('all_gather_bytes', 0) / 2**20:,.0f}",
                     c.get("reduce_scatter", 0), f"{c.get('reduce_scatter_bytes', 0) / 2**20:,.0f}",
                     f"{median(times[variant]):.3g}", spread(times[variant]),
                     f"{median(ratios):.3f}" if variant == "chunked" else "1",
                     spread(ratios) if variant == "chunked" else "-"])
    headers = ["loss", "head all-gathers", "MiB received", "head reduce-scatters", "MiB sent", "step s", "range",
               "step / checkpointed", "range"]
    notes = [f"2 ranks (gloo), hidden 256, 2 layers, vocabulary {args.vocab_size:,} (head fp32), {args.tokens:,} "
             f"tokens in 4 documents, loss chunks of {args.chunk}; one micro-batch's forward + backward per step, "
             f"median of {args.repeats} interleaved repetitions (ratio within a repetition)"]
    report("LM head gathered once per micro-batch", markdown_table(headers, rows), notes)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.helpers.ports
    raise SystemExit(main())
