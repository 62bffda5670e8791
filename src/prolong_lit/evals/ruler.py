"""RULER's task table and its aggregation tasks (common / frequent words extraction), generated as RULER does.

Facts from RULER's `scripts/synthetic.yaml` and `scripts/data/synthetic/*.py`; prompts as HELMET's `load_ruler`
formats them (completion style: user text, a newline, the answer prefix; HELMET's wording, which differs from
RULER's constants in small ways, e.g. a newline instead of a space before the fwe context).

| HELMET task        | RULER task      | haystack | keys  | values  | #keys (queried) | #values | HELMET gen len |
|--------------------|-----------------|----------|-------|---------|-----------------|---------|----------------|
| `ruler_niah_s_1`   | niah_single_1   | noise    | words | numbers | 1 (1)           | 1       | 50             |
| `ruler_niah_s_2`   | niah_single_2   | essay    | words | numbers | 1 (1)           | 1       | 50             |
| `ruler_niah_s_3`   | niah_single_3   | essay    | words | uuids   | 1 (1)           | 1       | 50             |
| `ruler_niah_mk_1`  | niah_multikey_1 | essay    | words | numbers | 4 (1)           | 1       | 50             |
| `ruler_niah_mk_2`  | niah_multikey_2 | needles  | words | numbers | 1 (1)           | 1       | 50             |
| `ruler_niah_mk_3`  | niah_multikey_3 | needles  | uuids | uuids   | 1 (1)           | 1       | 100            |
| `ruler_niah_mq`    | niah_multiquery | essay    | words | numbers | 4 (4)           | 1       | 100            |
| `ruler_niah_mv`    | niah_multivalue | essay    | words | numbers | 1 (1)           | 4       | 50             |
| `ruler_vt`         | vt              | noise    | 1 chain of 4 hops, 5-letter variables, one-shot example | 50 |
| `ruler_cwe`        | cwe             | numbered word list: 10 words x 30, the rest x 3; one-shot   | 100 |
| `ruler_fwe`        | fwe             | 6-letter coded words, Zipf(alpha 2) counts, top one is "..."| 50  |

CWE: RULER draws English words (wonderwords' lists); here every word is a pronounceable 3-syllable pseudo-word
(consonant + vowel syllables), so no word is part of another and nothing is downloaded. Below a length of 4096
RULER uses 6 repeats of the common words and 1 of the others (example: 20 words, 3 / 1); from 4096 on 30 / 3
(example: 40 words, 10 / 3). FWE: a vocabulary of (L - generation length) // 50 random 6-letter words, the first
replaced by "..." (noise); word k of the vocabulary occurs int(num_words * k^-2 / zeta(2)) times; the answer is
words 2-4. Both search the word count that fills the budget (RULER searches it once per dataset; here per example,
as the token count of a word list varies between draws, starting from the previous example's count).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from prolong_lit.errors import ConfigError
from prolong_lit.evals import prompts
from prolong_lit.evals.haystack import length_tolerance

VT_USER = (
    "{example}Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the "
    "value {query}, they are:"
)
CWE_USER = (
    "{example}Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_USER = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words.\n{context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
    "are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
QA_USER = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only "
    "give me the answer and do not output any other words.\n\nQuestion: {question}"
)
QA_PREFIX = "Answer:"

# RULER's needle depths: 40 evenly spaced percentages 0..100 (the extra needles draw theirs from these).
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))


@dataclass(frozen=True)
class NeedleTask:
    """One RULER needle variant (RULER's synthetic.yaml arguments)."""

    haystack: str  # "noise" | "essay" | "needles"
    key_type: str  # "words" | "uuids"
    value_type: str  # "numbers" | "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


NIAH_TASKS: dict[str, NeedleTask] = {
    "ruler_niah_s_1": NeedleTask("noise", "words", "numbers"),
    "ruler_niah_s_2": NeedleTask("essay", "words", "numbers"),
    "ruler_niah_s_3": NeedleTask("essay", "words", "uuids"),
    "ruler_niah_mk_1": NeedleTask("essay", "words", "numbers", num_keys=4),
    "ruler_niah_mk_2": NeedleTask("needles", "words", "numbers"),
    "ruler_niah_mk_3": NeedleTask("needles", "uuids", "uuids"),
    "ruler_niah_mq": NeedleTask("essay", "words", "numbers", num_keys=4, num_queries=4),
    "ruler_niah_mv": NeedleTask("essay", "words", "numbers", num_values=4),
}
# HELMET's generation lengths (configs/ruler.yaml, ruler_short.yaml).
GENERATION_LENGTHS = {
    **{name: 50 for name in NIAH_TASKS},
    "ruler_niah_mk_3": 100,
    "ruler_niah_mq": 100,
    "ruler_cwe": 100,
    "ruler_fwe": 50,
    "ruler_vt": 50,
    "ruler_qa_1": 50,
    "ruler_qa_2": 50,
}
AGGREGATION_TASKS = ("ruler_cwe", "ruler_fwe")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct 3-syllable pseudo-words ("kobema"), drawn without replacement."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    size = len(syllables) ** 3
    if count > size:
        raise ConfigError(f"cwe needs {count} distinct words; at most {size} exist (a length beyond any model)")
    out = []
    for index in rng.sample(range(size), count):
        a, rest = divmod(index, len(syllables) ** 2)
        b, c = divmod(rest, len(syllables))
        out.append(syllables[a] + syllables[b] + syllables[c])
    return out


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng: random.Random, num_words: int, common: int, uncommon: int, num_common: int = 10):
    words = pseudo_words(rng, num_words)
    top, rest = words[:num_common], words[num_common:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return _numbered(items), top


def cwe_builder(
    rng: random.Random, length: int, fmt: prompts.PromptFormat
) -> Callable[[int], tuple[str, list[str], str]]:
    """num_words -> (prompt, answers, context) for RULER's cwe at evaluation length `length`."""
    short = length < 4096
    ex_ctx, ex_top = _cwe_list(rng, 20, 3, 1) if short else _cwe_list(rng, 40, 10, 3)
    example = CWE_USER.format(example="", context=ex_ctx) + "\n" + CWE_PREFIX + " " + _numbered(ex_top)
    seed = rng.getrandbits(63)

    def build(num_words: int):
        local = random.Random(seed)  # the same words for every count tried
        context, top = _cwe_list(local, num_words, 6, 1) if short else _cwe_list(local, num_words, 30, 3)
        user = CWE_USER.format(example=example + "\n\n", context=context)
        return fmt.render(user, CWE_PREFIX), top, context

    return build


def fwe_builder(
    rng: random.Random, budget: int, fmt: prompts.PromptFormat
) -> Callable[[int], tuple[str, list[str], str]]:
    """num_words -> (prompt, answers, context) for RULER's fwe with a prompt budget of `budget` tokens."""
    vocab_size = max(8, budget // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    zeta = math.pi**2 / 6  # zeta(2), alpha = 2
    seed = rng.getrandbits(63)

    def build(num_words: int):
        counts = [int(num_words * k**-2.0 / zeta) for k in range(1, len(words) + 1)]
        text = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(seed).shuffle(text)
        context = " ".join(text)
        return fmt.render(FWE_USER.format(context=context), FWE_PREFIX), words[1:4], context

    return build


_COUNT_CACHE: dict[tuple, int] = {}  # (task, budget, tokenizer) -> the last word count found: the next start


def fit_count(
    fmt: prompts.PromptFormat, build: Callable[[int], tuple], budget: int, key: tuple, what: str
) -> tuple[str, list[int], list[str], str]:
    """The largest word count whose prompt fits `budget` tokens (RULER searches it once per dataset; the token
    count of a word list varies between draws, so here it is searched per example): secant steps on the roughly
    affine tokens(count), from the count found for the previous example, until the prompt ends within
    max(1%, 2) tokens below the budget (at most 10 measurements). Returns (prompt, ids, answers, context)."""
    def measure(n: int):
        prompt, answers, context = build(n)
        return prompt, fmt.encode(prompt), answers, context

    tol = length_tolerance(budget)
    n = _COUNT_CACHE.get(key, 100)
    best, points = None, []
    for _ in range(10):
        result = measure(n)
        size = len(result[1])
        if size <= budget and (best is None or size > len(best[1])):
            best, _COUNT_CACHE[key] = result, n
        if best is not None and budget - len(best[1]) <= tol:
            break
        points.append((n, size))
        (n1, s1), (n2, s2) = points[-2] if len(points) > 1 else (0, 0), points[-1]
        slope = (s2 - s1) / (n2 - n1) if n2 != n1 and s2 != s1 else max(1.0, size / max(n, 1))
        step = round((budget - tol / 2 - size) / slope)
        n = max(10, n + (step if step else (-1 if size > budget else 1)))
    while best is None and n > 10:  # never fitted: step down
        n = max(10, n - max(1, n // 16))
        result = measure(n)
        if len(result[1]) <= budget:
            best = result
    if best is None:
        raise ConfigError(f"{what}: even the smallest word list does not fit {budget} tokens; use a larger length")
    return best


def vt_chain(rng: random.Random, letters: int, hops: int = 4) -> tuple[list[str], list[str], str]:
    """One RULER variable chain: (lines in order, variable names, the value)."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return lines, names, value


def vt_prompt(
    context: str, value: str, example: str, hops: int = 4, fmt: prompts.PromptFormat | None = None
) -> str:
    """RULER's vt prompt; without `fmt` a completion prompt (also the form of its one-shot example, which is text
    inside the user turn whatever the format)."""
    user = VT_USER.format(example=example, context=context, query=value)
    prefix = VT_PREFIX.format(num_v=hops + 1, query=value)
    return prompts.completion_prompt(user, prefix) if fmt is None else fmt.render(user, prefix)
