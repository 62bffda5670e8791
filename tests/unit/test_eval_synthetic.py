"""Synthetic tasks (JSON KV and RULER) with the real Llama-3 tokenizer: budget, needle structure and depths,
uniqueness of the answers, RULER's aggregation and tracing rules, determinism."""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import Counter

import pytest

from prolong_lit.evals import ruler, wordlists
from prolong_lit.evals.registry import TASKS
from prolong_lit.evals.synthetic import NIAH_TASKS, SYNTHETIC_TASKS, build_synthetic_example, minimum_length

NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.")


def _budget(task: str, length: int) -> int:
    return length - TASKS[task].max_new_tokens  # HELMET's input budget


def _context_span(task: str, prompt: str) -> tuple[int, int]:
    """Where the haystack sits in the prompt, found from the templates (not from the generator's metadata)."""
    if task == "json_kv":
        return prompt.index("{"), prompt.index("}\n\nExtract the value") + 1
    start = prompt.index("afterwards.\n") + len("afterwards.\n")
    return start, prompt.rindex("\nWhat ")


def _gold_span(task: str, prompt: str, answer: str) -> tuple[int, int]:
    """Character span of the needle (or JSON pair) that holds `answer`."""
    if task == "json_kv":
        key = prompt.rsplit("Key: ", 1)[1].split("\n")[0]
        needle = f'"{key}": "{answer}"'
    else:
        needle = next(m.group(0) for m in NEEDLE.finditer(prompt) if m.group(2) == answer)
    start = prompt.index(needle)
    return start, start + len(needle)


def _unit_tokens(tokenizer, task: str) -> int:
    """Tokens of the largest haystack unit of the task (a bound on how finely the needle can be placed)."""
    rng = random.Random(0)
    uuids = [(str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128)))) for _ in range(50)]
    haystack = "json" if task == "json_kv" else NIAH_TASKS[task].haystack
    units = {
        "json": [f'"{k}": "{v}",\n ' for k, v in uuids],
        "noise": [wordlists.NOISE + "\n"],
        "needles": [f"One of the special magic uuids for {k} is: {v}.\n" for k, v in uuids],
        "essay": [" " + s for s in wordlists.ESSAY],
    }[haystack]
    return max(len(tokenizer(u, add_special_tokens=False)["input_ids"]) for u in units)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_prompt_fills_the_budget_length_minus_generation(llama3_tokenizer, task):
    """HELMET's budget: prompt <= L - max_new_tokens, and (RULER's search) close to it."""
    for length in (1024, 4096):
        budget = _budget(task, length)
        for depth in (0.0, 1.0):
            example = build_synthetic_example(task, llama3_tokenizer, length, depth, 0, seed=7, budget=budget)
            measured = len(llama3_tokenizer(example.prompt)["input_ids"])
            assert measured == len(example.input_ids)
            slack = 0.02 * budget if task in ruler.AGGREGATION_TASKS else max(0.01 * budget, 2)  # word lists: coarser
            assert budget - slack <= measured <= budget, (task, length, depth, measured, budget)


@pytest.mark.parametrize("task", ["json_kv", *NIAH_TASKS])
def test_answers_once_and_first_gold_at_the_requested_depth(llama3_tokenizer, task):
    unit = _unit_tokens(llama3_tokenizer, task)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        example = build_synthetic_example(task, llama3_tokenizer, 2048, depth, index=1, seed=3)
        prompt = example.prompt
        for answer in example.target:
            assert prompt.count(answer) == 1, (task, depth, answer)
        enc = llama3_tokenizer(prompt, return_offsets_mapping=True)
        tok = enc.char_to_token
        ctx_start, ctx_end = _context_span(task, prompt)
        spans = [_gold_span(task, prompt, a) for a in example.target]
        spans += [(m.start(), m.end()) for m in NEEDLE.finditer(prompt) if m.group(2) not in example.target
                  and NIAH_TASKS.get(task, ruler.NeedleTask("", "", "")).haystack == "essay"]  # mk_1/mq distractors
        needle_tokens = sum(tok(e - 1) - tok(s) for s, e in spans)
        haystack_tokens = (tok(ctx_end - 1) - tok(ctx_start)) - needle_tokens
        first = spans[0][0]  # the first gold needle: placed at `depth` (the others before it are subtracted)
        before = sum(tok(e - 1) - tok(s) for s, e in spans if e <= first)
        measured = (tok(first) - tok(ctx_start) - before) / haystack_tokens
        tolerance = (1.5 * unit + 2 + 2 * len(spans)) / haystack_tokens
        assert abs(measured - depth) <= tolerance, (task, depth, measured, tolerance)


def test_needle_counts_follow_ruler(llama3_tokenizer):
    """niah_multikey_1: 4 keys, 1 asked; multiquery: 4 keys, all asked; multivalue: 1 key, 4 values; multikey_2/3:
    the gold needle among distractor needles that never use its key or value."""
    for task, keys, asked, values in (("ruler_niah_mk_1", 4, 1, 1), ("ruler_niah_mq", 4, 4, 1),
                                      ("ruler_niah_mv", 1, 1, 4), ("ruler_niah_s_2", 1, 1, 1)):
        example = build_synthetic_example(task, llama3_tokenizer, 2048, 0.5, 0, seed=1)
        needles = NEEDLE.findall(example.prompt)
        assert len(needles) == keys * values, task
        assert len({k for k, _ in needles}) == keys and len(example.target) == asked * values
        question = example.prompt.rsplit("\n", 2)[-2]
        assert sum(k in question for k in {k for k, _ in needles}) == asked
    mk2 = build_synthetic_example("ruler_niah_mk_2", llama3_tokenizer, 2048, 0.5, 0, seed=1)
    needles = NEEDLE.findall(mk2.prompt)
    gold_key = mk2.meta["key"]
    assert len(needles) > 20 and [k for k, _ in needles].count(gold_key) == 1
    assert [v for _, v in needles].count(mk2.target[0]) == 1


def test_multi_value_needles_sit_at_independent_depths(llama3_tokenizer):
    """RULER places every needle independently: mv's four values are no block, and the extra ones move between
    examples while the first stays at the requested depth."""
    spreads, extra_positions = [], set()
    for index in range(8):
        example = build_synthetic_example("ruler_niah_mv", llama3_tokenizer, 4096, 0.25, index, seed=5)
        prompt = example.prompt
        ctx_start, ctx_end = _context_span("ruler_niah_mv", prompt)
        where = [(_gold_span("ruler_niah_mv", prompt, a)[0] - ctx_start) / (ctx_end - ctx_start)
                 for a in example.target]
        assert abs(where[0] - 0.25) < 0.05
        spreads.append(max(where) - min(where))
        extra_positions.update(round(w, 2) for w in where[1:])
    assert sum(s > 0.1 for s in spreads) >= 6  # a block of four sentences would span < 1% of 4K tokens
    assert len(extra_positions) >= 12


def test_variable_tracking_chain(llama3_tokenizer):
    example = build_synthetic_example("ruler_vt", llama3_tokenizer, 4096, 0.5, 0, seed=2)
    prompt = example.prompt
    value = example.meta["key"]
    names = example.target
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    main = prompt[prompt.rindex("Memorize and track"):]  # after the one-shot example
    lines = [line.strip() for line in main.split("\n") if line.startswith("VAR ")]
    assert lines == [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4)]
    assert main.count(value) == 3  # the chain's head, the question, the answer prefix
    assert prompt.endswith(f"5 variables are assigned the value {value}, they are:")
    example_part = prompt[: prompt.rindex("Memorize and track")]
    assert example_part.startswith("Memorize and track") and re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n\n$",
                                                                           example_part)
    assert example.depth is None


@pytest.mark.parametrize("length,common,rare", [(2048, 6, 1), (4096, 30, 3)])
def test_common_words_extraction_counts(llama3_tokenizer, length, common, rare):
    """RULER's cwe: 10 words `common` times, the others `rare` times (6/1 below 4K, 30/3 from 4K)."""
    example = build_synthetic_example("ruler_cwe", llama3_tokenizer, length, 0.0, 0, seed=4)
    main = example.prompt[example.prompt.rindex("Below is a numbered list"):]
    words = re.findall(r"\d+\. ([a-z]+)", main.split("\n")[1])
    counts = Counter(words)
    assert sorted(counts[w] for w in example.target) == [common] * 10
    assert set(counts.values()) == {common, rare} and len(counts) > 50
    assert example.prompt.endswith(ruler.CWE_PREFIX)


def test_frequent_words_extraction_answers_are_the_next_three(llama3_tokenizer):
    example = build_synthetic_example("ruler_fwe", llama3_tokenizer, 4096, 0.0, 0, seed=4)
    context = example.prompt.split("\n")[1]
    ranked = [w for w, _ in Counter(context.split(" ")).most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == example.target
    assert example.prompt.endswith(ruler.FWE_PREFIX)


def test_same_seed_same_prompt_other_seed_or_index_another(llama3_tokenizer):
    for task in SYNTHETIC_TASKS:
        a = build_synthetic_example(task, llama3_tokenizer, 1024, 0.5, index=0, seed=1)
        b = build_synthetic_example(task, llama3_tokenizer, 1024, 0.5, index=0, seed=1)
        c = build_synthetic_example(task, llama3_tokenizer, 1024, 0.5, index=0, seed=2)
        d = build_synthetic_example(task, llama3_tokenizer, 1024, 0.5, index=1, seed=1)
        assert a.prompt == b.prompt and a.input_ids == b.input_ids and a.target == b.target
        assert c.target != a.target and c.prompt != a.prompt
        assert d.target != a.target


def test_json_kv_context_is_valid_json_with_the_gold_pair_and_demos_from_it(llama3_tokenizer):
    example = build_synthetic_example("json_kv", llama3_tokenizer, 2048, 0.3, index=0, seed=5)
    prompt = example.prompt
    start, end = _context_span("json_kv", prompt)
    data = json.loads(prompt[start:end])
    key = prompt.rsplit("Key: ", 1)[1].split("\n")[0]
    assert data[key] == example.target[0]
    assert prompt.endswith(f"Key: {key}\nCorresponding value:")
    demos = prompt[end:].split("Key: ")[1:-1]
    assert len(demos) == 2
    for demo in demos:  # "k\nCorresponding value: v\n\n"
        demo_key, demo_value = demo.split("\nCorresponding value: ")
        assert data[demo_key] == demo_value.strip() and demo_key != key
    assert len(data) > 20


def test_ruler_prompts_follow_helmets_templates(llama3_tokenizer):
    single = build_synthetic_example("ruler_niah_s_1", llama3_tokenizer, 512, 0.5, index=0, seed=0)
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith("mentioned in the provided text is")
    assert wordlists.NOISE in single.prompt and len(single.target) == 1
    uuid_single = build_synthetic_example("ruler_niah_s_3", llama3_tokenizer, 512, 0.5, index=0, seed=0)
    assert uuid_single.prompt.startswith("A special magic uuid is hidden") and len(uuid_single.target[0]) == 36
    multi = build_synthetic_example("ruler_niah_mq", llama3_tokenizer, 1024, 0.5, index=0, seed=0)
    assert multi.prompt.startswith("Some special magic numbers are hidden within the following text.")
    assert multi.prompt.endswith("mentioned in the provided text are") and ", and " in multi.meta["key"]


def test_lengths_below_the_template_are_refused(llama3_tokenizer):
    floor = minimum_length("json_kv", llama3_tokenizer)
    assert 150 < floor < 256
    with pytest.raises(ValueError, match="use a length of at least"):
        build_synthetic_example("json_kv", llama3_tokenizer, 1024, 0.5, index=0, seed=0, budget=floor // 2)
    with pytest.raises(ValueError, match="outside"):
        build_synthetic_example("json_kv", llama3_tokenizer, 1024, 1.5, index=0, seed=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        build_synthetic_example("niah", llama3_tokenizer, 1024, 0.5, index=0, seed=0)
    assert minimum_length("ruler_vt", llama3_tokenizer) > 500  # RULER's one-shot example is ~500 tokens


@pytest.mark.parametrize("task", ["json_kv", "ruler_niah_mv", "ruler_vt", "ruler_cwe", "ruler_fwe"])
def test_chat_template_prompts_fit_the_budget_with_the_answers_once(llama3_tokenizer, task):
    """use_chat_template for a generated task: the user turn in the tokenizer's chat template with the assistant
    turn opened (no answer prefix), fitted to the same budget, BOS from the template (not added twice)."""
    budget = 2048 - 100
    plain = build_synthetic_example(task, llama3_tokenizer, 2048, 0.5, 0, seed=3, budget=budget)
    chat = build_synthetic_example(task, llama3_tokenizer, 2048, 0.5, 0, seed=3, budget=budget, chat=True)
    assert chat.prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert chat.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat.input_ids == llama3_tokenizer(chat.prompt, add_special_tokens=False)["input_ids"]
    assert chat.input_ids.count(llama3_tokenizer.bos_token_id) == 1
    assert budget - 0.05 * budget <= len(chat.input_ids) <= budget
    assert chat.target == plain.target  # the same draw: the format changes, the task does not
    if task not in ("ruler_vt", "ruler_cwe", "ruler_fwe"):
        assert all(chat.prompt.count(answer) == 1 for answer in chat.target)
    assert plain.prompt not in chat.prompt  # the completion prompt's answer prefix is not part of the chat turn
