"""Answer normalisation and output parsing, as HELMET does it (its `utils.py`, itself from DensePhrases/SQuAD).

- `normalize_answer`: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.
- `parse_output`: the text after the answer prefix (if the model repeated it) on the first line, else the first
  line; HELMET scores both the raw and the parsed output and keeps the better score.
- `parse_rankings`: a re-ranking output such as `ID3 > ID1 > [ID: 2]` becomes `{"3": 3, "1": 2, "2": 1}`, each
  parsed id scored n - rank (HELMET's convention, so that a higher score means ranked earlier).
"""

from __future__ import annotations

import re
import string

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def parse_output(output: str, prefix: str = "Answer:") -> str | None:
    """The answer HELMET reads from a generation: after `prefix` if present, else the first line.

    A model that repeats the prefix ("Answer: Paris") gets the prefix stripped, case-insensitively; a chat
    model that repeats it twice gets both stripped. Returns None only if nothing matches (never in practice).
    """
    escaped = re.escape(prefix)
    patterns = (
        re.compile(f"(?:{escaped})(.*)(?:\n|$)", flags=re.IGNORECASE),
        re.compile(r"(?:^)(.*)(?:\n|$)"),
    )
    for pattern in patterns:
        match = pattern.search(output)
        if match is not None:
            answer = match[1].strip()
            return re.sub(f"^{escaped}", "", answer, flags=re.IGNORECASE).strip()
    return None


def parse_rankings(output: str) -> dict[str, int]:
    """Parse `ID3 > ID1 > ID2` (or `[ID: 3] > 1 > ...`) into `{doc_id: n - rank}`.

    The longest `d > d > ...` run of integers wins; a repeated id keeps its first (best) rank. An output with no
    integer at all maps to `{whole_output: 1}`, which matches no document (HELMET does the same).
    """
    cleaned = re.sub(r"[\[\]:]", "", output).lower().replace("id", "")
    longest = ""
    for match in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", cleaned):
        if len(match.group(0)) > len(longest):
            longest = match.group(0)
    if longest:
        ranking = [part.strip() for part in longest.split(">") if part.strip().isdigit()]
    else:
        ranking = [cleaned]
    scores: dict[str, int] = {}
    for rank, doc_id in enumerate(ranking):
        scores.setdefault(doc_id, len(ranking) - rank)
    return scores
