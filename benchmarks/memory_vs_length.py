"""Peak memory of one training step against the packed row length: our attention against transformers' own.

One row of `tokens` tokens packed with `--docs` equal documents, one forward + backward of LongContextLM's
training loss (chunked LM head + cross-entropy). Two attentions, everything else identical:

- ours: `LongContextLM.compute_loss_sum` with `attn_implementation=docmask` (the CPU path of `auto`), which
  passes the batch's `cu_seq_lens` to the attention function;
- sdpa: the same Hugging Face model with transformers' `sdpa` attention called the transformers way for packed
  rows (position_ids restarting at 0 per document, no attention_mask, use_cache=False): transformers then builds
  its dense (1, 1, L, L) document mask itself. The loss is the same chunked loss, so only attention differs.

Each (attention, length) runs in a fresh process (see common.py for the two accountings). The optimizer step is
left out: its state does not depend on the length. The vocabulary is cut to 2,048 by default so that the step's
length-dependent memory (activations, attention) is what is measured rather than the loss's constant chunk of
2048 x vocab logits (1 GiB at Llama-3's 128,256; chunked_loss_memory.py measures that part).

    python benchmarks/memory_vs_length.py                      # 4K, 8K, 16K, 32K; ~6 min on 2 idle cores
    python benchmarks/memory_vs_length.py --lengths 4096 8192 --vocab-size 128256
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from common import (
    available_mib,
    common_args,
    markdown_table,
    measure_isolated,
    median,
    report,
    setup_env,
    small_llama_overrides,
)

log = logging.getLogger("memory_vs_length")

VARIANTS = ("ours", "sdpa")
ATTENTION = {"ours": "docmask", "sdpa": "sdpa"}
GROWTH_TARGET = 2.3


def packed_batch(tokens: int, docs: int, vocab_size: int, seed: int = 0) -> Any:
    """One row of `tokens` tokens holding `docs` documents (equal lengths, the remainder in the last), collated
    by the project's own collate (a PackedBatch)."""
    import numpy as np

    from prolong_lit.data.collate import collate_samples

    if not 1 <= docs <= tokens:
        raise ValueError(f"--docs ({docs}) must be between 1 and the row length ({tokens})")
    lengths = np.full(docs, tokens // docs, dtype=np.int32)
    lengths[-1] += tokens - int(lengths.sum())
    rng = np.random.default_rng(seed)
    sample = {"input_ids": rng.integers(0, vocab_size, size=tokens, dtype=np.int32), "doc_lengths": lengths}
    return collate_samples([sample], domain_ids=[0], sample_index=[0])


def build_step(variant: str, tokens: int, docs: int, vocab_size: int, hidden_size: int, layers: int,
               block_size: int, loss_chunk: int):
    """Build the module and the batch; return one forward + backward as a callable (run by common.py)."""
    import torch

    from prolong_lit.model.loss import chunked_cross_entropy_sum
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(
        llama=LlamaSettings(name_or_path="tiny", overrides=small_llama_overrides(vocab_size, hidden_size, layers),
                            max_position_embeddings=tokens),
        seq_len=tokens,
        kernels=KernelSettings(attn_implementation=ATTENTION[variant], docmask_block_size=block_size,
                               loss_chunk_size=loss_chunk),
    )
    module.configure_model()
    module.train()
    batch = packed_batch(tokens, docs, vocab_size)

    def step() -> None:
        if variant == "ours":
            loss_sum, count = module.compute_loss_sum(batch)
        else:  # transformers' own packed path: it derives the dense document mask from position_ids
            hidden = module.model.model(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).last_hidden_state  # (B, L, d)
            loss_sum, count = chunked_cross_entropy_sum(hidden, batch.labels, module.model.lm_head, loss_chunk)
        (loss_sum / count).backward()

    return step


def sdpa_estimate_mib(tokens: int, layers: int) -> float:
    """transformers' sdpa path holds a bool L x L mask plus, per layer, a float copy saved for backward."""
    return tokens**2 * (1 + 4 * layers) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                        help="packed row lengths in tokens")
    parser.add_argument("--docs", type=int, default=8, help="documents per row")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary (Llama-3: 128256)")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (tiny: 64)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (tiny: 2)")
    parser.add_argument("--block-size", type=int, default=1024, help="model.kernels.docmask_block_size")
    parser.add_argument("--loss-chunk", type=int, default=2048, help="model.kernels.loss_chunk_size")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="measurements per configuration (interleaved); the tensor accounting is deterministic")
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)

    lengths = sorted(args.lengths)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    skipped: dict[tuple[str, int], str] = {}  # one note per configuration, whatever the repetitions
    for rep in range(args.repeats):
        for tokens in lengths:
            for variant in args.variants:
                need = sdpa_estimate_mib(tokens, args.layers) if variant == "sdpa" else 0.0
                if need > 0.8 * available_mib():
                    skipped[(variant, tokens)] = (f"{variant} at {tokens}: needs ~{need / 1024:.1f} GiB, "
                                   f"{available_mib() / 1024:.1f} GiB available")
                    continue
                kwargs = dict(variant=variant, tokens=tokens, docs=args.docs, vocab_size=args.vocab_size,
                              hidden_size=args.hidden_size, layers=args.layers, block_size=args.block_size,
                              loss_chunk=args.loss_chunk)
                result = measure_isolated("memory_vs_length:build_step", kwargs, args.threads)
                log.info("rep %d %s %d tokens: %s", rep + 1, variant, tokens, result)
                results.setdefault((variant, tokens), []).append(result)

    def peak(variant: str, tokens: int, key: str = "tensor_peak_mib") -> float | None:
        runs = results.get((variant, tokens))
        return median([r[key] for r in runs]) if runs else None

    headers = ["tokens"]
    for variant in args.variants:
        headers += [f"{variant} peak MiB", f"{variant} RSS MiB", f"{variant} growth", f"{variant} step s"]
    if len(args.variants) == 2:
        headers.append("ours / sdpa")
    rows, worst = [], {v: 0.0 for v in args.variants}
    for i, tokens in enumerate(lengths):
        row: list[Any] = [f"{tokens:,}"]
        for variant in args.variants:
            now = peak(variant, tokens)
            before = peak(variant, lengths[i - 1]) if i else None
            growth = now / before if now and before else None
            if growth is not None and tokens == 2 * lengths[i - 1]:
                worst[variant] = max(worst[variant], growth)
            row += [
                now if now is not None else "not run",
                peak(variant, tokens, "rss_peak_mib") or "-",
                f"{growth:.2f}x" if growth else "-",
                peak(variant, tokens, "seconds") or "-",
            ]
        if len(args.variants) == 2:
            ours, sdpa = peak("ours", tokens), peak("sdpa", tokens)
            row.append(f"{ours / sdpa:.2f}" if ours and sdpa else "-")
        rows.append(row)

    notes = [
        f"model: hidden {args.hidden_size}, {args.layers} layers, 4 heads / 2 kv heads, vocabulary "
        f"{args.vocab_size:,}; {args.docs} documents per row; docmask block {args.block_size}, loss chunk "
        f"{args.loss_chunk}; fp32; one forward + backward (no optimizer step); median of {args.repeats}",
        "peak MiB: tensor accounting (judged); RSS MiB: resident high-water mark; both above the state before the "
        "step; growth: peak over the previous length's; step s: one cold step in a fresh process under the tensor "
        "accounting (indicative only)",
    ]
    notes += [f"skipped {s}" for s in skipped.values()]
    if "ours" in args.variants and worst["ours"]:
        verdict = "met" if worst["ours"] <= GROWTH_TARGET else "NOT met"
        notes.append(f"target: ours grows at most {GROWTH_TARGET}x per doubling -- {verdict} "
                     f"(largest growth {worst['ours']:.2f}x)")
    report("Memory against length", markdown_table(headers, rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
