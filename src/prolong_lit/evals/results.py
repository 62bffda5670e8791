"""The data the evaluation passes around: one prompt (`EvalExample`) and the outcome of a run (`EvalResults`).

Categories follow HELMET's `collect_results` (`categories`): only complete categories have scores.

Scores in `EvalResults` are on HELMET's 0-100 scale (the torchmetrics `Metric`s compute fractions in [0, 1]).

`EvalResults.to_dict()` is the JSON file the report writer saves (`eval_results.json`):

    {
      "scores":       {"<task>": {"<length>": score}},              # 0-100
      "depth_scores": {"<task>": {"<length>": {"<depth>": score}}}, # tasks whose examples carry a depth
      "categories":   {"<category>": score},                        # HELMET category, mean over the lengths
      "category_scores": {"<category>": {"<length>": score}},       # HELMET category per length (`categories`)
      "incomplete_categories": {"<category>": ["<missing slot>"]},  # categories some of whose tasks did not run
      "metric_scores": {"<task>": {"<metric>": {"<length>": score}}},  # metrics besides a task's main one
      "task_categories": {"<task>": "<category>"},
      "task_metrics": {"<task>": "<metric name>"},
      "num_examples": {"<task>": {"<length>": n}},
      "generation":   {"prompt_tokens": ..., "generated_tokens": ..., "prefill_seconds": ..., "decode_seconds": ...,
                       "use_cache": bool},
      "config":       {"seed": ..., "lengths": [...], "depths": [...], "samples_per_task": ..., ...},
      "records":      [{"task", "length", "index", "depth", "output", "score", "target"}, ...]
    }
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

Target = list[str] | dict[str, int]


@dataclass
class EvalExample:
    """One evaluation prompt, already tokenized for the model."""

    task: str
    length: int
    index: int
    prompt: str
    input_ids: list[int]  # the prompt's tokens, BOS included when the tokenizer adds one
    target: Target  # gold answers, or the qrels (doc id -> label) of a re-ranking query
    depth: float | None = None  # where the gold sits in the context, 0.0 (start) .. 1.0 (end), if known
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResults:
    """What `run_evaluation` returns; every rank gets the same object."""

    scores: dict[str, dict[int, float]]
    depth_scores: dict[str, dict[int, dict[float, float]]]
    categories: dict[str, float]
    task_categories: dict[str, str]
    task_metrics: dict[str, str]
    num_examples: dict[str, dict[int, int]]
    generation: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    category_scores: dict[str, dict[int, float]] = field(default_factory=dict)
    incomplete_categories: dict[str, list[str]] = field(default_factory=dict)
    metric_scores: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def flat(self, prefix: str = "eval") -> dict[str, float]:
        """Scalars for a logger: `{prefix}/<task>@<length>`, `{prefix}/category/<category>@<length>` and
        `{prefix}/category/<category>` (the mean over the lengths); NaN scores and incomplete categories left out."""
        out: dict[str, float] = {}
        for task, by_length in self.scores.items():
            for length, score in sorted(by_length.items()):
                if not math.isnan(score):
                    out[f"{prefix}/{task}@{length}"] = float(score)
        for category, by_length in self.category_scores.items():
            for length, score in sorted(by_length.items()):
                if not math.isnan(score):
                    out[f"{prefix}/category/{category}@{length}"] = float(score)
        for category, score in self.categories.items():
            if not math.isnan(score):
                out[f"{prefix}/category/{category}"] = float(score)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = {t: {str(k): v for k, v in d.items()} for t, d in self.scores.items()}
        data["num_examples"] = {t: {str(k): v for k, v in d.items()} for t, d in self.num_examples.items()}
        data["category_scores"] = {c: {str(k): v for k, v in d.items()} for c, d in self.category_scores.items()}
        data["metric_scores"] = {
            t: {m: {str(k): v for k, v in d.items()} for m, d in by_metric.items()}
            for t, by_metric in self.metric_scores.items()
        }
        data["depth_scores"] = {
            t: {str(length): {str(depth): s for depth, s in by_depth.items()} for length, by_depth in d.items()}
            for t, d in self.depth_scores.items()
        }
        return data

    @staticmethod
    def _score(value) -> float:
        return float("nan") if value is None else float(value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        """Inverse of `to_dict` (JSON turns the int/float keys into strings)."""
        return cls(
            scores={t: {int(k): cls._score(v) for k, v in d.items()} for t, d in data["scores"].items()},
            depth_scores={
                t: {
                    int(length): {float(depth): cls._score(s) for depth, s in by_depth.items()}
                    for length, by_depth in d.items()
                }
                for t, d in data.get("depth_scores", {}).items()
            },
            categories={c: cls._score(v) for c, v in data["categories"].items()},
            task_categories=dict(data["task_categories"]),
            task_metrics=dict(data["task_metrics"]),
            num_examples={t: {int(k): v for k, v in d.items()} for t, d in data["num_examples"].items()},
            generation=dict(data.get("generation", {})),
            config=dict(data.get("config", {})),
            records=list(data.get("records", [])),
            category_scores={
                c: {int(k): cls._score(v) for k, v in d.items()} for c, d in data.get("category_scores", {}).items()
            },
            incomplete_categories={c: list(v) for c, v in data.get("incomplete_categories", {}).items()},
            metric_scores={
                t: {m: {int(k): cls._score(v) for k, v in d.items()} for m, d in by_metric.items()}
                for t, by_metric in data.get("metric_scores", {}).items()
            },
        )
