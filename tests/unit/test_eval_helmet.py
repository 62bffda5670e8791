"""HELMET loaders on tiny files written in the documented schema: prompts, demos, truncation, errors."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.evals import EvalSettings, run_evaluation, write_icl_jsonl
from prolong_lit.evals.helmet import build_helmet_example, load_helmet_task
from prolong_lit.evals.registry import validate_request

LENGTH = 1024  # served by HELMET's 4K files, cut to fit
LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _passages(rng: random.Random, n: int, tag: str) -> list[dict]:
    words = "river castle lantern orchard meadow harbor violin comet tunnel falcon".split()
    return [
        {"title": f"{tag} title {i}", "text": " ".join(rng.choice(words) for _ in range(40)), "has_answer": i == 0}
        for i in range(n)
    ]


def write_helmet_dir(root: Path) -> Path:
    """A `data/` folder with every file the loaders read at LENGTH, in HELMET's layout and line schemas."""
    rng = random.Random(0)
    data = root / "data"
    uid = lambda: str(uuid.UUID(int=rng.getrandbits(128)))  # noqa: E731
    kv_rows = []
    for _ in range(3):
        pairs = [(uid(), uid()) for _ in range(60)]  # ~3000 tokens: must be cut to fit 1024
        context = "{" + ",\n ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
        kv_rows.append(
            {
                "context": context,
                "question": pairs[5][0],
                "answer": pairs[5][1],
                "demos": pairs[:3],
                "depth": 0.03,
                "num_kvs": 60,
            }
        )
    _write(data / "json_kv/test_k50_dep6.jsonl", kv_rows)
    nq_test = [
        {
            "question": f"who built tower {q}?",
            "answers": [f"builder {q}", f"b{q}"],
            "ctxs": _passages(rng, 30, f"q{q}"),
            "depth": depth,
        }
        for q in range(3)
        for depth in (0, 50)
    ]
    nq_demo = [
        {"question": f"demo question {d}?", "answers": [f"demo answer {d}"], "ctxs": _passages(rng, 3, f"d{d}")}
        for d in range(5)
    ]
    _write(data / "kilt/nq-dev-multikilt_1000_k20_dep6.jsonl", nq_test)
    _write(data / "kilt/nq-train-multikilt_1000_k3_dep6.jsonl", nq_demo + nq_demo[:1])  # a repeated question
    popqa = [
        {
            "id": f"p{i}",
            "question": f"what is p{i}?",
            "answers": [f"a{i}"],
            "ctxs": _passages(rng, 3, f"p{i}"),
            "s_pop": pop,
        }
        for i, pop in enumerate([10, 20, 5000, 30, 40])
    ]
    _write(data / "kilt/popqa_test_1000_k20_dep6.jsonl", popqa)
    _write(data / "kilt/popqa_test_1000_k3_dep6.jsonl", popqa)

    def rerank(qid: str, n: int) -> dict:
        ctxs = [
            {
                "id": str(100 + i),
                "label": rng.choice([0, 0, 1, 2, 3]),
                "title": f"t{i}",
                "text": " ".join(rng.choice("alpha beta gamma delta".split()) for _ in range(n // 2)),
            }
            for i in range(n)
        ]
        return {"qid": qid, "query": f"query {qid}", "ctxs": ctxs}

    _write(data / "msmarco/test_reranking_data_k14_dep3.jsonl", [rerank(f"q{i}", 40) for i in range(2)])
    _write(data / "msmarco/test_reranking_data_k10_dep3.jsonl", [rerank(f"d{i}", 10) for i in range(6)])
    train = [
        {"text": f"sample question {i} about topic {LABELS[lab]}", "label": lab} for lab in range(6) for i in range(8)
    ]
    test = [{"text": f"test question about topic {LABELS[lab]}", "label": lab} for lab in range(6)]
    _write(data / "icl/trec_coarse/train.jsonl", train)
    _write(data / "icl/trec_coarse/test.jsonl", test)
    return root


@pytest.fixture
def helmet_dir(tmp_path) -> Path:
    return write_helmet_dir(tmp_path)


def _fits(example, tokenizer, budget: int) -> None:
    assert len(example.input_ids) <= budget
    assert len(tokenizer(example.prompt)["input_ids"]) == len(example.input_ids)


def test_json_kv_prompt_has_two_demos_prefix_and_a_cut_context(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("helmet_json_kv", helmet_dir, LENGTH, samples=2, seed=0)
    assert len(data.records) == 2
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 100)
    record = data.records[0]
    _fits(example, llama3_tokenizer, LENGTH - 100)
    assert len(example.input_ids) >= LENGTH - 100 - 20  # cut at token offsets: it fills the budget
    prompt = example.prompt
    assert prompt.endswith(f"Key: {record['question']}\nCorresponding value:")
    assert prompt.count("Corresponding value:") == 3  # 2 demonstrations + the answer prefix
    for key, value in record["demos"][:2]:
        assert f"Key: {key}\nCorresponding value: {value}\n\n" in prompt
    assert f"Key: {record['demos'][2][0]}" not in prompt
    kept = prompt.split("\n\nExtract the value")[0]
    assert record["context"].startswith(kept) and len(kept) < len(record["context"]) // 2
    assert f'"{record["question"]}": "{record["answer"]}"' in kept  # gold near the start survives the cut
    assert example.target == [record["answer"]] and example.depth == pytest.approx(0.03)


def test_rag_prompt_demos_passages_and_depth_variants(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("kilt_nq", helmet_dir, LENGTH, samples=2, seed=0)
    assert len({r["question"] for r in data.records}) == 2 and len(data.records) == 4  # both depths of each
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 20)
    _fits(example, llama3_tokenizer, LENGTH - 20)
    prompt, record = example.prompt, data.records[0]
    assert prompt.startswith("Use the given documents to write a concise and short answer to the question.")
    assert prompt.endswith(f"\n\nQuestion: {record['question']}\nAnswer:")
    assert prompt.count("\nQuestion: ") == 3  # 2 demos + the test question
    demo_questions = [q for q in (f"demo question {d}?" for d in range(5)) if f"Question: {q}\nAnswer:" in prompt]
    assert len(demo_questions) == 2
    for q in demo_questions:  # each demo brings its 3 passages and its first answer
        d = q.split()[-1].rstrip("?")
        assert all(f"Document (Title: d{d} title {i}):" in prompt for i in range(3))
        assert f"Question: {q}\nAnswer: demo answer {d}" in prompt
    shown = prompt.count(f"Document (Title: q{record['question'].split()[-1].rstrip('?')} title ")
    assert 0 < shown < 30  # passages cut from the end, the question kept
    assert example.target == record["answers"] and example.depth in (0.0, 0.5)
    again = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 20)
    assert again.prompt == prompt  # demos are seeded by the question


def test_popqa_filters_popular_entities_and_never_demos_itself(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("kilt_popqa_3", helmet_dir, LENGTH, samples=10, seed=0)
    assert sorted(r["id"] for r in data.records) == ["p0", "p1", "p3", "p4"]  # s_pop 5000 has log10 >= 3
    for i, record in enumerate(data.records):
        prompt = build_helmet_example(data, i, llama3_tokenizer, budget=LENGTH - 20).prompt
        assert prompt.count(f"Question: {record['question']}") == 1  # only as the test question
        assert "what is p2?" not in prompt


def test_msmarco_prompt_qrels_and_ranking_demos(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("msmarco_rerank_psg", helmet_dir, LENGTH, samples=1, seed=0)
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 200)
    _fits(example, llama3_tokenizer, LENGTH - 200)
    record, prompt = data.records[0], example.prompt
    assert prompt.endswith(f"Query: {record['query']}\nRanking:")
    assert "[ID: 100] Document (Title: t0): " in prompt
    assert prompt.count("\nRanking: ") == 3  # the format line of the instruction + 2 demos
    assert example.target == {c["id"]: c["label"] for c in record["ctxs"]}
    gold = example.meta["gold_ranking"].split(" > ")
    labels = [example.target[i] for i in gold]
    assert labels == sorted(labels, reverse=True) and len(gold) == 40
    untitled = [{**c, "title": None} for c in record["ctxs"]]
    for c in untitled:
        del c["title"]
    data.records[0] = {**record, "ctxs": untitled}
    assert "[ID: 100] Document: " in build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 200).prompt


def test_icl_labels_are_shuffled_integers_balanced_and_consistent(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("icl_trec_coarse", helmet_dir, LENGTH, samples=6, seed=0)
    mappings = []
    for i, record in enumerate(data.records):
        example = build_helmet_example(data, i, llama3_tokenizer, budget=LENGTH - 20)
        _fits(example, llama3_tokenizer, LENGTH - 20)
        prompt = example.prompt
        assert prompt.endswith(f"\n\n{record['text']}\nlabel:")
        body = prompt.split("and nothing else. \n\n", 1)[1].rsplit("\n\n", 1)[0]
        demos = [block.split("\nlabel: ") for block in body.split("\n\n") if "\nlabel: " in block]
        assert len(demos) > 12  # cut, but many shots remain (the 4K count is 200)
        shown = {}
        for text, label in demos:
            shown.setdefault(text.rsplit(" ", 1)[1], set()).add(label)
        assert all(len(v) == 1 for v in shown.values())  # one integer per class within a prompt
        mapping = {name: labels.pop() for name, labels in shown.items()}
        assert sorted(mapping.values()) == [str(i) for i in range(6)]  # a permutation of 0..5
        assert {text.rsplit(" ", 1)[1] for text, _ in demos[:6]} == set(LABELS)  # round 1 has every class once
        assert example.target == [mapping[record["text"].rsplit(" ", 1)[1]]]
        mappings.append(tuple(sorted(mapping.items())))
    assert len(set(mappings)) > 1  # the mapping is drawn per test item


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    root = write_helmet_dir(tmp_path)
    path = root / "data/kilt/nq-dev-multikilt_1000_k20_dep6.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["answers"] = "builder 0"
    _write(path, [lines[0], json.dumps(bad), "{not json", *lines[3:]])
    with pytest.raises(ValueError) as err:
        load_helmet_task("kilt_nq", root, LENGTH, samples=1, seed=0)
    assert f"{path}:2: field 'answers' must be a non-empty list of strings" in str(err.value)
    assert f"{path}:3: not valid JSON" in str(err.value)


def test_missing_files_and_missing_dir_are_named_before_any_work(tmp_path, llama3_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        validate_request(["kilt_nq", "icl_nlu"], [LENGTH], [0.5], 1, tmp_path / "empty", None, llama3_tokenizer)
    message = str(err.value)
    for name in (
        "kilt/nq-dev-multikilt_1000_k20_dep6.jsonl",
        "kilt/nq-train-multikilt_1000_k3_dep6.jsonl",
        "icl/nlu/train.jsonl",
        "icl/nlu/test.jsonl",
    ):
        assert name in message
    with pytest.raises(ValueError, match="helmet_dir"):
        validate_request(["kilt_nq"], [LENGTH], [0.5], 1, None, None, llama3_tokenizer)


def test_icl_converter_writes_the_local_schema(tmp_path, helmet_dir):
    rows = [{"question": "what is x?", "coarse_label": 2}, {"question": "who is y?", "coarse_label": 3}]
    out = tmp_path / "icl/trec_coarse/train.jsonl"
    assert write_icl_jsonl(rows, out, text_field="question", label_field="coarse_label") == 2
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"text": "what is x?", "label": 2},
        {"text": "who is y?", "label": 3},
    ]
    with pytest.raises(ValueError, match="record 0 of the ICL data"):
        write_icl_jsonl([{"text": None, "label": 1}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_run_evaluation_on_helmet_files(helmet_dir, llama3_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    tasks = ["helmet_json_kv", "kilt_nq", "msmarco_rerank_psg", "icl_trec_coarse"]
    # a malformed line in the last task's file stops the run before the first forward pass
    train = helmet_dir / "data/icl/trec_coarse/train.jsonl"
    good = train.read_text()
    train.write_text(good + '{"text": "x", "label": [1]}\n')
    with pytest.raises(ValueError, match=f"{train}:49: field 'label'"):
        run_evaluation(model, llama3_tokenizer, EvalSettings(tasks, [LENGTH], samples_per_task=1,
                                                             helmet_dir=str(helmet_dir)), None)
    assert calls == []
    train.write_text(good)
    settings = EvalSettings(tasks, [LENGTH], samples_per_task=1, seed=0, helmet_dir=str(helmet_dir), max_new_tokens=2)
    results = run_evaluation(model, llama3_tokenizer, settings, None)
    # HELMET's categories: only re-rank (one task) is complete; the others lack tasks and get no scalar
    assert set(results.flat()) == {f"eval/{t}@{LENGTH}" for t in tasks} | {
        f"eval/category/rerank@{LENGTH}",
        "eval/category/rerank",
    }
    assert set(results.incomplete_categories) == {"recall", "rag", "icl", "helmet"}
    assert results.num_examples["kilt_nq"][LENGTH] == 2  # one question, both of its depths
    assert set(results.depth_scores) == {"helmet_json_kv", "kilt_nq"}
    assert all(r["prompt_tokens"] <= LENGTH - 2 for r in results.records)

    # Data read once (as the callback's and the eval command's checks read it) is used as it is: the files are not
    # read again, so a line broken since then goes unnoticed and the scores are the same.
    read_once = {(t, LENGTH): load_helmet_task(t, helmet_dir, LENGTH, samples=1, seed=0) for t in tasks}
    train.write_text(good + '{"text": "x", "label": [1]}\n')
    again = run_evaluation(model, llama3_tokenizer, settings, None, helmet_data=read_once)
    assert again.flat() == results.flat() and again.records == results.records


def test_chat_template_wraps_the_user_turn_of_any_task(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("kilt_nq", helmet_dir, LENGTH, samples=1, seed=0)
    plain = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 20)
    chat = build_helmet_example(data, 0, llama3_tokenizer, budget=LENGTH - 20, chat=True)
    record = data.records[0]
    assert plain.prompt.endswith(f"Question: {record['question']}\nAnswer:")
    # HELMET with use_chat_template: the user turn is the prompt without the answer prefix, no system message
    user = chat.prompt.split("<|start_header_id|>user<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>")[0]
    assert chat.prompt.startswith("<|begin_of_text|><|start_header_id|>user")
    assert user.endswith(f"Question: {record['question']}") and "<|start_header_id|>system" not in chat.prompt
    assert chat.prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat.input_ids == llama3_tokenizer(chat.prompt, add_special_tokens=False)["input_ids"]
    assert chat.input_ids.count(128000) == 1 and len(chat.input_ids) <= LENGTH - 20  # one BOS, within budget


def test_a_non_utf8_line_is_a_data_error_through_the_settings_check(helmet_dir, llama3_tokenizer):
    from prolong_lit.errors import DataError
    from prolong_lit.evals import check_settings

    path = helmet_dir / "data/kilt/nq-dev-multikilt_1000_k20_dep6.jsonl"
    path.write_bytes(path.read_bytes() + b'{"question": "\xff"}\n')  # issue 13: this was a TypeError
    settings = EvalSettings(["kilt_nq"], [LENGTH], samples_per_task=1, helmet_dir=str(helmet_dir))
    with pytest.raises(DataError, match=rf"--helmet_dir: malformed HELMET data:\n  {path}:7: not UTF-8 text"):
        check_settings(settings, llama3_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
