"""HELMET's category scores, as its `scripts/collect_results.py` defines them (`custom_avgs`).

A category at a length is the plain mean of its slots' scores at that length (HELMET's pandas `mean(axis=1)` over
the metric columns of one `input_max_length` row). A slot is one of HELMET's `"<dataset> <metric>"` columns; the
project tasks listed for it fill it (the first one evaluated wins: generated `json_kv` or HELMET's file
`helmet_json_kv`, a generated RULER task or its `helmet_ruler_` file twin):

| category | slots (HELMET's columns)                                                                              |
|----------|--------------------------------------------------------------------------------------------------------|
| recall   | json_kv, ruler_niah_mk_2, ruler_niah_mk_3, ruler_niah_mv                                                |
| rag      | nq, hotpotqa, popqa, triviaqa (`kilt_nq`, `kilt_hotpotqa`, `kilt_popqa_3`, `kilt_triviaqa`)             |
| icl      | trec_coarse, trec_fine, banking77, clinic150, nlu (`icl_*`)                                            |
| cite     | alce_asqa str_em, citation_rec, citation_prec; alce_qampari qampari_rec_top5, citation_rec, citation_prec |
| rerank   | msmarco_rerank_psg NDCG@10                                                                             |
| longqa   | narrativeqa, infbench_qa (`infbench_qa_eng`), infbench_choice (`infbench_choice_eng`)                  |
| summ     | infbench_sum (`infbench_sum_eng`), multi_lexsum                                                         |
| ruler    | the 13 RULER tasks (HELMET's commented-out "RULER" average; not part of `helmet`)                       |
| helmet   | the mean of recall, rag, icl, cite, rerank, longqa, summ (HELMET's "Ours")                               |

A slot's score is the task's main score (`EvalResults.scores`), or, for a metric other than the task's main one
(ALCE's citation recall/precision), `EvalResults.metric_scores[task][metric]`. LongQA and Summ use HELMET's GPT-4o
judge for narrativeqa and the summaries, which cannot run offline: their slots take the task's automatic metric.

Incomplete categories. pandas' mean skips missing columns, so HELMET silently averages a category over the tasks
it found. Here a category is computed at a length only when every slot has a score there (a NaN, e.g. citation
recall without an NLI model, counts as missing); otherwise it is reported as incomplete with its missing slots,
and it has no scalar. A category's average is the mean over the evaluated lengths, only when complete at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One of HELMET's metric columns: its name, the tasks that can fill it, and the metric (None: main score)."""

    name: str
    tasks: tuple[str, ...]
    metric: str | None = None


def _ruler(name: str) -> Slot:
    return Slot(name, (name, f"helmet_{name}"))


def _one(name: str, task: str | None = None) -> Slot:
    return Slot(name, (task or name,))


CATEGORIES: dict[str, tuple[Slot, ...]] = {
    "recall": (
        Slot("json_kv", ("json_kv", "helmet_json_kv")),
        _ruler("ruler_niah_mk_2"),
        _ruler("ruler_niah_mk_3"),
        _ruler("ruler_niah_mv"),
    ),
    "rag": (_one("nq", "kilt_nq"), _one("hotpotqa", "kilt_hotpotqa"), _one("popqa", "kilt_popqa_3"),
            _one("triviaqa", "kilt_triviaqa")),
    "icl": tuple(_one(n, f"icl_{n}") for n in ("trec_coarse", "trec_fine", "banking77", "clinic150", "nlu")),
    "cite": tuple(
        Slot(f"{task} {metric}", (task,), metric)
        for task, metrics in (
            ("alce_asqa", ("str_em", "citation_rec", "citation_prec")),
            ("alce_qampari", ("qampari_rec_top5", "citation_rec", "citation_prec")),
        )
        for metric in metrics
    ),
    "rerank": (_one("msmarco_rerank_psg"),),
    "longqa": (_one("narrativeqa"), _one("infbench_qa", "infbench_qa_eng"),
               _one("infbench_choice", "infbench_choice_eng")),
    "summ": (_one("infbench_sum", "infbench_sum_eng"), _one("multi_lexsum")),
    "ruler": (
        *(_ruler(f"ruler_niah_{n}") for n in ("s_1", "s_2", "s_3", "mk_1", "mk_2", "mk_3", "mq", "mv")),
        *(_ruler(f"ruler_{n}") for n in ("cwe", "fwe", "vt")),
        _one("ruler_qa_1"),
        _one("ruler_qa_2"),
    ),
}
HELMET_AVERAGE = ("recall", "rag", "icl", "cite", "rerank", "longqa", "summ")  # HELMET's "Ours"
ORDER = (*CATEGORIES, "helmet")


def category_of_tasks(category: str) -> set[str]:
    """Every task that can fill a slot of `category`."""
    return {t for slot in CATEGORIES[category] for t in slot.tasks}


def _slot_score(slot: Slot, length: int, scores, metric_scores, task_metrics) -> float | None:
    for task in slot.tasks:
        if slot.metric is None or task_metrics.get(task) == slot.metric:
            value = scores.get(task, {}).get(length)
        else:
            value = metric_scores.get(task, {}).get(slot.metric, {}).get(length)
        if value is not None and not math.isnan(value):
            return float(value)
    return None


@dataclass
class CategoryScores:
    """What `aggregate` returns: complete categories per length and on average, and what the others lack."""

    by_length: dict[str, dict[int, float]]  # category -> length -> score, complete (category, length) only
    average: dict[str, float]  # category -> mean over the lengths, categories complete at every length only
    missing: dict[str, list[str]]  # category -> its slots without a score at some length (incomplete ones)


def aggregate(
    scores: Mapping[str, Mapping[int, float]],
    task_metrics: Mapping[str, str],
    metric_scores: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
) -> CategoryScores:
    """HELMET's category table from task@length scores (0-100). Only categories with at least one of their tasks
    evaluated appear; `helmet` appears once any of its categories does."""
    metric_scores = metric_scores or {}
    lengths = sorted({n for by_length in scores.values() for n in by_length})
    evaluated = set(scores) | set(metric_scores)
    by_length: dict[str, dict[int, float]] = {}
    missing: dict[str, list[str]] = {}
    for category, slots in CATEGORIES.items():
        if not category_of_tasks(category) & evaluated:
            continue
        found = {n: [_slot_score(s, n, scores, metric_scores, task_metrics) for s in slots] for n in lengths}
        complete = {n: sum(v) / len(v) for n, v in found.items() if all(x is not None for x in v)}
        by_length[category] = complete
        gaps = [s.name for i, s in enumerate(slots) if any(found[n][i] is None for n in lengths)]
        if gaps:
            missing[category] = gaps
    if any(c in by_length for c in HELMET_AVERAGE):
        by_length["helmet"] = {
            n: sum(by_length[c][n] for c in HELMET_AVERAGE) / len(HELMET_AVERAGE)
            for n in lengths
            if all(n in by_length.get(c, {}) for c in HELMET_AVERAGE)
        }
        gaps = [c for c in HELMET_AVERAGE if c not in by_length or c in missing]
        if gaps:
            missing["helmet"] = gaps
    average = {
        c: sum(v.values()) / len(v) for c, v in by_length.items() if c not in missing and len(v) == len(lengths) and v
    }
    by_length = {c: v for c, v in by_length.items() if v}
    return CategoryScores(by_length, average, missing)


# HELMET's lengths (its *_short.yaml configs: 8K-64K; the main configs: 128K) and sample counts (100; ICL 500).
HELMET_LENGTHS = (8192, 16384, 32768, 65536, 131072)
HELMET_SAMPLES = 100
HELMET_ICL_SAMPLES = 500


def helmet_preset() -> dict:
    """EvalSettings fields of HELMET's suite: a task per slot of the seven categories that is registered (the file
    version where both exist: `helmet_json_kv`, `helmet_ruler_niah_mk_2`...), its lengths and sample counts."""
    from prolong_lit.evals.registry import TASKS  # late: the registry imports the task modules

    tasks: list[str] = []
    for category in HELMET_AVERAGE:
        for slot in CATEGORIES[category]:
            ranked = sorted(slot.tasks, key=lambda t: not t.startswith("helmet_"))
            pick = next((t for t in ranked if t in TASKS), None)
            if pick is not None and pick not in tasks:
                tasks.append(pick)
    return {
        "tasks": tasks,
        "lengths": list(HELMET_LENGTHS),
        "samples_per_task": HELMET_SAMPLES,
        "task_samples": {t: HELMET_ICL_SAMPLES for t in tasks if TASKS[t].category == "icl"},
    }


PRESETS = {"helmet": helmet_preset}
