"""Synthetic recall tasks with the real Llama-3 tokenizer: length, needle depth, uniqueness, determinism."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from prolong_lit.evals import wordlists
from prolong_lit.evals.synthetic import SYNTHETIC_TASKS, build_synthetic_example, minimum_length

LENGTHS = (256, 1024, 4096)


def _context_span(task: str, prompt: str) -> tuple[int, int]:
    """Where the haystack sits in the prompt, found from the templates (not from the generator's metadata)."""
    if task == "json_kv":
        return prompt.index("{"), prompt.index("}\n\nExtract the value") + 1
    start = prompt.index("afterwards.\n") + len("afterwards.\n")
    return start, prompt.rindex("\nWhat ")


def _needle_span(task: str, prompt: str, answers: list[str]) -> tuple[int, int]:
    """First and last character of the gold needle block."""
    if task == "json_kv":
        key = prompt.rsplit("Key: ", 1)[1].split("\n")[0]
        needle = f'"{key}": "{answers[0]}"'
        start = prompt.index(needle)
        return start, start + len(needle)
    key = prompt.rsplit(" for ", 1)[1].split(" mentioned")[0]
    kind = "uuids" if "uuid" in prompt.rsplit("\n", 1)[1] else "numbers"
    needles = [f"One of the special magic {kind} for {key} is: {a}." for a in answers]
    starts = [prompt.index(n) for n in needles]
    return min(starts), max(s + len(n) for s, n in zip(starts, needles))


def _unit_tokens(tokenizer, task: str) -> int:
    """Tokens of the largest haystack unit of the task (a bound on how finely the needle can be placed)."""
    rng = random.Random(0)
    uuids = [(str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128)))) for _ in range(50)]
    units = {
        "json_kv": [f'"{k}": "{v}",\n ' for k, v in uuids],
        "ruler_niah_s_1": [wordlists.NOISE + "\n"],
        "ruler_niah_mk_2": ["One of the special magic numbers for sleepy-trumpet is: 1234567.\n"],
        "ruler_niah_mk_3": [f"One of the special magic uuids for {k} is: {v}.\n" for k, v in uuids],
        "ruler_niah_mv": [" " + s for s in wordlists.ESSAY],
    }[task]
    return max(len(tokenizer(u, add_special_tokens=False)["input_ids"]) for u in units)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_prompt_length_is_the_target_within_one_percent(llama3_tokenizer, task):
    for length in LENGTHS:
        for depth in (0.0, 0.5, 1.0):
            example = build_synthetic_example(task, llama3_tokenizer, length, depth, index=0, seed=7)
            measured = len(llama3_tokenizer(example.prompt)["input_ids"])
            assert measured == len(example.input_ids)
            assert abs(measured - length) <= max(0.01 * length, 2.56), (task, length, depth, measured)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answer_occurs_once_at_the_requested_depth(llama3_tokenizer, task):
    unit = _unit_tokens(llama3_tokenizer, task)
    for length in (1024, 4096):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            example = build_synthetic_example(task, llama3_tokenizer, length, depth, index=1, seed=3)
            prompt = example.prompt
            for answer in example.target:
                assert prompt.count(answer) == 1, (task, length, depth, answer)
            enc = llama3_tokenizer(prompt, return_offsets_mapping=True)
            ctx_start, ctx_end = _context_span(task, prompt)
            needle_start, needle_end = _needle_span(task, prompt, example.target)
            tok = enc.char_to_token
            haystack_tokens = (tok(ctx_end - 1) - tok(ctx_start)) - (tok(needle_end - 1) - tok(needle_start))
            measured = (tok(needle_start) - tok(ctx_start)) / haystack_tokens
            # The needle goes between whole units: rounding depth * n misses by half a unit, and the shortened
            # unit at the end of the haystack adds up to one more; 2 tokens of slack for the seams.
            tolerance = (1.5 * unit + 2) / haystack_tokens
            assert abs(measured - depth) <= tolerance, (task, length, depth, measured, tolerance)


def test_same_seed_same_prompt_other_seed_or_index_another(llama3_tokenizer):
    for task in SYNTHETIC_TASKS:
        a = build_synthetic_example(task, llama3_tokenizer, 512, 0.5, index=0, seed=1)
        b = build_synthetic_example(task, llama3_tokenizer, 512, 0.5, index=0, seed=1)
        c = build_synthetic_example(task, llama3_tokenizer, 512, 0.5, index=0, seed=2)
        d = build_synthetic_example(task, llama3_tokenizer, 512, 0.5, index=1, seed=1)
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


def test_ruler_prompts_follow_the_templates(llama3_tokenizer):
    single = build_synthetic_example("ruler_niah_s_1", llama3_tokenizer, 512, 0.5, index=0, seed=0)
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith("mentioned in the provided text is")
    assert wordlists.NOISE in single.prompt and len(single.target) == 1
    multi = build_synthetic_example("ruler_niah_mv", llama3_tokenizer, 512, 0.5, index=0, seed=0)
    assert multi.prompt.startswith("Some special magic numbers are hidden within the following text.")
    assert multi.prompt.endswith("mentioned in the provided text are") and len(set(multi.target)) == 4
    mk3 = build_synthetic_example("ruler_niah_mk_3", llama3_tokenizer, 1024, 0.5, index=0, seed=0)
    key = mk3.meta["key"]
    assert mk3.prompt.count(f"for {key} is:") == 1  # the distractor needles never use the gold key
    assert mk3.prompt.count("One of the special magic uuids for") > 5


def test_lengths_below_the_template_are_refused(llama3_tokenizer):
    floor = minimum_length("json_kv", llama3_tokenizer)
    assert 150 < floor < 256
    with pytest.raises(ValueError, match="use a length of at least"):
        build_synthetic_example("json_kv", llama3_tokenizer, floor // 2, 0.5, index=0, seed=0)
    with pytest.raises(ValueError, match="outside"):
        build_synthetic_example("json_kv", llama3_tokenizer, 1024, 1.5, index=0, seed=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        build_synthetic_example("niah", llama3_tokenizer, 1024, 0.5, index=0, seed=0)
