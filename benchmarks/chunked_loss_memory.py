"""Peak memory of the LM head + cross-entropy + backward: our chunked loss against full logits.

Input: the final norm's output (1, N, d) and an untied LM head d -> 128,256 (Llama-3's vocabulary), labels as
the collate makes them (-100 on every document's first token). Measured from those inputs to the end of the
backward (the gradients of the hidden states and of the head's weight included):

- chunked: `prolong_lit.model.loss.chunked_cross_entropy_sum` (2,048 loss tokens per checkpointed chunk), the
  loss the LightningModule trains with;
- full logits: transformers' own causal-LM loss (`ForCausalLMLoss`: fp32 logits (N, V), labels shifted,
  mean cross-entropy), what `LlamaForCausalLM(labels=...)` does.

Full logits at 16K tokens need ~4 x 16384 x 128256 x 4 B = 34 GB (fp32 logits, log-softmax and two gradients of
that size alive together), more than a 24 GiB machine has: they are measured at the lengths that fit
(`--full-lengths`, each skipped when the machine lacks the memory) and extrapolated linearly to `--tokens` (the
full loss is linear in N; the fit's per-token bytes are printed). The chunked loss is measured at every length,
so the ratio is also shown where both were measured. Each measurement runs in a fresh process (see common.py).

    python benchmarks/chunked_loss_memory.py          # ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from common import available_mib, common_args, markdown_table, measure_isolated, median, report, setup_env

log = logging.getLogger("chunked_loss_memory")

LLAMA3_VOCAB = 128_256
RATIO_TARGET = 0.25


def build_step(variant: str, tokens: int, vocab_size: int, hidden_size: int, docs: int, chunk: int):
    """Inputs of the loss and one loss + backward as a callable (run by common.py)."""
    import torch

    from prolong_lit.constants import IGNORE_INDEX
    from prolong_lit.model.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)  # (1, N, d)
    lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
    labels = torch.randint(0, vocab_size, (1, tokens))  # (1, N), unshifted
    labels[0, torch.arange(0, tokens, max(1, tokens // docs))] = IGNORE_INDEX  # document starts

    def chunked() -> None:
        loss_sum, count = chunked_cross_entropy_sum(hidden, labels, lm_head, chunk)
        (loss_sum / count).backward()

    def full() -> None:
        from transformers.loss.loss_utils import ForCausalLMLoss

        logits = lm_head(hidden)  # (1, N, V)
        ForCausalLMLoss(logits, labels, vocab_size).backward()

    return chunked if variant == "chunked" else full


def full_estimate_mib(tokens: int, vocab_size: int) -> float:
    """Four fp32 (N, V) tensors at the peak (measured: 4.0 per token, see the fit in the output)."""
    return 4 * tokens * vocab_size * 4 / 2**20


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept MiB, MiB per token) of a least-squares line through (tokens, MiB)."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="the length of the target comparison")
    parser.add_argument("--full-lengths", type=int, nargs="+", default=[2048, 4096],
                        help="lengths at which full logits are measured (each skipped if it cannot fit)")
    parser.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB)
    parser.add_argument("--hidden-size", type=int, default=64,
                        help="LM head input width (tiny: 64; it only changes the head's weight and gradient)")
    parser.add_argument("--docs", type=int, default=8, help="documents per row (their first tokens carry no loss)")
    parser.add_argument("--chunk", type=int, default=2048, help="model.kernels.loss_chunk_size")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per configuration (interleaved)")
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)

    lengths = sorted({*args.full_lengths, args.tokens})
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    skipped: dict[tuple[str, int], str] = {}  # one note per configuration, whatever the repetitions
    for _ in range(args.repeats):
        for tokens in lengths:
            for variant in ("chunked", "full"):
                if variant == "full" and tokens not in args.full_lengths:
                    continue
                need = full_estimate_mib(tokens, args.vocab_size) if variant == "full" else 0.0
                if need > 0.8 * available_mib():
                    skipped[(variant, tokens)] = (f"full logits at {tokens:,} tokens: needs ~{need / 1024:.1f} GiB, "
                                   f"{available_mib() / 1024:.1f} GiB available")
                    continue
                kwargs = dict(variant=variant, tokens=tokens, vocab_size=args.vocab_size,
                              hidden_size=args.hidden_size, docs=args.docs, chunk=args.chunk)
                result = measure_isolated("chunked_loss_memory:build_step", kwargs, args.threads)
                log.info("%s %d tokens: %s", variant, tokens, result)
                results.setdefault((variant, tokens), []).append(result)

    def peak(variant: str, tokens: int, key: str = "tensor_peak_mib") -> float | None:
        runs = results.get((variant, tokens))
        return median([r[key] for r in runs]) if runs else None

    measured_full = [(t, peak("full", t)) for t in lengths if peak("full", t) is not None]
    intercept, per_token = linear_fit(measured_full) if measured_full else (0.0, 0.0)
    rows: list[list[Any]] = []
    target_ratio = None
    for tokens in lengths:
        ours, full = peak("chunked", tokens), peak("full", tokens)
        how = "measured"
        if full is None and measured_full:
            full, how = intercept + per_token * tokens, "extrapolated"
        ratio = ours / full if ours and full else None
        if tokens == args.tokens:
            target_ratio = ratio
        rows.append([
            f"{tokens:,}", ours, peak("chunked", tokens, "rss_peak_mib"), peak("chunked", tokens, "seconds"),
            full if full is not None else "not run", how if full is not None else "-",
            peak("full", tokens, "rss_peak_mib") or "-", peak("full", tokens, "seconds") or "-",
            f"{ratio:.3f}" if ratio else "-",
        ])
    headers = ["tokens", "chunked peak MiB", "chunked RSS MiB", "chunked s", "full peak MiB", "full figure",
               "full RSS MiB", "full s", "chunked / full"]
    notes = [
        f"vocabulary {args.vocab_size:,}, LM head input width {args.hidden_size}, {args.docs} documents, chunk "
        f"{args.chunk} tokens, fp32; loss + backward from given hidden states; median of {args.repeats}",
        "peak MiB: tensor accounting (judged); RSS MiB: resident high-water mark; both above the state before "
        "the loss; s: one cold loss + backward in a fresh process (indicative only)",
    ]
    if measured_full:
        notes.append(f"full logits fit over {', '.join(f'{t:,}' for t, _ in measured_full)} tokens: "
                     f"{intercept:.0f} MiB + {per_token * 2**20:,.0f} bytes per token "
                     f"(= {per_token * 2**20 / (args.vocab_size * 4):.2f} fp32 copies of a logits row)")
    notes += [f"skipped {s}" for s in skipped.values()]
    if target_ratio is not None:
        verdict = "met" if target_ratio <= RATIO_TARGET else "NOT met"
        notes.append(f"target: chunked at most {RATIO_TARGET} of full logits at {args.tokens:,} tokens -- "
                     f"{verdict} ({target_ratio:.3f})")
    report("Chunked loss memory", markdown_table(headers, rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
