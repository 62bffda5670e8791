"""Sequence parallelism (Ulysses) on CPU: step time and the bytes the all-to-all exchanges move, P = 1, 2, 4.

P gloo processes share one packed row (the ranks of one sequence-parallel group, no data parallelism), the module
laid out by a parallel plan built from the process group (`build_plan`, unsharded). Each
timed step is what LongContextLM's training step does on a rank: cut the micro-batch (`shard_batch`), forward,
chunked loss, backward; the gradient reduction of data parallelism is left out (the same for any strategy).
The exchanges are counted by `ALL_TO_ALL_STATS` (the bytes each rank sends to the others) and timed by wrapping
the function that calls `all_to_all_single`; both are compared with the analytic volume per rank and step:

    layers x 2 (forward, backward) x B x L/P x D x (2 H + 2 H_kv r) x bytes x (P - 1) / P

(q, k, v go out together: H + 2 H_kv r heads with the kv heads repeated r times so P divides them; the output
comes back: H heads). Two layouts of documents: `straddling` (random lengths, documents across chunk boundaries:
every layer exchanges) and `inside` (documents of L/8 tokens: every chunk boundary is a document boundary, the
exchange is skipped and each rank attends within its chunk).

    python benchmarks/sequence_parallel.py            # ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from common import common_args, markdown_table, median, report, setup_env, spread

log = logging.getLogger("sequence_parallel")


def make_batch(layout: str, seq_len: int, vocab: int, seed: int = 0):
    """One packed row (a PackedBatch) of the given document layout."""
    import numpy as np

    from prolong_lit.data.collate import collate_samples

    rng = np.random.default_rng(seed)
    if layout == "inside":
        lengths = np.full(8, seq_len // 8)
    else:
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=5, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [seq_len]]))
    sample = {"input_ids": rng.integers(0, vocab, size=seq_len, dtype=np.int32),
              "doc_lengths": lengths.astype(np.int32)}
    return collate_samples([sample], [0], [0])


def analytic_bytes(args: argparse.Namespace, size: int) -> float:
    from prolong_lit.parallel.ulysses import kv_head_repeats

    if size == 1:
        return 0.0
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * kv_head_repeats(args.heads, args.kv_heads, size)
    per_layer = args.seq_len / size * head_dim * (2 * args.heads + 2 * kv) * 4 * (size - 1) / size  # fp32
    return args.layers * 2 * per_layer


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    setup_env(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import prolong_lit.parallel.ulysses as ulysses
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.sequence_batch import shard_batch
    from prolong_lit.model.settings import KernelSettings, LlamaSettings
    from prolong_lit.parallel.plan import build_plan

    dist.init_process_group("gloo", rank=rank, world_size=size)
    exchange_seconds: list[float] = []
    inner = ulysses._exchange

    def timed_exchange(x, group):
        start = time.perf_counter()
        result = inner(x, group)
        exchange_seconds.append(time.perf_counter() - start)
        return result

    ulysses._exchange = timed_exchange  # the autograd Function looks the name up at each call
    # every rank of the world in one sequence-parallel group (P = 1: none), the model unsharded
    plan = build_plan("cpu", rank, size, sequence_parallel_size=size, sharding=None)
    sp = plan.sequence_parallel
    torch.manual_seed(0)
    overrides = {"vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
                 "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,  # not tiny's 16
                 "bos_token_id": 1, "eos_token_id": 2}
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=overrides), seq_len=args.seq_len,
                           kernels=KernelSettings(docmask_block_size=1024, loss_chunk_size=2048))
    module.set_parallel_plan(plan)
    module.configure_model()
    results = {}
    for layout in ("straddling", "inside"):
        batch = make_batch(layout, args.seq_len, args.vocab)
        times, sent, calls, exchange = [], [], [], []
        for step in range(args.warmup + args.steps):
            ulysses.ALL_TO_ALL_STATS.reset()
            exchange_seconds.clear()
            dist.barrier()
            start = time.perf_counter()
            local = shard_batch(batch, sp) if sp is not None else batch
            loss_sum, _ = module.compute_loss_sum(local)
            (loss_sum / int(batch.step_loss_tokens) * size).backward()
            elapsed = time.perf_counter() - start
            module.model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(elapsed)
                sent.append(ulysses.ALL_TO_ALL_STATS.bytes_sent)
                calls.append(ulysses.ALL_TO_ALL_STATS.calls)
                exchange.append(sum(exchange_seconds))
        results[layout] = {"times": times, "bytes": sent, "calls": calls, "exchange": exchange}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(threads=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel sizes P")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="sweeps over --sizes (1 2 4 1 2 4 ...): load from other processes lands on every P")
    args = parser.parse_args()
    setup_env(args.threads)
    import torch.multiprocessing as mp

    merged: dict[tuple[int, str], dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for size in args.sizes:
                out = str(Path(tmp) / f"p{size}.json")
                mp.spawn(_worker, args=(size, free_port(), args, out), nprocs=size, join=True)
                for layout, r in json.loads(Path(out).read_text()).items():
                    into = merged.setdefault((size, layout), {key: [] for key in r})
                    for key, values in r.items():
                        into[key] += values
                    log.info("round %d P=%d %s: %.1f ms/step", round_ + 1, size, layout, median(r["times"]) * 1e3)
    rows = []
    for (size, layout), r in merged.items():
        step = median(r["times"])
        analytic = analytic_bytes(args, size) if layout == "straddling" else 0.0
        sent = median(r["bytes"])
        rows.append([size, layout, step * 1e3, spread([t * 1e3 for t in r["times"]]), args.seq_len / size / step,
                     median(r["exchange"]) * 1e3, int(median(r["calls"])), sent / 2**20, analytic / 2**20,
                     f"{sent / analytic:.4f}" if analytic else "-"])
    headers = ["P", "documents", "step ms (median)", "step ms (min-max)", "tokens/s per rank", "all-to-all ms",
               "all-to-all calls", "MiB sent per rank", "analytic MiB", "sent / analytic"]
    notes = [
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, vocab "
        f"{args.vocab}, fp32; one row of {args.seq_len} tokens; {args.threads} torch thread(s) per process; "
        f"{args.rounds} rounds of {args.steps} timed steps after {args.warmup} warm-up",
        "step = shard_batch + forward + chunked loss + backward on one rank (no gradient reduction)",
    ]
    report("Sequence parallelism (Ulysses all-to-all), CPU, gloo", markdown_table(headers, rows), notes)


if __name__ == "__main__":
    main()
