"""LongQA and summarization from files in HELMET's formats: sampling, exact prompts, length budgets, chat template,
bad lines, and one end-to-end run with a tiny model over every new category."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.errors import ConfigError, DataError
from prolong_lit.evals import EvalSettings, check_settings, run_evaluation
from prolong_lit.evals.helmet import build_helmet_example, load_helmet_task
from prolong_lit.evals.registry import validate_request
from tests.helpers.helmet_data import write_alce, write_longdoc

OMITTED = " ... [the rest of the text is omitted]"
GENERATION = {"narrativeqa": 100, "infbench_qa_eng": 10, "infbench_choice_eng": 10, "infbench_sum_eng": 1200,
              "multi_lexsum": 400}


@pytest.fixture(scope="module")
def helmet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("helmet")
    write_longdoc(root / "data")
    write_alce(root / "data", root / "prompts")
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _item_order(key: str, seed: int, n: int) -> list[int]:
    item_seed = (int(hashlib.sha256(key.encode()).hexdigest(), 16) + seed) % 2**31
    return list(np.random.default_rng(item_seed).permutation(n))


def _split(prompt: str, head: str, tail: str) -> str:
    assert prompt.startswith(head), prompt[: len(head) + 50]
    assert prompt.endswith(tail), prompt[-len(tail) - 50:]
    return prompt[len(head): len(prompt) - len(tail)]


def test_narrativeqa_sampling_and_exact_prompt(helmet_dir, llama3_tokenizer):
    rows = _rows(helmet_dir / "data/narrativeqa/test.jsonl")
    data = load_helmet_task("narrativeqa", helmet_dir, 8192, samples=3, seed=42, tokenizer=llama3_tokenizer)
    # datasets' shuffle(42) of the test split, then only documents of >= 131072 tokens (doc2 is short)
    order = np.random.default_rng(42).permutation(len(rows))
    expected = [rows[i] for i in order if rows[i]["document"]["id"] != "doc2"]
    assert [r["question"] for r in data.records] == [r["question"]["text"] for r in expected[:3]]
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=8192 - 100)
    record = data.records[0]
    train = _rows(helmet_dir / "data/narrativeqa/train.jsonl")
    demos = [train[i] for i in _item_order(record["question"], 42, len(train))[:2]]
    head = (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible.\n\nFor example:\n\n"
        + "\n\n".join(f"Question: {d['question']['text']}\nAnswer: {d['answers'][0]['text']}" for d in demos)
        + "\n\nNow, use the following story to answer the question:\n\n"
    )
    story = _split(example.prompt, head, f"\n\nQuestion: {record['question']}\nAnswer:")
    assert story.endswith(OMITTED) and record["context"].startswith(story[: -len(OMITTED)])
    # HELMET's first cut: the story is cut to L - 100 - 200 tokens (the name narrativeqa_7892 at 8K)
    story_tokens = len(llama3_tokenizer(story, add_special_tokens=False)["input_ids"])
    assert 8192 - 300 - 3 <= story_tokens <= 8192 - 300 + 1
    assert len(example.input_ids) <= 8192 - 100
    assert example.target == record["answer"] == [a["text"] for a in expected[0]["answers"]]


def test_infbench_choice_exact_prompt_and_demos_from_the_other_items(helmet_dir, llama3_tokenizer):
    rows = _rows(helmet_dir / "data/infbench/longbook_choice_eng.jsonl")
    data = load_helmet_task("infbench_choice_eng", helmet_dir, 8192, samples=2, seed=42, tokenizer=llama3_tokenizer)
    assert [r["id"] for r in data.records] == [int(i) for i in np.random.default_rng(42).permutation(3)[:2]]
    record = data.records[0]
    others = [r for r in rows if r["id"] != record["id"]]
    demos = [others[i] for i in np.random.default_rng(42).permutation(len(others))[:2]]  # the run's seed

    def options(r):
        return "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", r["options"]))

    head = (
        "You are given a story and a question with multiple choices. Choose the best answer from the options "
        "provided. Only one of the following options is correct, output the answer using one single letter (A, B, "
        "C, or D). Don't say anything else.\n\nFor example:\n\n"
        + "\n\n".join(f"[story text]\nQuestion: {d['input']}\nOptions:\n{options(d)}\nAnswer: B" for d in demos)
        + "\n\nNow, read the following story:\n\n"
    )
    row = next(r for r in rows if r["id"] == record["id"])
    tail = f"\n\nQuestion: {row['input']}\nOptions:\n{options(row)}\n\nAnswer:"
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=8192 - 10)
    assert _split(example.prompt, head, tail).endswith(OMITTED)
    assert example.target == ["B", f"B. {row['answer'][0]}"]


def test_infbench_qa_keeps_long_books_and_summaries_end_with_summary(helmet_dir, llama3_tokenizer):
    qa = load_helmet_task("infbench_qa_eng", helmet_dir, 4096, samples=10, seed=0, tokenizer=llama3_tokenizer)
    assert sorted(r["id"] for r in qa.records) == [0, 1, 2]  # id 3 is too short to be a test item ...
    prompts = [build_helmet_example(qa, i, llama3_tokenizer, 4096 - 10).prompt for i in range(3)]
    assert any("[story text]\nQuestion: Short?\nAnswer: yes" in p for p in prompts)  # ... but is a demonstration
    summ = load_helmet_task("infbench_sum_eng", helmet_dir, 4096, samples=1, seed=0, tokenizer=llama3_tokenizer)
    example = build_helmet_example(summ, 0, llama3_tokenizer, 4096 - 1200)
    assert example.prompt.endswith(f"{OMITTED}\n\nNow summarize the book.\n\nSummary:")
    assert "[story text]\nSummary: The falcon crosses the valley in book" in example.prompt  # demo answers stripped


def test_multi_lexsum_drops_unsummarised_and_short_cases_and_shows_train_summaries(helmet_dir, llama3_tokenizer):
    data = load_helmet_task("multi_lexsum", helmet_dir, 4096, samples=5, seed=0, tokenizer=llama3_tokenizer)
    assert [r["answer"] for r in data.records] == [["The court ruled 0."], ["The court ruled 1."]]  # file order
    example = build_helmet_example(data, 0, llama3_tokenizer, 4096 - 400)
    head = (
        "You are given the legal documents in a civil rights lawsuit, and you are tasked to summarize the case. "
        "Write a concise summary of one paragraph (200 to 250 words). The summary should contain a short description"
        " of the background, the parties involved, and the outcomes of the case.\n\nExample summaries:\n\n"
    )
    body = _split(example.prompt, head, f"{OMITTED}\n\nNow please summarize the case.\n\nSummary:")
    demos, documents = body.split("\n\nNow, write a summary of the following legal documents.\nLegal documents:\n")
    assert [d.split(" ")[-1] for d in demos.split("\n\n")] != [] and len(demos.split("\n\n")) == 2
    assert all(d.startswith("Summary: Settled case ") for d in demos.split("\n\n"))
    assert documents.startswith("CASE0 ")


@pytest.mark.parametrize("task", list(GENERATION))
def test_budget_and_chat_template_with_the_real_tokenizer(task, helmet_dir, llama3_tokenizer):
    data = load_helmet_task(task, helmet_dir, 4096, samples=1, seed=0, tokenizer=llama3_tokenizer)
    budget = 4096 - GENERATION[task]
    plain = build_helmet_example(data, 0, llama3_tokenizer, budget)
    chat = build_helmet_example(data, 0, llama3_tokenizer, budget, chat=True)
    for example in (plain, chat):  # the document is cut to budget - 200 (300), then the prompt to the budget
        assert budget - 300 <= len(example.input_ids) <= budget
    assert plain.input_ids == llama3_tokenizer(plain.prompt)["input_ids"]
    start, end = "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant"
    assert chat.prompt.startswith("<|begin_of_text|>" + start) and chat.prompt.endswith("<|end_header_id|>\n\n")
    user = chat.prompt[len("<|begin_of_text|>" + start): chat.prompt.index(end)]
    assert not user.rstrip().endswith(("Answer:", "Summary:"))  # the answer prefix is left to the assistant turn
    expected = llama3_tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                                    add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat.input_ids == list(expected)


def test_lengths_must_leave_room_for_the_reserve_and_the_generation(helmet_dir, llama3_tokenizer):
    with pytest.raises(ValueError, match=r"lengths: \[1400\] leave no room for infbench_sum_eng"):
        validate_request(["infbench_sum_eng"], [1400], [0.5], 1, helmet_dir, None, llama3_tokenizer)
    validate_request(["infbench_sum_eng"], [1401], [0.5], 1, helmet_dir, None, llama3_tokenizer)


def test_bad_lines_are_data_errors_naming_file_and_line(tmp_path, llama3_tokenizer):
    data = tmp_path / "data"
    write_longdoc(data)
    path = data / "infbench/longbook_qa_eng.jsonl"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], b'{"id": 9, "context": "caf\xe9"}', b'{"id": "x"}', *lines[1:]]) + b"\n")
    with pytest.raises(DataError) as err:
        load_helmet_task("infbench_qa_eng", tmp_path, 4096, 1, 0, llama3_tokenizer)
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 26)" in str(err.value)
    assert f"{path}:3: field 'id' must be an int" in str(err.value)
    # through the settings check (the eval command's), named after the setting, still a DataError
    settings = EvalSettings(["infbench_qa_eng"], [4096], samples_per_task=1, helmet_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"--helmet_dir: malformed HELMET data:\n  .*longbook_qa_eng.jsonl:2: not UTF"):
        check_settings(settings, llama3_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
    lexsum = data / "multi_lexsum/train.jsonl"
    lexsum.write_text(lexsum.read_text() + '{"summary/short": 3}\n')
    with pytest.raises(DataError, match=r"train.jsonl:7: field 'summary/short' must be a string or null"):
        load_helmet_task("multi_lexsum", tmp_path, 4096, 1, 0, llama3_tokenizer)


def test_chat_template_setting_is_checked_before_any_work(helmet_dir, llama3_tokenizer):
    plain_tokenizer = copy.copy(llama3_tokenizer)
    plain_tokenizer.chat_template = None
    settings = EvalSettings(["multi_lexsum"], [4096], samples_per_task=1, helmet_dir=str(helmet_dir))
    with pytest.raises(ConfigError, match="--use_chat_template: it is None, HELMET's default"):
        check_settings(settings, plain_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
    settings.use_chat_template = False  # a base model: completion prompts everywhere
    assert check_settings(settings, plain_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
    generated = EvalSettings(["json_kv"], [4096], samples_per_task=1, use_chat_template=True)
    check_settings(generated, llama3_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
    with pytest.raises(ConfigError, match=r"--use_chat_template: it is true, so \['json_kv'\]"):
        check_settings(generated, plain_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")
    settings = EvalSettings(["alce_asqa"], [4096], helmet_dir=str(helmet_dir), nli_model_dir=str(helmet_dir))
    with pytest.raises(ConfigError, match="--nli_model_dir: .* is not a Hugging Face model directory"):
        check_settings(settings, llama3_tokenizer, 128256, 8192, prefix="--", tokenizer_setting="--tokenizer")


def test_run_evaluation_over_longqa_summ_and_cite(helmet_dir, llama3_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    tasks = ["infbench_choice_eng", "multi_lexsum", "alce_asqa"]
    settings = EvalSettings(tasks, [1024], samples_per_task=1, seed=0, helmet_dir=str(helmet_dir), max_new_tokens=3)
    results = run_evaluation(model, llama3_tokenizer, settings, None)
    assert set(results.scores) == set(tasks) and results.config["chat_tasks"] == tasks  # HELMET's default: chat
    assert results.task_metrics == {"infbench_choice_eng": "choice_accuracy", "multi_lexsum": "rougeLsum_f1",
                                    "alce_asqa": "str_em"}
    assert all(r["prompt_tokens"] <= 1024 - 3 for r in results.records)
    asqa = results.metric_scores["alce_asqa"]
    assert asqa["citation_rec"][1024] is None and asqa["citation_prec"][1024] is None  # not computed, not 0
    assert asqa["str_em"][1024] == pytest.approx(results.scores["alce_asqa"][1024])
    assert "rougeL_f1" in results.metric_scores["multi_lexsum"]
    assert "cite" in results.incomplete_categories  # citation scores missing, so no cite score
    assert json.loads(json.dumps(results.to_dict()))["metric_scores"]["alce_asqa"]["citation_rec"] == {"1024": None}
