"""HELMET's own RULER files, HELMET's category scores and results table, its test-item selection (ICL balance,
JSON KV), the `helmet` preset and `eval --list_tasks`."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prolong_lit.commands.eval import main as eval_main
from prolong_lit.errors import DataError
from prolong_lit.evals import EvalResults, EvalSettings, categories
from prolong_lit.evals.helmet import build_helmet_example, load_helmet_task
from prolong_lit.evals.registry import TASKS, validate_request
from prolong_lit.evals.table import render_csv, render_table_markdown, write_tables

NIAH_LINE = {  # the fields HELMET's load_ruler formats its templates with, plus RULER's own bookkeeping
    "index": 0, "length": 8140, "type_needle_v": "number", "query": "wise-falcon",
    "context": "The grass is green. The sky is blue.\nOne of the special magic numbers for wise-falcon is: 4815162.\n"
               "The grass is green. The sky is blue.",
    "outputs": ["4815162"],
}
VT_LINE = {
    "index": 0, "length": 8150, "num_v": 5, "query": "12345",
    "example": "Memorize and track ... they are: AAA BBB CCC DDD EEE",
    "context": "VAR QWERT = 12345\nnoise\nVAR ASDFG = VAR QWERT \nVAR ZXCVB = VAR ASDFG \nVAR POIUY = VAR ZXCVB \n"
               "VAR LKJHG = VAR POIUY ",
    "outputs": ["QWERT", "ASDFG", "ZXCVB", "POIUY", "LKJHG"],
}
QA_LINE = {"index": 0, "query": "Who wrote it?", "context": "Document 1:\nIt was written by Ada.",
           "outputs": ["Ada", "Ada Lovelace"]}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def ruler_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    for length in (4096, 8192):
        _write(data / f"ruler/niah_multikey_2/validation_{length}.jsonl",
               [{**NIAH_LINE, "index": i, "query": f"{NIAH_LINE['query']}{i}"} for i in range(6)])
        _write(data / f"ruler/vt/validation_{length}.jsonl", [VT_LINE])
        _write(data / f"ruler/qa_1/validation_{length}.jsonl", [QA_LINE])
    long_ctx = " ".join(["The grass is green."] * 400)
    _write(data / "ruler/niah_multikey_2/validation_4096.jsonl", [{**NIAH_LINE, "context": long_ctx}])
    return tmp_path


def test_helmet_ruler_files_give_helmets_prompts(ruler_dir, llama3_tokenizer):
    data = load_helmet_task("helmet_ruler_niah_mk_2", ruler_dir, 8192, samples=4, seed=42)
    expected_order = [int(i) for i in np.random.default_rng(42).permutation(6)[:4]]  # datasets' shuffle(seed)
    assert [r["index"] for r in data.records] == expected_order
    example = build_helmet_example(data, 0, llama3_tokenizer, 8192 - 50)
    query = f"wise-falcon{expected_order[0]}"
    assert example.prompt == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        f"about the number afterwards.\n{NIAH_LINE['context']}\nWhat is the special magic number for {query} "
        f"mentioned in the provided text?\nThe special magic number for {query} mentioned in the provided text is"
    )
    assert example.target == ["4815162"]
    vt = build_helmet_example(load_helmet_task("helmet_ruler_vt", ruler_dir, 8192, 1, 0), 0, llama3_tokenizer, 8142)
    assert vt.prompt == (
        f"{VT_LINE['example']}\n\nMemorize and track the chain(s) of variable assignment hidden in the following "
        f"text.\n\n{VT_LINE['context']}\nQuestion: Find all variables that are assigned the value 12345 in the text "
        "above.\nAnswer: According to the chain(s) of variable assignment in the text above, 5 variables are "
        "assigned the value 12345, they are:"
    )
    qa = build_helmet_example(load_helmet_task("ruler_qa_1", ruler_dir, 8192, 1, 0), 0, llama3_tokenizer, 8142)
    assert qa.prompt.endswith("Only give me the answer and do not output any other words.\n\nQuestion: Who wrote "
                              "it?\nAnswer:") and "\n\nDocument 1:\nIt was written by Ada.\n\n" in qa.prompt
    assert TASKS["ruler_qa_1"].metric == "substring_exact_match" and TASKS["helmet_ruler_vt"].metric == "ruler_recall"


def test_helmet_ruler_context_is_cut_to_the_budget(ruler_dir, llama3_tokenizer):
    data = load_helmet_task("helmet_ruler_niah_mk_2", ruler_dir, 1024, samples=1, seed=0)  # reads the 4K file
    example = build_helmet_example(data, 0, llama3_tokenizer, 1024 - 50)
    assert 1024 - 50 - 6 <= len(example.input_ids) <= 1024 - 50
    assert example.prompt.endswith("mentioned in the provided text is")
    assert example.meta["kept_context_chars"] < example.meta["context_chars"]


def test_helmet_ruler_files_missing_or_malformed(ruler_dir, llama3_tokenizer):
    with pytest.raises(FileNotFoundError, match="ruler/cwe/validation_8192.jsonl"):
        validate_request(["helmet_ruler_cwe"], [8192], [0.5], 1, str(ruler_dir), None, llama3_tokenizer)
    bad = ruler_dir / "data/ruler/vt/validation_8192.jsonl"
    bad.write_text(json.dumps({**VT_LINE, "num_v": [5]}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: field 'num_v'"):
        load_helmet_task("helmet_ruler_vt", ruler_dir, 8192, 1, 0)


def _results(scores: dict, metrics: dict | None = None, metric_scores: dict | None = None) -> EvalResults:
    """A results file written by hand (the JSON `write_report` saves), read back as the report reads it."""
    data = {
        "scores": {t: {str(n): v for n, v in d.items()} for t, d in scores.items()},
        "categories": {},
        "task_categories": {t: TASKS[t].category for t in scores},
        "task_metrics": {t: (metrics or {}).get(t, TASKS[t].metric) for t in scores},
        "num_examples": {t: {str(n): 10 for n in d} for t, d in scores.items()},
        "metric_scores": metric_scores or {},
    }
    loaded = EvalResults.from_dict(json.loads(json.dumps(data)))
    grouped = categories.aggregate(loaded.scores, loaded.task_metrics, loaded.metric_scores)
    loaded.categories, loaded.category_scores = grouped.average, grouped.by_length
    loaded.incomplete_categories = grouped.missing
    return loaded


def test_categories_as_helmets_collect_results():
    results = _results({
        "json_kv": {8192: 90.0, 16384: 70.0},
        "ruler_niah_mk_2": {8192: 100.0, 16384: 80.0},
        "helmet_ruler_niah_mk_3": {8192: 60.0, 16384: 40.0},  # the file twin fills the same slot
        "ruler_niah_mv": {8192: 50.0, 16384: float("nan")},  # missing at 16K: recall incomplete there
        "msmarco_rerank_psg": {8192: 30.0, 16384: 20.0},
        "kilt_nq": {8192: 40.0, 16384: 35.0},  # one of RAG's four: incomplete everywhere
        "alce_asqa": {8192: 10.0, 16384: 12.0},
        "alce_qampari": {8192: 4.0, 16384: 6.0},
    }, metric_scores={
        "alce_asqa": {"citation_rec": {"8192": 20.0, "16384": 22.0}, "citation_prec": {"8192": 30.0, "16384": 32.0}},
        "alce_qampari": {"citation_rec": {"8192": 8.0, "16384": None}, "citation_prec": {"8192": 2.0,
                                                                                         "16384": 1.0}},
    })
    assert results.category_scores["recall"] == {8192: (90 + 100 + 60 + 50) / 4}
    assert "recall" not in results.categories and results.incomplete_categories["recall"] == ["ruler_niah_mv"]
    assert results.category_scores["rerank"] == {8192: 30.0, 16384: 20.0} and results.categories["rerank"] == 25.0
    assert "rag" not in results.category_scores
    assert results.incomplete_categories["rag"] == ["hotpotqa", "popqa", "triviaqa"]
    # Cite: HELMET averages six columns; citation recall not computed at 16K (None) leaves 16K without a score
    assert results.category_scores["cite"] == {8192: pytest.approx((10 + 20 + 30 + 4 + 8 + 2) / 6)}
    assert results.incomplete_categories["cite"] == ["alce_qampari citation_rec"]
    assert set(results.incomplete_categories["helmet"]) == {"recall", "rag", "icl", "cite", "longqa", "summ"}
    assert "helmet" not in results.category_scores and "ruler" in results.incomplete_categories
    flat = results.flat()
    assert flat["eval/category/recall@8192"] == 75.0 and flat["eval/category/rerank"] == 25.0
    assert "eval/category/recall" not in flat and not any(k.startswith("eval/category/rag") for k in flat)


def test_helmet_average_needs_all_seven_categories():
    full = {t: {8192: 50.0} for c in categories.HELMET_AVERAGE for s in categories.CATEGORIES[c] for t in s.tasks[:1]}
    full["narrativeqa"] = {8192: 80.0}  # longqa = (80 + 50 + 50) / 3 = 60
    cite = {m: {"8192": 50.0} for m in ("citation_rec", "citation_prec")}
    results = _results(full, metric_scores={"alce_asqa": cite, "alce_qampari": cite})
    assert results.category_scores["longqa"] == {8192: 60.0} and results.category_scores["cite"] == {8192: 50.0}
    assert results.categories["helmet"] == pytest.approx((50 * 6 + 60) / 7)
    assert "helmet" not in results.incomplete_categories


def test_results_table_csv_and_markdown(tmp_path):
    results = _results({
        "json_kv": {8192: 90.0, 16384: 70.0}, "ruler_niah_mk_2": {8192: 100.0, 16384: 80.0},
        "ruler_niah_mk_3": {8192: 60.0, 16384: 40.0}, "ruler_niah_mv": {8192: 50.0, 16384: 30.0},
        "kilt_nq": {8192: 40.0, 16384: 35.0},
    })
    rows = list(csv.reader(io.StringIO(render_csv(results))))
    assert rows[0] == ["length", "recall", "rag", "ruler", "helmet", "json_kv", "ruler_niah_mk_2", "ruler_niah_mk_3",
                       "ruler_niah_mv", "kilt_nq"]
    assert rows[1] == ["8192", "75.00", "", "", "", "90.00", "100.00", "60.00", "50.00", "40.00"]
    assert rows[2] == ["16384", "55.00", "", "", "", "70.00", "80.00", "40.00", "30.00", "35.00"]
    assert rows[3] == ["mean", "65.00", "", "", "", "80.00", "90.00", "50.00", "40.00", "37.50"]
    markdown = render_table_markdown(results)
    assert "| 8192 | 75.00 | incomplete | incomplete | incomplete | 90.00 |" in markdown
    assert "- rag: hotpotqa, popqa, triviaqa" in markdown
    paths = write_tables(results, tmp_path)
    assert paths["csv"].read_text() == render_csv(results) and "| mean | 65.00 |" in paths["table"].read_text()


def test_icl_test_items_are_label_balanced_and_json_kv_selected_as_helmet(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(0)
    train = [{"text": f"train {i}", "label": i % 3} for i in range(30)]
    test = [{"text": f"test {i} {rng.random()}", "label": 0 if i < 40 else (1 if i < 45 else 2)} for i in range(60)]
    _write(data / "icl/trec_coarse/train.jsonl", train)
    _write(data / "icl/trec_coarse/test.jsonl", test)
    picked = load_helmet_task("icl_trec_coarse", tmp_path, 8192, samples=12, seed=42).records
    assert Counter(r["label"] for r in picked) == {0: 4, 1: 4, 2: 4}  # 40/5/15 in the file
    assert len({r["text"] for r in picked}) == 12 and all(r in test for r in picked)
    again = load_helmet_task("icl_trec_coarse", tmp_path, 8192, samples=12, seed=42).records
    other = load_helmet_task("icl_trec_coarse", tmp_path, 8192, samples=12, seed=1).records
    assert again == picked and other != picked
    every = load_helmet_task("icl_trec_coarse", tmp_path, 8192, samples=100, seed=42).records
    assert every == test  # no more items than asked for: all of them, in file order (HELMET's rule)

    kv = [{"context": "{}", "question": f"k{i}", "answer": f"v{i}", "demos": [], "num_kvs": 1} for i in range(20)]
    _write(data / "json_kv/test_k105_dep6.jsonl", kv)
    chosen = load_helmet_task("helmet_json_kv", tmp_path, 8192, samples=5, seed=42).records
    assert [r["question"] for r in chosen] == [f"k{i}" for i in np.random.default_rng(42).permutation(20)[:5]]


def test_helmet_preset_and_task_samples():
    preset = EvalSettings(preset="helmet")
    assert preset.lengths == [8192, 16384, 32768, 65536, 131072] and preset.samples_per_task == 100
    assert preset.samples_for("icl_banking77") == 500 and preset.samples_for("kilt_nq") == 100
    assert {"helmet_json_kv", "helmet_ruler_niah_mk_2", "helmet_ruler_niah_mk_3", "helmet_ruler_niah_mv",
            "kilt_nq", "kilt_hotpotqa", "kilt_popqa_3", "kilt_triviaqa", "msmarco_rerank_psg",
            "icl_nlu"} <= set(preset.tasks)
    assert all(t in TASKS for t in preset.tasks)
    given = EvalSettings(preset="helmet", lengths=[4096], samples_per_task=2)  # what is given wins
    assert given.lengths == [4096] and given.samples_per_task == 2 and given.samples_for("icl_nlu") == 500
    with pytest.raises(ValueError, match="preset: unknown preset 'ruler'"):
        EvalSettings(preset="ruler")
    with pytest.raises(ValueError, match="task_samples"):
        EvalSettings(task_samples={"icl_nlu": 0})


def test_list_tasks_prints_every_registered_task(capsys):
    eval_main(["--list_tasks"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "category", "metric", "gen", "stop\\n", "data"]
    rows = {line.split()[0]: line for line in lines[1:] if line and line.split()[0] in TASKS}
    assert set(rows) == set(TASKS)
    assert rows["ruler_cwe"].split()[1:] == ["ruler", "ruler_recall", "100", "no", "generated"]
    assert "recall, ruler" in rows["ruler_niah_mk_2"]
    assert rows["helmet_ruler_niah_mv"].endswith("HELMET test: ruler/niah_multivalue/validation_131072.jsonl")
    assert "kilt/nq-dev-multikilt_1000_k1000_dep6.jsonl" in rows["kilt_nq"] and " rag " in rows["kilt_nq"]


def test_long_generations_decode_from_the_kv_cache(llama3_tokenizer):
    """run_evaluation (the callback's path) reads each prompt once and then one token per step: 100 new tokens
    of ruler_niah_mk_3 feed about L - 100 + 100 tokens into the model, not 100 x L."""
    from prolong_lit.evals import run_evaluation
    from tests.unit.test_eval_generation import tiny_llama

    model = tiny_llama()
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda mod, inputs, out: fed.append(inputs[0].numel()))
    settings = EvalSettings(tasks=["ruler_niah_mk_3"], lengths=[384], samples_per_task=1, seed=0)
    results = run_evaluation(model, llama3_tokenizer, settings, 4096, distributed=False)
    prompts = sum(r["prompt_tokens"] for r in results.records)
    generated = results.generation["generated_tokens"]
    assert results.generation["use_cache"] and generated > 50  # a random model decodes (nearly) all 100
    assert prompts <= sum(fed) <= prompts + generated + 2  # each prompt once (prefill), then a token per step
    assert max(fed) <= 384 - 100 and fed.count(1) >= generated - 2
