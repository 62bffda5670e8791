"""What the long-context evaluation costs on this machine for the demo model, and what the KV cache saves.

    python benchmarks/eval_cost.py                        # the tables of benchmarks/README.md (## Evaluation cost)
    python benchmarks/eval_cost.py --lengths 1024 2048 --samples 5 --json out.json

Part 1, evaluation cost: `run_evaluation` (the callback's and the `eval` command's code) on the demo model (the
`tiny` Llama-3-shaped model of configs/demo/pretrain.yaml, 128,256-token vocabulary, freshly initialised like the
demo's starting point) with the real Llama-3 tokenizer, per length: examples/s, and the split between building
prompts, prefill and decoding. A random model never emits EOS, so every example decodes the task's full generation
length (50 tokens for the RULER needles, 100 for JSON KV): an upper bound on what a trained model costs.

Part 3, per HELMET category (`--categories`): `run_evaluation` on the tasks of each category at 2K/4K/8K, examples/s
and the mean prompt and generated tokens per example. Recall and RULER are generated (every task of them); the file
categories read data written for the benchmark into a temporary HELMET folder: RAG (`kilt_nq`), re-rank and ICL
(`icl_trec_coarse`) with contexts long enough to be cut to every length, and, when the file-tasks loaders are
registered, LongQA / Summ / Cite from the test fixtures' writers (`tests/helpers/helmet_data.py`: 33K-133K-token
documents, ALCE's 40 documents of ~70 tokens per question), one representative task or all of them as listed in
`CATEGORY_TASKS`. Prompts use no chat template (the tokenizer has none); the cost is the same.

Part 2, the KV cache: `greedy_generate` on the same prompts with and without the cache. The cached path must
prefill once per example and then feed one token per step: the tokens entering the model (counted by a hook on the
embedding) are L + n - 1 for n new tokens, against n*L + n(n-1)/2 without the cache, and the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from prolong_lit.evals import (  # noqa: E402
    EvalSettings,
    build_synthetic_example,
    greedy_generate,
    run_evaluation,
    stop_token_ids,
)
from prolong_lit.evals.registry import TASKS  # noqa: E402
from prolong_lit.model.module import LongContextLM  # noqa: E402
from prolong_lit.model.settings import LlamaSettings  # noqa: E402
from prolong_lit.tokenizer import load_tokenizer  # noqa: E402

log = logging.getLogger("eval_cost")


def demo_model() -> torch.nn.Module:
    """The demo config's model, built exactly as the LightningModule builds it (attention `auto`)."""
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", rope_theta=8.0e6), seq_len=2048)
    module.configure_model()
    return module.model.eval()


def evaluation_cost(model, tokenizer, tasks: list[str], lengths: list[int], samples: int) -> list[dict]:
    rows = []
    for length in lengths:
        started = time.perf_counter()
        settings = EvalSettings(tasks=tasks, lengths=[length], samples_per_task=samples, seed=0)
        results = run_evaluation(model, tokenizer, settings, model.config.max_position_embeddings, distributed=False)
        total = time.perf_counter() - started
        gen = results.generation
        examples = gen["sequences"]
        rows.append({
            "length": length,
            "examples": examples,
            "seconds": total,
            "examples_per_s": examples / total,
            "build_s": total - gen["prefill_seconds"] - gen["decode_seconds"],
            "prefill_s": gen["prefill_seconds"],
            "decode_s": gen["decode_seconds"],
            "prefill_tok_per_s": gen["prompt_tokens"] / max(gen["prefill_seconds"], 1e-9),
            "decode_tok_per_s": gen["generated_tokens"] / max(gen["decode_seconds"], 1e-9),
            "generated_tokens": gen["generated_tokens"],
        })
        log.info("cost %s", rows[-1])
    return rows


def cache_comparison(model, tokenizer, lengths: list[int], new_tokens: int) -> list[dict]:
    counted = {"tokens": 0}
    hook = model.get_input_embeddings().register_forward_hook(
        lambda mod, inputs, out: counted.__setitem__("tokens", counted["tokens"] + inputs[0].numel())
    )
    stop = stop_token_ids(tokenizer, stop_newline=False)
    rows = []
    try:
        for length in lengths:
            prompt = build_synthetic_example("ruler_niah_s_1", tokenizer, length, 0.5, 0, seed=0).input_ids
            row = {"length": len(prompt), "new_tokens": new_tokens}
            outputs = {}
            for use_cache in (True, False):
                counted["tokens"] = 0
                started = time.perf_counter()
                out, stats = greedy_generate(model, [prompt], new_tokens, stop, tokenizer.pad_token_id or 0,
                                             use_cache=use_cache)
                key = "cache" if use_cache else "no_cache"
                row[f"{key}_s"] = time.perf_counter() - started
                row[f"{key}_model_tokens"] = counted["tokens"]
                row[f"{key}_forward_calls"] = stats.forward_calls
                outputs[key] = out
            generated = len(outputs["cache"][0])
            row["generated"] = generated
            row["same_output"] = outputs["cache"] == outputs["no_cache"]
            row["expected_cache_tokens"] = len(prompt) + generated - 1  # prefill once, then one token per step
            row["speedup"] = row["no_cache_s"] / row["cache_s"]
            rows.append(row)
            log.info("cache %s", row)
    finally:
        hook.remove()
    return rows


# One category -> the tasks timed for it (those registered when the benchmark runs).
CATEGORY_TASKS = {
    "recall": ["json_kv", "ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv"],
    "ruler": ["ruler_niah_s_1", "ruler_niah_s_2", "ruler_niah_s_3", "ruler_niah_mk_1", "ruler_niah_mq", "ruler_vt",
              "ruler_cwe", "ruler_fwe"],
    "rag": ["kilt_nq"],
    "rerank": ["msmarco_rerank_psg"],
    "icl": ["icl_trec_coarse"],
    "longqa": ["narrativeqa", "infbench_qa_eng", "infbench_choice_eng"],
    "summ": ["infbench_sum_eng", "multi_lexsum"],
    "cite": ["alce_asqa", "alce_qampari"],
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_bench_helmet_dir(root: Path) -> Path:
    """HELMET-layout files for 2K-8K (HELMET lengths 4K and 8K) with contexts longer than 8K tokens."""
    rng = random.Random(0)
    data = root / "data"
    words = "river castle lantern orchard meadow harbor violin comet tunnel falcon garden window silver forest".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def passages(n: int, tag: str) -> list[dict]:
        return [{"title": f"{tag} {i}", "text": text(90), "has_answer": i == 0} for i in range(n)]

    nq = [{"id": f"q{q}", "question": f"who built tower {q}?", "answers": [f"builder {q}"],
           "ctxs": passages(100, f"q{q}"), "depth": 50} for q in range(8)]
    demos = [{"id": f"d{d}", "question": f"demo {d}?", "answers": [f"a{d}"], "ctxs": passages(3, f"d{d}")}
             for d in range(6)]
    for k in (20, 50):
        _jsonl(data / f"kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl", nq)
    _jsonl(data / "kilt/nq-train-multikilt_1000_k3_dep6.jsonl", demos)

    def rerank(qid: str, n: int, size: int) -> dict:
        return {"qid": qid, "query": f"query {qid}", "ctxs": [
            {"id": str(100 + i), "label": rng.choice([0, 0, 1, 2, 3]), "title": f"t{i}", "text": text(size)}
            for i in range(n)]}

    for k in (14, 50):
        _jsonl(data / f"msmarco/test_reranking_data_k{k}_dep3.jsonl", [rerank(f"q{i}", 100, 90) for i in range(8)])
    _jsonl(data / "msmarco/test_reranking_data_k10_dep3.jsonl", [rerank(f"d{i}", 10, 20) for i in range(6)])
    train = [{"text": f"question {i} about {text(12)}", "label": i % 6} for i in range(2400)]
    test = [{"text": f"test {i} {uuid.UUID(int=rng.getrandbits(128))}", "label": i % 6} for i in range(60)]
    _jsonl(data / "icl/trec_coarse/train.jsonl", train)
    _jsonl(data / "icl/trec_coarse/test.jsonl", test)
    try:  # the file-tasks fixtures (LongQA, Summ, Cite), when the repository's tests are there
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers.helmet_data import write_alce, write_longdoc

        write_longdoc(data)
        write_alce(data, data.parent / "prompts")
    except ImportError as err:
        log.warning("LongQA/Summ/Cite data not written (%s): those categories are skipped", err)
    return root


def category_cost(model, tokenizer, lengths: list[int], samples: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        helmet_dir = write_bench_helmet_dir(Path(tmp))
        for category, tasks in CATEGORY_TASKS.items():
            tasks = [t for t in tasks if t in TASKS]
            if not tasks:
                log.warning("category %s: none of %s registered; skipped", category, CATEGORY_TASKS[category])
                continue
            for length in lengths:
                settings = EvalSettings(tasks=tasks, lengths=[length], samples_per_task=samples, seed=0,
                                        helmet_dir=str(helmet_dir), use_chat_template=False)
                started = time.perf_counter()
                results = run_evaluation(model, tokenizer, settings, model.config.max_position_embeddings,
                                         distributed=False)
                total = time.perf_counter() - started
                gen = results.generation
                n = gen["sequences"]
                rows.append({"category": category, "tasks": tasks, "length": length, "examples": n,
                             "seconds": total, "examples_per_s": n / total, "prompt_tokens": gen["prompt_tokens"] / n,
                             "generated_tokens": gen["generated_tokens"] / n})
                log.info("category %s", rows[-1])
    return rows


def category_markdown(rows: list[dict], samples: int) -> str:
    lines = [
        f"{samples} test items per task and length (RAG: each question's depth variants); torch threads "
        f"{torch.get_num_threads()}.",
        "",
        "| category | tasks | length | examples | s | examples/s | prompt tokens / example | generated / example |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {', '.join(r['tasks'])} | {r['length']} | {r['examples']} | {r['seconds']:.1f} | "
            f"{r['examples_per_s']:.2f} | {r['prompt_tokens']:.0f} | {r['generated_tokens']:.0f} |"
        )
    return "\n".join(lines)


def markdown(cost: list[dict], cache: list[dict], tasks: list[str], samples: int) -> str:
    lines = [
        f"Tasks {', '.join(tasks)}; {samples} examples per task and length; torch threads {torch.get_num_threads()}.",
        "",
        "| length | examples | examples/s | build prompts s | prefill s | decode s | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in cost:
        lines.append(
            f"| {r['length']} | {r['examples']} | {r['examples_per_s']:.2f} | {r['build_s']:.1f} | "
            f"{r['prefill_s']:.1f} | {r['decode_s']:.1f} | {r['prefill_tok_per_s']:.0f} | {r['decode_tok_per_s']:.0f} |"
        )
    lines += [
        "",
        "| prompt tokens | new tokens | tokens into the model, cache (expected L+n-1) | no cache | forward calls "
        "(both) | cache s | no cache s | speed-up | same output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cache:
        lines.append(
            f"| {r['length']} | {r['generated']} | {r['cache_model_tokens']} ({r['expected_cache_tokens']}) | "
            f"{r['no_cache_model_tokens']} | {r['cache_forward_calls']} / {r['no_cache_forward_calls']} | "
            f"{r['cache_s']:.2f} | {r['no_cache_s']:.2f} | {r['speedup']:.1f}x | {r['same_output']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["ruler_niah_s_1", "ruler_niah_mk_2", "ruler_niah_mv", "json_kv"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--samples", type=int, default=5, help="examples per task and length")
    parser.add_argument("--cache_lengths", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens decoded in the cache comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--categories", action="store_true",
                        help="only part 3: time per HELMET category at --category_lengths")
    parser.add_argument("--category_lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("llama3")
    model = demo_model()
    if args.categories:
        with torch.no_grad():
            rows = category_cost(model, tokenizer, args.category_lengths, args.samples)
        print(category_markdown(rows, args.samples))  # noqa: T201 - the benchmark's output
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"categories": rows, "samples": args.samples}, f, indent=1)
        return
    with torch.no_grad():
        cache = cache_comparison(model, tokenizer, args.cache_lengths, args.new_tokens)
        cost = evaluation_cost(model, tokenizer, args.tasks, args.lengths, args.samples)
    print(markdown(cost, cache, args.tasks, args.samples))  # noqa: T201 - the benchmark's output
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cost": cost, "cache": cache, "tasks": args.tasks, "samples": args.samples}, f, indent=1)


if __name__ == "__main__":
    main()
