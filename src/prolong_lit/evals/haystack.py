"""Fitting a haystack prompt to a token budget: the machinery the synthetic tasks share.

A prompt is a template around a context; the context is a stream of haystack units (a JSON pair, a noise line, a
sentence, a distractor needle) with needles inserted at given depths. `fit_layout` takes as many whole units as fit
and then a shortened copy of the next one, so the prompt ends up at most `budget` tokens and usually within one
token of it. Unit costs are measured once in a batch and the whole prompt is tokenized a few times to correct for
merges at the seams (about 1 s per 128K-token prompt on one CPU core).

Needle `i` goes after round(depths[i] * n) of the n whole units; needles at the same place keep their list order,
so a chain of variable assignments (RULER's vt) stays in order when its depths are sorted.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError
from prolong_lit.evals import prompts


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python versions."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def length_tolerance(length: int) -> int:
    """How far (in tokens) below its budget a fitted prompt may end: 1%, at least 2 tokens."""
    return max(2, int(0.01 * length))


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens of each text without special tokens (one batched call)."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def text_prefixes(unit: str) -> list[str]:
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


@dataclass
class Layout:
    """Everything needed to render a prompt with n whole haystack units plus a shortened one."""

    units: list[str]  # the haystack stream
    joiner: str
    needles: list[str]  # inserted into the stream
    depths: list[float]  # where each needle goes, 0.0 (start) .. 1.0 (end), one per needle
    render: Callable[[str], str]  # context -> full prompt
    partials: Callable[[int], list[str]]  # shortened versions of unit i, shortest first
    open: str = ""
    close: str = ""

    def context(self, n: int, partial: str | None) -> str:
        at = [round(d * n) for d in self.depths]
        order = sorted(range(len(self.needles)), key=lambda i: (at[i], i))
        parts: list[str] = []
        start = 0
        for i in order:
            parts += self.units[start : at[i]] + [self.needles[i]]
            start = at[i]
        parts += self.units[start:n] + ([partial] if partial else [])
        return self.open + self.joiner.join(parts) + self.close


def stream_size(tokenizer, sample_units: list[str], joiner: str, target: int) -> int:
    """How many units of the sample's average cost make `target` tokens, with a 25% margin."""
    per_unit = max(1.0, sum(count_tokens(tokenizer, [joiner + u for u in sample_units])) / len(sample_units))
    return int(target / per_unit * 1.25) + 16


def _partials(layout: Layout, tokenizer, n: int, cache: dict) -> tuple[list[str], list[int]]:
    """The shortened versions of unit n ("" first) with their token costs, measured once."""
    if n not in cache:
        candidates = [""] + layout.partials(n)
        cache[n] = (candidates, [0] + count_tokens(tokenizer, [layout.joiner + c for c in candidates[1:]]))
    return cache[n]


def fit_layout(fmt: prompts.PromptFormat, layout: Layout, budget: int, what: str) -> tuple[str, list[int], str]:
    """Choose the number of units and the shortened last unit so the prompt (in format `fmt`: completion or chat)
    has at most `budget` tokens (as close as the units allow). Returns (prompt, input_ids, context)."""
    tokenizer = fmt.tokenizer
    base = len(fmt.encode(layout.render(layout.context(0, None))))
    if base > budget:
        raise ConfigError(
            f"{what}: the prompt without any haystack has {base} tokens, more than its budget of {budget}; use a "
            f"length of at least {base} plus the task's generation length"
        )
    unique = list(dict.fromkeys(layout.units))  # noise/essay streams repeat a few strings
    cost_of = dict(zip(unique, count_tokens(tokenizer, [layout.joiner + u for u in unique])))
    cum = [0]
    for unit in layout.units:
        cum.append(cum[-1] + cost_of[unit])
    if base + cum[-1] < budget:
        raise RuntimeError(f"{what}: the haystack stream is too short for {budget} tokens (a bug)")
    # Seams merge tokens (".\n" is one token), so the sum of unit costs is off by a roughly constant factor:
    # measure the whole prompt, rescale the unit costs, choose again; then step down until it fits.
    scale, best, cache = 1.0, None, {}
    tried: set = set()
    for _ in range(20):
        n = bisect.bisect_right(cum, (budget - base) / scale) - 1
        n = max(0, min(n, len(layout.units) - 1))
        candidates, costs = _partials(layout, tokenizer, n, cache)
        rest = budget - base - scale * cum[n]
        pick = max((i for i in range(len(candidates)) if costs[i] <= rest), key=lambda i: costs[i], default=0)
        while (n, pick) in tried and (n, pick) != (0, 0):  # measured already: one step smaller
            if pick > 0:
                pick -= 1
            else:
                n = n - 1
                candidates, costs = _partials(layout, tokenizer, n, cache)
                pick = len(candidates) - 1
        tried.add((n, pick))
        context = layout.context(n, candidates[pick] or None)
        prompt = layout.render(context)
        ids = fmt.encode(prompt)
        if len(ids) <= budget and (best is None or len(ids) > len(best[1])):
            best = (prompt, ids, context)
        if best is not None and budget - len(best[1]) <= 1:
            break
        if cum[n] > 0:
            scale = max(0.5, (len(ids) - base - costs[pick]) / cum[n])
            if len(ids) > budget:
                scale *= 1.0 + (len(ids) - budget) / max(1, cum[n])
    if best is None or budget - len(best[1]) > length_tolerance(budget):
        got = "nothing within it" if best is None else f"{len(best[1])} tokens"
        raise RuntimeError(f"{what}: could not fit the prompt to {budget} tokens (got {got})")
    return best
