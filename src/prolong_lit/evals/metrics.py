"""Scores of generated answers: HELMET's metrics as pure functions and as torchmetrics `Metric`s.

Per-example scores are in [0, 1]. Text metrics take the best score over the gold answers and over the raw vs the
parsed output (`normalize.parse_output`: the first line after the answer prefix), as HELMET's `post_process`
does:

| name                    | per example                                                                 | HELMET use  |
|-------------------------|-----------------------------------------------------------------------------|-------------|
| `exact_match`           | normalized output == normalized gold                                        | -           |
| `substring_exact_match` | normalized gold is a substring of the normalized output                     | JSON KV, RAG|
| `f1`                    | SQuAD token F1 on normalized text                                           | -           |
| `ruler_recall`          | fraction of gold values found in the output (case-insensitive substring)    | RULER NIAH  |
| `accuracy`              | exact match of the PARSED output only (no raw fallback, as HELMET's ICL)    | ICL         |
| `ndcg@10`               | NDCG@10 of the ranking parsed from `ID > ID > ...` against graded qrels     | MS MARCO    |

NDCG is computed here (pytrec_eval is not a dependency) the way trec_eval's `ndcg_cut` does: gain = the qrel
label (not 2^label - 1), discount 1 / log2(rank + 1) with ranks from 1, documents ordered by score descending
(ties by document id descending, as trec_eval), ideal DCG from the positive qrel labels sorted descending, and
0 when a query has no relevant document.

The `Metric` classes keep two states, a score sum and a count, both reduced with `dist_reduce_fx="sum"`, so
`compute()` gives the mean over every example seen on every rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torchmetrics import Metric

from prolong_lit.evals.normalize import normalize_answer, parse_output, parse_rankings

Answers = str | Sequence[str]


def _as_list(answers: Answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    flat: list[str] = []
    for answer in answers:  # HELMET allows a list of lists of aliases
        flat.extend([answer] if isinstance(answer, str) else list(answer))
    if not flat:
        raise ValueError("an example has no gold answer")
    return flat


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def substring_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(gold) in normalize_answer(prediction))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1; yes/no/noanswer must match exactly (HELMET's rule)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def ruler_recall(prediction: str, answers: Answers) -> float:
    """Fraction of the gold values that occur in the prediction, case-insensitive (RULER's string_match_all)."""
    golds = _as_list(answers)
    lowered = prediction.lower()
    return sum(gold.lower() in lowered for gold in golds) / len(golds)


def best_over(metric_fn: Callable[[str, str], float], output: str, answers: Answers, answer_prefix: str) -> float:
    """HELMET's score: the max over gold answers and over the raw and the parsed output."""
    candidates = [output]
    parsed = parse_output(output, answer_prefix)
    if parsed is not None:
        candidates.append(parsed)
    return max(metric_fn(candidate, gold) for candidate in candidates for gold in _as_list(answers))


def ndcg_at_k(scores: Mapping[str, float], qrels: Mapping[str, int], k: int = 10) -> float:
    """trec_eval's ndcg_cut.k for one query: `scores` = the system's doc id -> score, `qrels` = doc id -> label."""
    ranked = sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True)[:k]
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
    ideal = sorted((label for label in qrels.values() if label > 0), reverse=True)[:k]
    idcg = sum(label / math.log2(rank + 2) for rank, label in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


class AverageScore(Metric):
    """Mean of a per-example score in [0, 1]; subclasses define `score_one(output, target)`.

    States: `score_sum` (float64) and `count` (int64), both summed across ranks on `compute()`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, answer_prefix: str = "Answer:", **kwargs):
        """
        Args:
            answer_prefix: the completion prefix the prompt ends with ("Answer:", "Corresponding value:"); the
                parsed output is what follows it if the model repeats it, else the first line.
            kwargs: passed to `torchmetrics.Metric` (e.g. `sync_on_compute=False` when only one rank evaluates).
        """
        super().__init__(**kwargs)
        self.answer_prefix = answer_prefix
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score_one(self, output: str, target) -> float:
        raise NotImplementedError

    def update(self, outputs: Sequence[str], targets: Sequence) -> None:
        if len(outputs) != len(targets):
            raise ValueError(f"{type(self).__name__}: {len(outputs)} outputs but {len(targets)} targets")
        total = sum(self.score_one(output, target) for output, target in zip(outputs, targets))
        self.score_sum += total
        self.count += len(outputs)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.count


class ExactMatch(AverageScore):
    def score_one(self, output: str, target: Answers) -> float:
        return best_over(exact_match, output, target, self.answer_prefix)


class SubstringExactMatch(AverageScore):
    def score_one(self, output: str, target: Answers) -> float:
        return best_over(substring_exact_match, output, target, self.answer_prefix)


class TokenF1(AverageScore):
    def score_one(self, output: str, target: Answers) -> float:
        return best_over(token_f1, output, target, self.answer_prefix)


class RulerRecall(AverageScore):
    def score_one(self, output: str, target: Answers) -> float:
        return ruler_recall(output, target)  # the raw output; the parsed one is a substring of it


class Accuracy(AverageScore):
    """Exact match of the parsed label only, as HELMET scores its ICL tasks."""

    def score_one(self, output: str, target: Answers) -> float:
        parsed = parse_output(output, self.answer_prefix) or ""
        return max(exact_match(parsed, gold) for gold in _as_list(target))


class NDCG(AverageScore):
    """NDCG@k of the ranking parsed from the output; the target is the qrels dict doc id -> graded label."""

    def __init__(self, k: int = 10, answer_prefix: str = "Ranking:", **kwargs):
        """
        Args:
            k: rank cut-off (HELMET reports NDCG@10).
            answer_prefix: the completion prefix (unused by the ranking parser, kept for a uniform signature).
            kwargs: passed to `torchmetrics.Metric`.
        """
        super().__init__(answer_prefix=answer_prefix, **kwargs)
        self.k = k

    def score_one(self, output: str, target: Mapping[str, int]) -> float:
        return ndcg_at_k(parse_rankings(output), target, self.k)


METRICS: dict[str, type[AverageScore]] = {
    "exact_match": ExactMatch,
    "substring_exact_match": SubstringExactMatch,
    "f1": TokenF1,
    "ruler_recall": RulerRecall,
    "accuracy": Accuracy,
    "ndcg@10": NDCG,
}


def build_metric(name: str, answer_prefix: str, **kwargs) -> AverageScore:
    """A fresh metric by name (see `METRICS`); `kwargs` go to `torchmetrics.Metric`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name](answer_prefix=answer_prefix, **kwargs)
