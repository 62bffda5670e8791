"""Synthetic tasks generated from a seed and sized in the model tokenizer's tokens: JSON KV and all of RULER but QA.

- `json_kv`: a JSON object of random UUID pairs (HELMET's JSON KV, generated); 2 demonstrations from the object.
- the eight RULER needle tasks (`ruler_niah_s_1` ... `ruler_niah_mv`), `ruler_vt`, `ruler_cwe`, `ruler_fwe`: as
  RULER's generators build them (table and facts in `ruler`), with HELMET's prompts. `ruler_qa_1`/`ruler_qa_2` need
  SQuAD/HotpotQA documents and are read from HELMET's files instead (`ruler_files`).

Budget. A prompt is built for a budget B = L - (the task's generation length), HELMET's input budget, so prompt
plus answer fit the evaluation length L. Needle, JSON KV and vt prompts end within max(1%, 2) tokens below B
(usually 1; `haystack.fit_layout`); cwe/fwe take the largest word count that fits B (RULER's search).

Depth. The needle tasks and JSON KV place their first gold needle after round(depth * n) of the n whole haystack
units, so the share of haystack before it is `depth` to within about one unit. Every other needle (the other values
of `ruler_niah_mv`, the other keys of `ruler_niah_mk_1`/`ruler_niah_mq`) gets its own depth, drawn independently
from RULER's 40 depths, as RULER places each needle independently. vt places its chain lines at independent random
lines (in chain order); vt, cwe and fwe examples carry no depth.

Haystacks (own text, documented in `wordlists`): RULER's noise line; essay-like sentences instead of Paul Graham's
essays; `adjective-noun` keys from shorter lists than RULER's wonderwords; cwe's pseudo-words (see `ruler`).

Determinism. Every example is a pure function of (seed, task, length, depth, index) via a SHA-256 seed, so ranks
build disjoint slices independently. Every needle value (and JSON KV's gold value) occurs exactly once in the
prompt (checked; a draw that breaks this is redrawn).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError
from prolong_lit.evals import prompts, ruler, wordlists
from prolong_lit.evals.haystack import Layout, count_tokens, fit_layout, stable_seed, stream_size, text_prefixes
from prolong_lit.evals.results import EvalExample

NIAH_TASKS = ruler.NIAH_TASKS
SYNTHETIC_TASKS = ("json_kv", *NIAH_TASKS, "ruler_vt", "ruler_cwe", "ruler_fwe")
NO_DEPTH = ("ruler_vt", "ruler_cwe", "ruler_fwe")

__all__ = ["SYNTHETIC_TASKS", "build_synthetic_example", "minimum_length", "stable_seed"]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return _uuid(rng)
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(wordlists.ADJECTIVES)}-{rng.choice(wordlists.NOUNS)}"
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(rng: random.Random, kind: str, count: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _draw(rng, kind)
        if value not in out and not any(value in a or a in value for a in avoid):
            out.append(value)
    return out


def _json_kv_layout(
    fmt: prompts.PromptFormat, rng: random.Random, depth: float, budget: int
) -> tuple[Layout, list[str], str]:
    tokenizer = fmt.tokenizer

    def pair(key: str, value: str) -> str:
        return f"{json.dumps(key)}: {json.dumps(value)}"

    def renderer(demos: list[tuple[str, str]]) -> Callable[[str], str]:
        def render(context: str) -> str:
            user = prompts.JSON_KV_USER.format(context=context, demos=prompts.json_kv_demos(demos), question=gold_key)
            return fmt.render(user, prompts.JSON_KV_PREFIX)

        return render

    gold_key, gold_value = _uuid(rng), _uuid(rng)
    sample = [(_uuid(rng), _uuid(rng)) for _ in range(8)]
    units = [pair(k, v) for k, v in sample]
    size = stream_size(tokenizer, units, ",\n ", budget)
    pairs = sample + [(_uuid(rng), _uuid(rng)) for _ in range(size - len(sample))]
    # The two demonstrations are pairs of the object itself, drawn among the pairs that will surely be included
    # (the expected count from the average pair cost, less a margin); tiny lengths fall back to the first two.
    per_pair = sum(count_tokens(tokenizer, [",\n " + u for u in units])) / len(units)
    overhead = len(fmt.encode(renderer(sample[:2])("{" + pair(gold_key, gold_value) + "}")))
    expected = int((budget - overhead) / per_pair) - 2
    demos = [pairs[i] for i in rng.sample(range(max(2, expected)), 2)]

    def partials(i: int) -> list[str]:  # key prefix first, then the value grows; both stay valid JSON strings
        key, value = pairs[i]
        return [pair(key[: min(c, len(key))], value[: max(0, c - len(key))]) for c in range(1, len(key) + len(value))]

    layout = Layout(
        units=[pair(k, v) for k, v in pairs],
        joiner=",\n ",
        needles=[pair(gold_key, gold_value)],
        depths=[depth],
        render=renderer(demos),
        partials=partials,
        open="{",
        close="}",
    )
    return layout, [gold_value], gold_key


def _haystack(tokenizer, rng: random.Random, spec: ruler.NeedleTask, budget: int, keys, values) -> list[str]:
    joiner = " " if spec.haystack == "essay" else "\n"
    if spec.haystack == "noise":
        return [wordlists.NOISE] * stream_size(tokenizer, [wordlists.NOISE], joiner, budget)
    if spec.haystack == "essay":
        size = stream_size(tokenizer, list(wordlists.ESSAY), joiner, budget)
        start = rng.randrange(len(wordlists.ESSAY))
        return [wordlists.ESSAY[(start + i) % len(wordlists.ESSAY)] for i in range(size)]
    # distractor needles: other keys (never a gold key, nor one containing it) with other values
    units: list[str] = []
    size = None
    while size is None or len(units) < size:
        key, value = _draw(rng, spec.key_type), _draw(rng, spec.value_type)
        if any(k in key or key in k for k in keys) or any(value in v or v in value for v in values):
            continue
        units.append(prompts.RULER_NEEDLE.format(type_needle_v=spec.value_type, key=key, value=value))
        if size is None and len(units) == 8:
            size = stream_size(tokenizer, units, joiner, budget)
    return units


def _niah_layout(fmt: prompts.PromptFormat, rng: random.Random, spec: ruler.NeedleTask, depth: float, budget: int):
    """RULER's niah: max(keys, queries) keys with `num_values` values each, every needle at its own depth."""
    tokenizer = fmt.tokenizer
    num_keys = max(spec.num_keys, spec.num_queries)
    keys = _distinct(rng, spec.key_type, num_keys, set())
    flat = _distinct(rng, spec.value_type, num_keys * spec.num_values, set(keys))
    values = [flat[i * spec.num_values : (i + 1) * spec.num_values] for i in range(num_keys)]
    queried = rng.sample(range(num_keys), spec.num_queries)
    answers = [v for i in queried for v in values[i]]
    needle_of = prompts.RULER_NEEDLE.format
    needles = [needle_of(type_needle_v=spec.value_type, key=keys[i], value=v) for i in queried for v in values[i]]
    needles += [needle_of(type_needle_v=spec.value_type, key=keys[i], value=v)
                for i in range(num_keys) if i not in queried for v in values[i]]
    depths = [depth] + rng.sample(ruler.DEPTHS, len(needles) - 1)  # the first gold needle at the requested depth
    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    single = spec.num_queries * spec.num_values == 1
    # RULER's template uses the singular when a single value is asked for ("number"), the needles the plural.
    type_v = spec.value_type[:-1] if single else spec.value_type
    user_t, prefix_t = (
        (prompts.RULER_SINGLE_USER, prompts.RULER_SINGLE_PREFIX)
        if single
        else (prompts.RULER_MULTI_USER, prompts.RULER_MULTI_PREFIX)
    )

    def render(context: str) -> str:
        user = user_t.format(type_needle_v=type_v, context=context, query=query)
        return fmt.render(user, prefix_t.format(type_needle_v=type_v, query=query))

    units = _haystack(tokenizer, rng, spec, budget, keys, flat)
    joiner = " " if spec.haystack == "essay" else "\n"
    layout = Layout(units, joiner, needles, depths, render, partials=lambda i: text_prefixes(units[i]))
    return layout, answers, query


def _vt_layout(fmt: prompts.PromptFormat, rng: random.Random, budget: int):
    """RULER's vt: one chain of 4 hops among noise lines, after a one-shot example of about 500 tokens."""
    tokenizer = fmt.tokenizer
    ex_lines, ex_names, ex_value = ruler.vt_chain(rng, letters=3)
    noise_cost = count_tokens(tokenizer, ["\n" + wordlists.NOISE])[0]
    ex_noise = max(1, (500 - len(prompts.encode(tokenizer, ruler.vt_prompt("\n".join(ex_lines), ex_value, ""))))
                   // noise_cost)
    positions = sorted(rng.sample(range(ex_noise), len(ex_lines)))
    sentences = [wordlists.NOISE] * ex_noise
    for j, (pos, line) in enumerate(zip(positions, ex_lines)):
        sentences.insert(pos + j, line)
    example = ruler.vt_prompt("\n".join(sentences), ex_value, "") + " " + " ".join(ex_names)
    lines, names, value = ruler.vt_chain(rng, letters=5)
    units = [wordlists.NOISE] * stream_size(tokenizer, [wordlists.NOISE], "\n", budget)
    depths = sorted(rng.random() for _ in lines)
    layout = Layout(units, "\n", lines, depths, lambda ctx: ruler.vt_prompt(ctx, value, example + "\n\n", fmt=fmt),
                    partials=lambda i: text_prefixes(units[i]))
    return layout, names, value


def _example(task, fmt: prompts.PromptFormat, rng, length: int, depth: float, budget: int, what: str):
    """(prompt, ids, answers, key, context, needle) of one draw."""
    tokenizer = fmt.tokenizer
    if task in ruler.AGGREGATION_TASKS:
        build = ruler.cwe_builder(rng, length, fmt) if task == "ruler_cwe" else ruler.fwe_builder(rng, budget, fmt)
        key = (task, length, budget, getattr(tokenizer, "name_or_path", ""), len(tokenizer), fmt.chat)
        prompt, ids, answers, context = ruler.fit_count(fmt, build, budget, key, what)
        return prompt, ids, answers, None, context, None
    if task == "json_kv":
        layout, answers, key = _json_kv_layout(fmt, rng, depth, budget)
    elif task == "ruler_vt":
        layout, answers, key = _vt_layout(fmt, rng, budget)
    else:
        layout, answers, key = _niah_layout(fmt, rng, NIAH_TASKS[task], depth, budget)
    prompt, ids, context = fit_layout(fmt, layout, budget, what)
    return prompt, ids, answers, key, context, layout.needles[0]


def _answers_ok(task: str, prompt: str, answers: list[str]) -> bool:
    """Needle values and JSON KV's value occur exactly once; vt/cwe/fwe answers recur by design."""
    return task in NO_DEPTH or all(prompt.count(answer) == 1 for answer in answers)


def build_synthetic_example(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    index: int,
    seed: int,
    budget: int | None = None,
    chat: bool = False,
) -> EvalExample:
    """The `index`-th example of `task` at evaluation length `length`, the gold at `depth` (0.0 start .. 1.0 end).

    `budget` is the prompt's token budget (the runner passes length - the generation length, HELMET's budget);
    None: `length` itself. `chat`: the prompt in the tokenizer's chat template (HELMET's `use_chat_template`).
    """
    if task not in SYNTHETIC_TASKS:
        raise ConfigError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"{task}: depth {depth} is outside [0, 1]")
    budget = length if budget is None else budget
    what = f"{task}@{length}"
    rng = random.Random(stable_seed(seed, task, length, f"{depth:.6f}", index))
    for _ in range(10):
        prompt, ids, answers, key, context, needle = _example(
            task, prompts.PromptFormat(tokenizer, chat), rng, length, depth, budget, what
        )
        if _answers_ok(task, prompt, answers):
            break
    else:  # pragma: no cover - needs ten collisions of random 7-digit numbers or UUIDs in a row
        raise RuntimeError(f"{what}: could not draw a prompt whose answers occur exactly once")
    start = prompt.index(context)
    return EvalExample(
        task=task,
        length=length,
        index=index,
        prompt=prompt,
        input_ids=ids,
        target=list(answers),
        depth=None if task in NO_DEPTH else depth,
        meta={
            "key": key,
            "needle": needle,
            "budget": budget,
            "context_start": start,  # character span of the context (haystack + needles) in the prompt
            "context_end": start + len(context),
        },
    )


def minimum_length(task: str, tokenizer: PreTrainedTokenizerBase, chat: bool = False) -> int:
    """Tokens of `task`'s prompt with an empty haystack (cwe/fwe: the smallest word list): smaller budgets fail."""
    rng = random.Random(0)
    fmt = prompts.PromptFormat(tokenizer, chat)
    if task in ruler.AGGREGATION_TASKS:
        build = ruler.cwe_builder(rng, 1024, fmt) if task == "ruler_cwe" else ruler.fwe_builder(rng, 1024, fmt)
        return len(fmt.encode(build(10)[0]))
    if task == "json_kv":
        layout, _, _ = _json_kv_layout(fmt, rng, 0.0, 256)
    elif task == "ruler_vt":
        layout, _, _ = _vt_layout(fmt, rng, 256)
    elif task in NIAH_TASKS:
        layout, _, _ = _niah_layout(fmt, rng, NIAH_TASKS[task], 0.0, 256)
    else:
        raise ConfigError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
    return len(fmt.encode(layout.render(layout.context(0, None))))
