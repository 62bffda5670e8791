"""Synthetic recall tasks generated from a seed and sized in the model tokenizer's tokens.

Tasks (names as in HELMET's configs; RULER's generator settings in brackets):

| task              | haystack [RULER generator]               | key   | value(s)            | HELMET gen len |
|-------------------|------------------------------------------|-------|---------------------|----------------|
| `json_kv`         | JSON object of random UUID pairs         | UUID  | UUID                | 100            |
| `ruler_niah_s_1`  | noise lines [niah_single_1]              | words | 7-digit number      | 50             |
| `ruler_niah_mk_2` | distractor needles [niah_multikey_2]     | words | 7-digit number      | 50             |
| `ruler_niah_mk_3` | distractor needles [niah_multikey_3]     | UUID  | UUID                | 100            |
| `ruler_niah_mv`   | essay-like sentences [niah_multivalue]   | words | 4 x 7-digit numbers | 50             |

Length. A prompt built for length L has L tokens (BOS included) within max(1%, 2 tokens), usually within 1:
the haystack is a stream of units (a JSON pair, a noise line, a sentence, a distractor needle); the generator
takes as many whole units as fit and then a shortened copy of the next one (a word prefix of a sentence or line;
a JSON pair whose key and value are UUID prefixes, so the object stays valid JSON). Unit costs are measured once
in a batch and the whole prompt is tokenized two or three times to correct for merges at the seams (about 1 s
per 128K-token prompt on one CPU core).

Depth. The gold needle (for `ruler_niah_mv`: the block of its 4 needles, in random order) is inserted after
round(depth * n) of the n whole units, so the share of haystack tokens before it is `depth` to within about one
unit (plus the shortened unit at the end). JSON KV's two demonstrations are pairs of the same object.

Determinism. Every example is a pure function of (seed, task, length, depth, index), via a SHA-256 seed, so ranks
build disjoint slices independently and the same seed always gives the same prompts. The gold value(s) occur
exactly once in the prompt (checked; a draw that breaks this is redrawn).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import prompts, wordlists
from prolong_lit.evals.results import EvalExample


@dataclass(frozen=True)
class NeedleTask:
    """One RULER needle variant."""

    haystack: str  # "noise" | "essay" | "needles"
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "uuids"
    num_values: int = 1


RULER_TASKS: dict[str, NeedleTask] = {
    "ruler_niah_s_1": NeedleTask("noise", "words", "numbers"),
    "ruler_niah_mk_2": NeedleTask("needles", "words", "numbers"),
    "ruler_niah_mk_3": NeedleTask("needles", "uuids", "uuids"),
    "ruler_niah_mv": NeedleTask("essay", "words", "numbers", num_values=4),
}
SYNTHETIC_TASKS = ("json_kv", *RULER_TASKS)


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python versions."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def length_tolerance(length: int) -> int:
    """How far (in tokens) a synthetic prompt may be from its target length: 1%, at least 2 tokens."""
    return max(2, int(0.01 * length))


@dataclass
class _Layout:
    """Everything needed to render a prompt with n whole haystack units plus a shortened one."""

    units: list[str]  # the haystack stream
    joiner: str
    needles: list[str]  # gold unit(s), inserted as one block at the depth
    render: Callable[[str], str]  # context -> full prompt
    partials: Callable[[int], list[str]]  # shortened versions of unit i, shortest first
    open: str = ""
    close: str = ""

    def context(self, n: int, depth: float, partial: str | None) -> str:
        at = round(depth * n)
        parts = self.units[:at] + self.needles + self.units[at:n] + ([partial] if partial else [])
        return self.open + self.joiner.join(parts) + self.close


def _count(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fit(tokenizer, layout: _Layout, depth: float, target: int, what: str) -> tuple[str, list[int], str]:
    """Choose the number of units and the shortened last unit so the prompt has `target` tokens."""
    base = len(prompts.encode(tokenizer, layout.render(layout.context(0, depth, None))))
    if base > target + length_tolerance(target):
        raise ValueError(f"{what}: the prompt without any haystack has {base} tokens; use a length of at least {base}")
    unique = list(dict.fromkeys(layout.units))  # noise/essay streams repeat a few strings
    cost_of = dict(zip(unique, _count(tokenizer, [layout.joiner + u for u in unique])))
    cum = [0]
    for unit in layout.units:
        cum.append(cum[-1] + cost_of[unit])
    if base + cum[-1] < target:
        raise RuntimeError(f"{what}: the haystack stream is too short for {target} tokens (a bug)")
    # Seams merge tokens (".\n" is one token), so the sum of unit costs is off by a roughly constant factor:
    # measure the whole prompt, rescale the unit costs, choose again.
    scale, best = 1.0, None
    for _ in range(6):
        n = bisect.bisect_right(cum, (target - base) / scale) - 1
        n = max(0, min(n, len(layout.units) - 1))
        rest = target - base - scale * cum[n]
        candidates = [""] + layout.partials(n)
        costs = [0] + _count(tokenizer, [layout.joiner + c for c in candidates[1:]])
        pick = min(range(len(candidates)), key=lambda i: (abs(costs[i] - rest), costs[i]))
        context = layout.context(n, depth, candidates[pick] or None)
        prompt = layout.render(context)
        ids = prompts.encode(tokenizer, prompt)
        if best is None or abs(len(ids) - target) < abs(len(best[1]) - target):
            best = (prompt, ids, context)
        if abs(len(ids) - target) <= 1:
            break
        if cum[n] > 0:
            scale = max(0.5, (len(ids) - base - costs[pick]) / cum[n])
    if abs(len(best[1]) - target) > length_tolerance(target):
        raise RuntimeError(f"{what}: could not fit the prompt to {target} tokens (got {len(best[1])})")
    return best


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


def _text_prefixes(unit: str) -> list[str]:
    """Word prefixes of a line or sentence, plus character cuts inside long words (UUIDs, numbers)."""
    out, pos = [], 0
    words = unit.split(" ")
    for k, word in enumerate(words):
        if len(word) > 6:
            out.extend(unit[: pos + c] for c in range(1, len(word)))
        pos += len(word)
        if k < len(words) - 1:
            out.append(unit[:pos])
        pos += 1
    return out


def _stream_size(tokenizer, sample_units: list[str], joiner: str, target: int) -> int:
    per_unit = max(1.0, sum(_count(tokenizer, [joiner + u for u in sample_units])) / len(sample_units))
    return int(target / per_unit * 1.25) + 16


def _json_kv_layout(tokenizer, rng: random.Random, length: int) -> tuple[_Layout, list[str], str]:
    def pair(key: str, value: str) -> str:
        return f"{json.dumps(key)}: {json.dumps(value)}"

    def renderer(demos: list[tuple[str, str]]) -> Callable[[str], str]:
        def render(context: str) -> str:
            user = prompts.JSON_KV_USER.format(context=context, demos=prompts.json_kv_demos(demos), question=gold_key)
            return prompts.completion_prompt(user, prompts.JSON_KV_PREFIX)

        return render

    gold_key, gold_value = _uuid(rng), _uuid(rng)
    sample = [(_uuid(rng), _uuid(rng)) for _ in range(8)]
    units = [pair(k, v) for k, v in sample]
    size = _stream_size(tokenizer, units, ",\n ", length)
    pairs = sample + [(_uuid(rng), _uuid(rng)) for _ in range(size - len(sample))]
    # The two demonstrations are pairs of the object itself, drawn among the pairs that will surely be included
    # (the expected count from the average pair cost, less a margin); tiny lengths fall back to the first two.
    per_pair = sum(_count(tokenizer, [",\n " + u for u in units])) / len(units)
    overhead = len(prompts.encode(tokenizer, renderer(sample[:2])("{" + pair(gold_key, gold_value) + "}")))
    expected = int((length - overhead) / per_pair) - 2
    demos = [pairs[i] for i in rng.sample(range(max(2, expected)), 2)]

    def partials(i: int) -> list[str]:  # key prefix first, then the value grows; both stay valid JSON strings
        key, value = pairs[i]
        return [pair(key[: min(c, len(key))], value[: max(0, c - len(key))]) for c in range(1, len(key) + len(value))]

    layout = _Layout(
        units=[pair(k, v) for k, v in pairs],
        joiner=",\n ",
        needles=[pair(gold_key, gold_value)],
        render=renderer(demos),
        partials=partials,
        open="{",
        close="}",
    )
    return layout, [gold_value], gold_key


def _ruler_layout(tokenizer, rng: random.Random, spec: NeedleTask, length: int) -> tuple[_Layout, list[str], str]:
    gold_key = _draw(rng, spec.key_type)
    values: list[str] = []
    while len(values) < spec.num_values:
        value = _draw(rng, spec.value_type)
        if value not in values:
            values.append(value)
    needles = [prompts.RULER_NEEDLE.format(type_needle_v=spec.value_type, key=gold_key, value=v) for v in values]
    rng.shuffle(needles)
    joiner = " " if spec.haystack == "essay" else "\n"
    if spec.haystack == "noise":
        size = _stream_size(tokenizer, [wordlists.NOISE], joiner, length)
        units = [wordlists.NOISE] * size
    elif spec.haystack == "essay":
        size = _stream_size(tokenizer, list(wordlists.ESSAY), joiner, length)
        start = rng.randrange(len(wordlists.ESSAY))
        units = [wordlists.ESSAY[(start + i) % len(wordlists.ESSAY)] for i in range(size)]
    else:  # distractor needles: other keys (never the gold key, nor one containing it) with other values
        units = []
        size = None
        while size is None or len(units) < size:
            key, value = _draw(rng, spec.key_type), _draw(rng, spec.value_type)
            if gold_key in key or key in gold_key or value in values:
                continue
            units.append(prompts.RULER_NEEDLE.format(type_needle_v=spec.value_type, key=key, value=value))
            if size is None and len(units) == 8:
                size = _stream_size(tokenizer, units, joiner, length)
    # RULER's template uses the singular when a single value is asked for ("number"), the needles the plural.
    type_v = spec.value_type[:-1] if spec.num_values == 1 else spec.value_type
    user_t, prefix_t = (
        (prompts.RULER_SINGLE_USER, prompts.RULER_SINGLE_PREFIX)
        if spec.num_values == 1
        else (prompts.RULER_MULTI_USER, prompts.RULER_MULTI_PREFIX)
    )

    def render(context: str) -> str:
        user = user_t.format(type_needle_v=type_v, context=context, query=gold_key)
        return prompts.completion_prompt(user, prefix_t.format(type_needle_v=type_v, query=gold_key))

    layout = _Layout(
        units=units, joiner=joiner, needles=needles, render=render, partials=lambda i: _text_prefixes(units[i])
    )
    return layout, values, gold_key


def build_synthetic_example(
    task: str, tokenizer: PreTrainedTokenizerBase, length: int, depth: float, index: int, seed: int
) -> EvalExample:
    """The `index`-th example of `task` at `length` tokens with the gold at `depth` (0.0 start .. 1.0 end)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{task}: depth {depth} is outside [0, 1]")
    what = f"{task}@{length}"
    rng = random.Random(stable_seed(seed, task, length, f"{depth:.6f}", index))
    for _ in range(10):
        if task == "json_kv":
            layout, answers, key = _json_kv_layout(tokenizer, rng, length)
        else:
            layout, answers, key = _ruler_layout(tokenizer, rng, RULER_TASKS[task], length)
        prompt, ids, context = _fit(tokenizer, layout, depth, length, what)
        if all(prompt.count(answer) == 1 for answer in answers):
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
        target=answers,
        depth=depth,
        meta={
            "key": key,
            "needle": layout.needles[0],
            "context_start": start,  # character span of the context (haystack + needles) in the prompt
            "context_end": start + len(context),
        },
    )


def minimum_length(task: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of `task`'s prompt with an empty haystack: lengths below this cannot be built."""
    rng = random.Random(0)
    if task == "json_kv":
        layout, _, _ = _json_kv_layout(tokenizer, rng, 256)
    else:
        layout, _, _ = _ruler_layout(tokenizer, rng, RULER_TASKS[task], 256)
    return len(prompts.encode(tokenizer, layout.render(layout.context(0, 0.0, None))))
