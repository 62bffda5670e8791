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
| `rougeL_f1`             | ROUGE-L F1 (`rouge-score`, Porter stemmer), best over golds and raw/parsed  | InfBench QA |
| `rougeLsum_f1`          | ROUGE-Lsum F1 (lines are the summary-level units), same                     | (summaries) |
| `choice_accuracy`       | exact match of the letter, or "B. option text" found in the output          | InfBench MC |
| `str_em`                | share of ASQA's sub-questions with a short answer in the output             | ALCE ASQA   |
| `qampari_rec_top5`      | answers found among the comma-separated predictions, out of min(5, #gold)   | ALCE QAMPARI|

HELMET scores NarrativeQA and the summaries with a GPT-4o judge, which cannot run offline: their scores here are
HELMET's automatic metrics (ROUGE-L F1 for NarrativeQA, ROUGE-Lsum F1 for the summaries), and every text task
also records HELMET's whole automatic set per example (`details`: exact_match, f1, substring_exact_match,
rougeL/rougeLsum F1 and recall), as its `calculate_metrics` does. ALCE's details are its `eval_alce.py` scores
(str_em, str_hit, the QAMPARI precision/recall/F1 family) plus citation recall/precision, which need an NLI
model (`nli`); without one they are None, "not computed", never 0.

NDCG is computed here (pytrec_eval is not a dependency) the way trec_eval's `ndcg_cut` does: gain = the qrel
label (not 2^label - 1), discount 1 / log2(rank + 1) with ranks from 1, documents ordered by score descending
(ties by document id descending, as trec_eval), ideal DCG from the positive qrel labels sorted descending, and
0 when a query has no relevant document.

The `Metric` classes keep two states, a score sum and a count, both reduced with `dist_reduce_fx="sum"`, so
`compute()` gives the mean over every example seen on every rank.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torchmetrics import Metric

from prolong_lit.errors import ConfigError, DataError
from prolong_lit.evals.normalize import normalize_answer, parse_output, parse_rankings

Answers = str | Sequence[str]


def _as_list(answers: Answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    flat: list[str] = []
    for answer in answers:  # HELMET allows a list of lists of aliases
        flat.extend([answer] if isinstance(answer, str) else list(answer))
    if not flat:
        raise DataError("an example has no gold answer")
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


_ROUGE_SCORER = None


def rouge_scores(prediction: str, gold: str) -> dict[str, float]:
    """ROUGE-L and ROUGE-Lsum F1 and recall of `prediction` against `gold`, with `rouge-score`'s RougeScorer
    (Porter stemmer on), as HELMET's `calculate_metrics` builds it."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    scores = _ROUGE_SCORER.score(target=gold, prediction=prediction)
    out = {}
    for kind in ("rougeL", "rougeLsum"):
        out[f"{kind}_f1"], out[f"{kind}_recall"] = scores[kind].fmeasure, scores[kind].recall
    return out


def text_metrics(prediction: str, answers: Answers) -> dict[str, float]:
    """HELMET's `calculate_metrics`: EM, F1, substring EM and the ROUGE scores, each the max over the answers."""
    golds = _as_list(answers)
    out = {
        "exact_match": max(exact_match(prediction, g) for g in golds),
        "f1": max(token_f1(prediction, g) for g in golds),
        "substring_exact_match": max(substring_exact_match(prediction, g) for g in golds),
    }
    rouges = [rouge_scores(prediction, g) for g in golds]
    out.update({key: max(r[key] for r in rouges) for key in rouges[0]})
    return out


def best_text_metrics(output: str, answers: Answers, answer_prefix: str) -> dict[str, float]:
    """`text_metrics` of the raw and of the parsed output, the better of the two for each metric (HELMET)."""
    scores = text_metrics(output, answers)
    parsed = parse_output(output, answer_prefix)
    if parsed is not None:
        scores = {k: max(v, w) for (k, v), w in zip(scores.items(), text_metrics(parsed, answers).values())}
    return scores


def choice_accuracy(output: str, answers: Answers, answer_prefix: str = "Answer:") -> float:
    """InfBench multiple choice; `answers` = [letter, "letter. option text"] as HELMET builds them: exact match of
    the raw or parsed output with either, or the "letter. option text" form anywhere in the output (any case)."""
    golds = _as_list(answers)
    if len(golds) > 1 and golds[1].lower() in output.lower():
        return 1.0
    return best_over(exact_match, output, golds, answer_prefix)


def remove_citations(text: str) -> str:
    """ALCE's citation stripping: `[3]` markers (and a space before them) and ` |` separators go."""
    return re.sub(r"\[\d+", "", re.sub(r" \[\d+", "", text)).replace(" |", "").replace("]", "")


def alce_output(output: str) -> str:
    """The output ALCE scores: newlines become spaces, a stray `<|im_end|>` goes (eval_alce.py)."""
    return re.sub(r"\n+", " ", output).replace("<|im_end|>", "")


def str_em(output: str, qa_pairs: Sequence[Sequence[str]]) -> tuple[float, float]:
    """ASQA's STR-EM and STR-HIT: the share of sub-questions one of whose short answers occurs (normalized) in the
    citation-free output, and whether all do."""
    text = normalize_answer(remove_citations(alce_output(output)))
    found = [any(normalize_answer(a) in text for a in answers) for answers in qa_pairs]
    share = sum(found) / len(found) if found else 0.0
    return share, float(share == 1.0)


def qampari_scores(output: str, answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """QAMPARI's list scores: predictions are the comma-separated items of the citation-free output (a final
    period or comma dropped), each gold answer a list of aliases matched exactly after normalisation."""
    text = remove_citations(alce_output(output))
    preds = [normalize_answer(x.strip()) for x in text.rstrip().rstrip(".").rstrip(",").split(",")]
    preds = [p for p in preds if p]
    golds = [[normalize_answer(alias) for alias in aliases] for aliases in answers]
    flat = [alias for aliases in golds for alias in aliases]
    hits = sum(any(alias in preds for alias in aliases) for aliases in golds)
    prec = sum(p in flat for p in preds) / len(preds) if preds else 0.0
    rec = hits / len(golds)
    rec5 = min(5, hits) / min(5, len(golds))

    def f1(p: float, r: float) -> float:
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    return {
        "num_preds": float(len(preds)),
        "qampari_prec": prec,
        "qampari_rec": rec,
        "qampari_rec_top5": rec5,
        "qampari_f1": f1(prec, rec),
        "qampari_f1_top5": f1(prec, rec5),
    }


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

    def details(self, output: str, target, meta: Mapping | None = None) -> dict[str, float | None]:
        """Every metric HELMET computes for this example besides the score (`{}` where it computes no other);
        None marks a metric that could not be computed here."""
        return {}

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


class RougeLF1(AverageScore):
    """ROUGE-L F1, best over the answers and the raw/parsed output; `details` is HELMET's whole text set."""

    key = "rougeL_f1"
    _last: tuple | None = None  # (output, id(target), scores): the runner asks score_one, then details

    def _scores(self, output: str, target: Answers) -> dict[str, float]:
        if self._last is None or self._last[:2] != (output, id(target)):
            self._last = (output, id(target), best_text_metrics(output, target, self.answer_prefix))
        return self._last[2]

    def score_one(self, output: str, target: Answers) -> float:
        return self._scores(output, target)[self.key]

    def details(self, output: str, target: Answers, meta: Mapping | None = None) -> dict[str, float | None]:
        return dict(self._scores(output, target))


class RougeLsumF1(RougeLF1):
    key = "rougeLsum_f1"


class ChoiceAccuracy(AverageScore):
    def score_one(self, output: str, target: Answers) -> float:
        return choice_accuracy(output, target, self.answer_prefix)

    def details(self, output: str, target: Answers, meta: Mapping | None = None) -> dict[str, float | None]:
        return dict(best_text_metrics(output, target, self.answer_prefix))


class AlceScore(AverageScore):
    """ALCE correctness (ASQA: `str_em`; QAMPARI: `qampari_rec_top5`) of the output, plus in `details` the other
    eval_alce.py scores and the citation recall/precision, judged by `nli` (an `nli.NLIModel`, or any callable
    (premise, claim) -> bool) on the example's documents (`meta["docs"]`); None without one."""

    qampari = False

    def __init__(self, answer_prefix: str = "Answer:", nli=None, **kwargs):
        """
        Args:
            answer_prefix: the completion prefix (ALCE scores the output as it is).
            nli: the entailment judge of the citation scores; None: they are reported as not computed.
            kwargs: passed to `torchmetrics.Metric`.
        """
        super().__init__(answer_prefix=answer_prefix, **kwargs)
        self.nli = nli

    def score_one(self, output: str, target) -> float:
        if self.qampari:
            return qampari_scores(output, target)["qampari_rec_top5"]
        return str_em(output, target)[0]

    def details(self, output: str, target, meta: Mapping | None = None) -> dict[str, float | None]:
        from prolong_lit.evals.nli import citation_scores

        em, hit = str_em(output, target) if not self.qampari else (0.0, 0.0)  # eval_alce: 0 without qa_pairs
        out: dict[str, float | None] = {"str_em": em, "str_hit": hit}
        if self.qampari:
            out.update(qampari_scores(output, target))
        if self.nli is None or meta is None or "docs" not in meta:
            out.update(citation_rec=None, citation_prec=None)
        else:
            cites = citation_scores(output, meta["docs"], meta.get("question", ""), self.qampari, self.nli)
            if cites is not None:  # an output with no sentence is left out of the citation means (eval_alce)
                out.update(cites)
        return out


class QampariRecTop5(AlceScore):
    qampari = True


METRICS: dict[str, type[AverageScore]] = {
    "exact_match": ExactMatch,
    "substring_exact_match": SubstringExactMatch,
    "f1": TokenF1,
    "ruler_recall": RulerRecall,
    "accuracy": Accuracy,
    "ndcg@10": NDCG,
    "rougeL_f1": RougeLF1,
    "rougeLsum_f1": RougeLsumF1,
    "choice_accuracy": ChoiceAccuracy,
    "str_em": AlceScore,
    "qampari_rec_top5": QampariRecTop5,
}


# HELMET's GPT-4o judge scores these (its collect_results column); offline they report their automatic metric.
GPT4O_JUDGED = {"narrativeqa": "gpt-4-score", "infbench_sum_eng": "gpt-4-f1", "multi_lexsum": "gpt-4-f1"}


def offline_notes(task_metrics: Mapping[str, str], metric_scores: Mapping[str, Mapping]) -> list[str]:
    """One line per way the scores of these tasks differ from HELMET's published ones, for a report."""
    notes = [
        f"{task}: HELMET's GPT-4o judge ({GPT4O_JUDGED[task]}) cannot run offline; the score is {metric}"
        for task, metric in task_metrics.items()
        if task in GPT4O_JUDGED
    ]
    for task, by_metric in metric_scores.items():
        if any(v is None for v in by_metric.get("citation_rec", {}).values()):
            notes.append(f"{task}: citation recall/precision not computed (no NLI model; set nli_model_dir)")
    return notes


def build_metric(name: str, answer_prefix: str, nli=None, **kwargs) -> AverageScore:
    """A fresh metric by name (see `METRICS`); `nli` goes to the ALCE metrics (citation scores), `kwargs` to
    `torchmetrics.Metric`."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    if issubclass(METRICS[name], AlceScore):
        kwargs["nli"] = nli
    return METRICS[name](answer_prefix=answer_prefix, **kwargs)
