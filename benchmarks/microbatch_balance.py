"""Balanced micro-batches: the attention time the data-parallel ranks wait for, before and after, over 1,000 steps.

Under FSDP every layer synchronises the data-parallel ranks, so each micro-batch slot of a step lasts as long as
its slowest rank. This script deals the rows of 1,000 optimizer steps of the recipe's mixtures three ways and
sums, over the slots, the slowest rank's attention cost Σ doc_len²:

- layout: the stream's plain order (rank r's micro-batch m holds sample start + m*W + r);
- ProLong: each rank sorts its own rows of the step by descending Σ doc_len² (ProLong's loader);
- balanced: `prolong_lit.data.balance.assign_step` (what `data.balance_micro_batches: true` trains on).

The sample order is the project's own (`MixturePlan` over the stage's weights, read from the recipe configs), so the
domain of every row is what a run would read. A row's documents depend on its domain's mode in the data configs:

- `slice` (code repositories and books, and the 512K slices): one document of the whole row;
- `slice_pack` (stage 2's *_64k): seq_len / 65,536 documents of 65,536 tokens;
- `concat` (short data): documents drawn at random, laid end to end and cut every seq_len tokens, so a row starts
  with the tail of a document and ends with the head of the next. Document lengths: under 4K tokens, drawn from
  the whole documents of the prepared demo corpus (`make demo-data`: standard-library docstrings and help
  topics); above, from the ProLong paper's length statistics of its short data (SHORTMIX_TAIL, ARXIV_TAIL below),
  log-uniform inside each bracket, up to 128K tokens (the paper gives no bracket above 32K: an assumption).
  Textbooks (whole LibreTexts subjects concatenated, far longer than a row) count as one document per row.

A `demo` row does the same through the real `MixtureDataModule` on the prepared demo data (its 2,048-token rows
and configs/demo/pretrain.yaml's weights), with the recipe's 8 ranks x 8 micro-batches.

Step time. A GPU's time on a micro-batch is modelled as a * Σ doc_len² + b * tokens. Every rank holds the same
tokens, so a step lasts Σ over slots of (b * tokens + a * slowest rank's Σ doc_len²), and the predicted tokens/s
gain is the ratio of that time before and after. a and b for Llama-3-8B on H100 (see `CostModel`): a from the
FLOPs of document-masked causal attention and FlashAttention-2's measured throughput; b from ProLong's measured
3,095 tokens/s per GPU at 64K minus the attention time of its mixture. Under sequence parallelism every GPU of a
group holds 1/P of both terms, so P does not change the ratio.

    python benchmarks/microbatch_balance.py        # ~20 s; needs data/demo (make demo-data)
    python benchmarks/microbatch_balance.py --tail-reading tokens     # ~7 min: many more, shorter documents
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from common import REPO, markdown_table, report, setup_env

log = logging.getLogger("microbatch_balance")

# Share longer than 4K / 8K / 16K / 32K tokens in ProLong's short data (paper, Table 14): all of ShortMix
# together, and its ArXiv part alone (papers are long). The other short domains use the ShortMix figures (which
# include ArXiv's long documents: heavy-tailed for them). The table's unit is read two ways (--tail-reading):
# `documents` (the share of documents, as the table is usually quoted) or `tokens` (the share of tokens in such
# documents; ArXiv's 8% of ShortMix's tokens x 7.6% above 32K alone makes most of ShortMix's 0.8%, which fits
# this reading). `tokens` makes long documents far rarer by count.
SHORTMIX_TAIL = {4096: 0.109, 8192: 0.072, 16384: 0.032, 32768: 0.008}
ARXIV_TAIL = {4096: 0.857, 8192: 0.640, 16384: 0.303, 32768: 0.076}
LONGEST_SHORT_DOC = 131_072  # upper end of the > 32K bracket (assumed)
ONE_DOCUMENT_CONCAT = {"textbooks"}  # concat domains whose documents outrun a row


@dataclass(frozen=True)
class CostModel:
    """Seconds per GPU of a row: attention_s_per_d2 * Σ doc_len² + linear_s_per_token * tokens (Llama-3-8B, H100).

    attention: per layer, causal attention over a document of d tokens costs 2 * d² * 4,096 FLOPs forward (QKᵀ
    and PV, half of the square; 32 query heads x 128), backward 2.5x that (FlashAttention recomputes QKᵀ) and
    the activation-checkpoint recompute 1x: 9 * d² * 4,096 per layer, 32 layers. FlashAttention-2 runs at
    ~330 TFLOP/s on an H100 SXM5 at head dim 128 (FlashAttention-3 paper's benchmark: 335 forward causal, 322
    backward, at 16K tokens).
    linear: ProLong measured 3,095 tokens/s per GPU (paper Table 15: 8 x H100, FSDP, 64K rows, its loader's
    sorting) on its ablation mixture, 60% one-document 64K rows and 40% short data. The time per row left after
    attention, spread over the row's tokens, is everything else (matmuls, norms, loss, what communication does not
    hide); `calibrated` solves for it.
    """

    attention_s_per_d2: float
    linear_s_per_token: float

    @classmethod
    def calibrated(cls, short_row_d2_64k: float) -> CostModel:
        attention_flops_per_d2 = 9 * 4096 * 32
        attention_s_per_d2 = attention_flops_per_d2 / 330e12
        seq = 65536
        mean_d2 = 0.6 * seq**2 + 0.4 * short_row_d2_64k
        row_s = seq / 3095
        return cls(attention_s_per_d2, (row_s - attention_s_per_d2 * mean_d2) / seq)

    def attention_share(self, d2: float, tokens: int) -> float:
        attention = self.attention_s_per_d2 * d2
        return attention / (attention + self.linear_s_per_token * tokens)


# -- rows ----------------------------------------------------------------------------------------------------------


def demo_document_lengths(demo_dir: Path) -> np.ndarray:
    """Lengths of the whole documents of the demo corpus's concat domains (a row's first and last pieces may be
    cut, so only the documents inside a row count)."""
    from prolong_lit.data.datamodule import DomainReader, count_items

    config = yaml.safe_load((REPO / "configs/data/demo.yaml").read_text())
    domains = [name for name, spec in config["domains"].items() if spec["mode"] == "concat"]
    reader = DomainReader(demo_dir, domains)
    lengths = [reader.read(d, i)["doc_lengths"][1:-1] for d, name in enumerate(domains)
               for i in range(count_items(demo_dir / name))]
    return np.concatenate(lengths).astype(np.int64)


def bracket_probabilities(body: np.ndarray, tail: dict[int, float], reading: str) -> np.ndarray:
    """Probability that a document falls in the body (under the first bracket) or in each bracket."""
    edges = [*tail, LONGEST_SHORT_DOC]
    above = list(tail.values()) + [0.0]
    shares = np.array([1 - above[0]] + [above[i] - above[i + 1] for i in range(len(tail))])  # body, brackets
    if reading == "documents":
        return shares
    # token shares -> document shares: divide by each bracket's mean length (log-uniform: (hi - lo) / ln(hi/lo))
    means = [float(body[body <= edges[0]].mean())]
    means += [(hi - lo) / np.log(hi / lo) for lo, hi in zip(edges[:-1], edges[1:])]
    probs = shares / np.array(means)
    return probs / probs.sum()


def draw_lengths(rng: np.random.Generator, count: int, body: np.ndarray, tail: dict[int, float],
                 reading: str) -> np.ndarray:
    """`count` document lengths: under the first bracket from `body`, above it log-uniform inside the brackets."""
    edges = [*tail, LONGEST_SHORT_DOC]
    probs = bracket_probabilities(body, tail, reading)
    which = rng.choice(len(probs), size=count, p=probs)
    out = rng.choice(body[body <= edges[0]], size=count)
    for k in range(1, len(probs)):
        picked = which == k
        lo, hi = np.log(edges[k - 1]), np.log(edges[k])
        out[picked] = np.exp(rng.uniform(lo, hi, size=int(picked.sum()))).astype(np.int64)
    return out


def concat_row_costs(rng: np.random.Generator, rows: int, seq_len: int, body: np.ndarray,
                     tail: dict[int, float], reading: str) -> np.ndarray:
    """Σ doc_len² of `rows` rows cut every seq_len tokens from documents laid end to end."""
    total = rows * seq_len
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < total:
        lengths = np.concatenate([lengths, draw_lengths(rng, max(1000, total // 500), body, tail, reading)])
    ends = np.cumsum(lengths)
    ends = ends[ends < total]
    points = np.union1d(ends, np.arange(0, total + 1, seq_len))  # document ends and row cuts
    pieces = np.diff(points).astype(np.float64)
    row = (points[:-1] // seq_len).astype(np.int64)
    return np.bincount(row, weights=pieces**2, minlength=rows)  # (rows,) exact: pieces² < 2**53


def domain_row_costs(spec: dict, name: str, rows: int, seq_len: int, body: np.ndarray,
                     rng: np.random.Generator, reading: str) -> np.ndarray:
    mode = spec["mode"]
    if mode == "slice" or name in ONE_DOCUMENT_CONCAT:
        return np.full(rows, float(seq_len) ** 2)
    if mode == "slice_pack":
        piece = int(spec["slice_length"])
        return np.full(rows, float(seq_len // piece) * piece**2)
    tail = ARXIV_TAIL if name == "arxiv" else SHORTMIX_TAIL
    return concat_row_costs(rng, rows, seq_len, body, tail, reading)


def stage_costs(stage_config: str, data_config: str, steps: int, samples_per_step: int, body: np.ndarray,
                reading: str, seed: int = 0) -> tuple[np.ndarray, int]:
    """Σ doc_len² of the first steps * samples_per_step samples of a stage's stream (in stream order), seq_len."""
    from prolong_lit.data.mixture import MixturePlan

    stage = yaml.safe_load((REPO / stage_config).read_text())["data"]["init_args"]
    data = yaml.safe_load((REPO / data_config).read_text())
    seq_len, weights = int(stage["seq_len"]), stage["weights"]
    domains = sorted(weights)
    n = steps * samples_per_step
    counts = MixturePlan(domains, [weights[d] for d in domains], [n] * len(domains), seed=42).lookup(np.arange(n))[0]
    uses = np.bincount(counts, minlength=len(domains))
    # each domain gets as many distinct rows as the stream reads from it: every row read once
    plan = MixturePlan(domains, [weights[d] for d in domains], [max(1, int(u)) for u in uses], seed=42)
    domain_of, item_of = plan.lookup(np.arange(n))
    rng = np.random.default_rng(seed)
    per_domain = [domain_row_costs(data["domains"][d], d, max(1, int(u)), seq_len, body, rng, reading)
                  for d, u in zip(domains, uses)]
    return np.array([per_domain[d][i] for d, i in zip(domain_of, item_of)]), seq_len


# -- the three deals -------------------------------------------------------------------------------------------------


def slowest_rank_totals(costs: np.ndarray, world: int, accumulate: int) -> dict[str, float]:
    """Σ over every slot of every step of the slowest rank's Σ doc_len², per deal (micro-batch of 1 row), and the
    floor no deal can beat (each slot at its ranks' mean)."""
    from prolong_lit.data.balance import assign_step

    steps = costs.reshape(-1, accumulate, world)  # (steps, slot, rank): the layout
    layout = steps.max(axis=2).sum()
    prolong = np.sort(steps, axis=1)[:, ::-1, :].max(axis=2).sum()  # every rank sorts its own rows
    balanced = sum(step.ravel()[assign_step(step.ravel(), accumulate, world, 1)].max(axis=1).sum() for step in steps)
    return {"layout": float(layout), "prolong": float(prolong), "balanced": float(balanced),
            "floor": float(costs.sum() / world)}


def demo_totals(demo_dir: Path, steps: int, world: int, accumulate: int) -> dict[str, float]:
    """The same totals through the real MixtureDataModule on the prepared demo data (balanced and layout)."""
    from prolong_lit.data.balance import row_cost
    from prolong_lit.data.datamodule import MixtureDataModule

    weights = yaml.safe_load((REPO / "configs/demo/pretrain.yaml").read_text())["data"]["init_args"]["weights"]
    totals = {}
    for name, balance in (("layout", False), ("balanced", True)):
        dm = MixtureDataModule(str(demo_dir), weights=weights, seq_len=2048, micro_batch_size=1, num_workers=0,
                               val_samples_per_domain=2, balance_micro_batches=balance)
        dm.setup("fit")
        # the demo's 1,353 rows fit in memory: read each once (random litdata reads cost ~1 ms each here)
        dm.reader.read = functools.lru_cache(maxsize=None)(dm.reader.read)
        stream = dm.train_stream(rank=0, world_size=world, accumulate=accumulate)
        cost_of = {}
        total = 0.0
        for step in range(steps):
            rows = stream.step_rows(step)  # (slots, W, 1)
            for k in rows.ravel():
                if k not in cost_of:
                    d, item = dm.plan[int(k)]
                    cost_of[k] = row_cost(dm.reader.read(d, item)["doc_lengths"])
            total += sum(max(cost_of[k] for k in slot.ravel()) for slot in rows)
        totals[name] = total
        costs = np.array([cost_of[k] for k in sorted(cost_of)], dtype=np.float64)  # stream order
        modelled = slowest_rank_totals(costs, world, accumulate)
        # the stream's deal is the one this script models for the recipe's stages
        assert sorted(cost_of) == list(range(steps * world * accumulate)) and modelled[name] == total, name
        totals.update({k: v for k, v in modelled.items() if k in ("prolong", "floor")})
    return totals


# -- report --------------------------------------------------------------------------------------------------------


def step_seconds(total_d2: float, steps: int, accumulate: int, seq_len: int, model: CostModel) -> float:
    """Model time of one step, per GPU (without sequence parallelism; P divides both terms alike)."""
    return accumulate * model.linear_s_per_token * seq_len + model.attention_s_per_d2 * total_d2 / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per stage")
    parser.add_argument("--demo-dir", default=str(REPO / "data/demo"), help="the prepared demo data (make demo-data)")
    parser.add_argument("--tail-reading", choices=["documents", "tokens"], default="documents",
                        help="what the paper's length shares count (see SHORTMIX_TAIL)")
    args = parser.parse_args(argv)
    setup_env(threads=1)
    demo_dir = Path(args.demo_dir)
    if not (demo_dir / "manifest.json").is_file():
        raise SystemExit(f"error: {demo_dir} holds no prepared demo data; run `make demo-data` first")
    body = demo_document_lengths(demo_dir)
    log.info("demo corpus: %d whole documents, median %d tokens", body.size, int(np.median(body)))

    rng = np.random.default_rng(1)
    short_64k = float(concat_row_costs(rng, 4000, 65536, body, SHORTMIX_TAIL, args.tail_reading).mean())
    model = CostModel.calibrated(short_64k)
    # (stage, GPUs, data-parallel ranks, micro-batches per step on each); stage 2 has 8-way sequence parallelism
    layouts = [("stage 1, 64K", 8, 8, 8), ("stage 1, 64K", 16, 16, 4), ("stage 1, 64K", 32, 32, 2),
               ("stage 2, 512K", 8, 1, 16), ("stage 2, 512K", 16, 2, 8), ("stage 2, 512K", 32, 4, 4),
               ("stage 2, 512K", 64, 8, 2)]
    configs = {"stage 1, 64K": ("configs/prolong-8b/stage1-64k.yaml", "configs/data/prolong-64k.yaml"),
               "stage 2, 512K": ("configs/prolong-8b/stage2-512k.yaml", "configs/data/prolong-512k.yaml")}
    rows = []
    cache: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    for stage, gpus, world, accumulate in layouts:
        key = (stage, world * accumulate)
        if key not in cache:
            cache[key] = stage_costs(*configs[stage], args.steps, world * accumulate, body, args.tail_reading)
        costs, seq_len = cache[key]
        totals = slowest_rank_totals(costs, world, accumulate)
        rows.append(table_row(stage, f"{gpus} GPUs: {world} x 1 x {accumulate}", totals, args.steps, accumulate,
                              seq_len, model))
        log.info("%s %s done", stage, rows[-1][1])
    demo = demo_totals(demo_dir, args.steps, 8, 8)
    rows.append(["demo data, 2K", "8 ranks x 1 x 8 (demo weights)", "-", *_ratios(demo), "-", "-"])
    notes = [
        f"short-data lengths: the paper's shares read as shares of {args.tail_reading}; under 4K the demo corpus's "
        f"{body.size:,} whole documents (median {int(np.median(body))} tokens)",
        f"{args.steps} optimizer steps per row, micro-batch 1 row; layout `GPUs: data-parallel ranks x micro-batch x "
        "micro-batches per step`; stage 2 runs 8-way sequence parallelism, so its data-parallel ranks are the nodes "
        "(1 on the recipe's 8 GPUs: nothing to balance)",
        "waits: Σ over slots of the slowest rank's Σ doc_len², relative to the layout's; floor = every slot at its "
        "ranks' mean (no deal can beat it)",
        f"cost model (Llama-3-8B, H100, FlashAttention-2): attention {model.attention_s_per_d2 * 65536**2:.1f} s per "
        f"one-document 64K row, everything else {model.linear_s_per_token * 65536:.1f} s per 64K row; attention is "
        f"{model.attention_share(65536**2, 65536):.0%} of a one-document 64K row and "
        f"{model.attention_share(524288**2, 524288):.0%} of a one-document 512K row, "
        f"{model.attention_share(short_64k, 65536):.1%} of a 64K short-data row "
        f"(its mean Σ doc_len² = {short_64k / 65536**2:.4f} x 64K²)",
        "attention share of step: the model's attention time / step time with the balanced deal",
        "demo data: the real MixtureDataModule over data/demo (2,048-token rows); its attention share is not "
        "modelled (a toy model on CPU), so it has no predicted gain",
    ]
    headers = ["stage", "layout", "attention share of step", "wait: ProLong sort", "wait: balanced",
               "floor", "predicted tokens/s: ProLong sort", "predicted tokens/s: balanced"]
    report("Balanced micro-batches", markdown_table(headers, rows), notes)
    return 0


def _ratios(totals: dict[str, float]) -> list[str]:
    return [f"{totals[k] / totals['layout']:.3f}" for k in ("prolong", "balanced", "floor")]


def table_row(stage: str, layout: str, totals: dict[str, float], steps: int, accumulate: int, seq_len: int,
              model: CostModel) -> list:
    times = {k: step_seconds(v, steps, accumulate, seq_len, model) for k, v in totals.items()}
    attention = model.attention_s_per_d2 * totals["balanced"] / steps / times["balanced"]
    gains = [f"+{times['layout'] / times[k] - 1:.1%}" for k in ("prolong", "balanced")]
    return [stage, layout, f"{attention:.0%}", *_ratios(totals), *gains]


if __name__ == "__main__":
    raise SystemExit(main())
