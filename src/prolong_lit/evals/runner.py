"""`run_evaluation`: build the prompts of each task at each length, generate greedily, score, aggregate.

Order of work: (1) every check (task names, lengths vs max_position_embeddings, depths, HELMET files present, every
line of every HELMET file well-formed); (2) per task and length, this rank builds its slice of the examples
(example i on rank i mod W), generates and scores them; (3) the per-example records are gathered on every rank and
turned into per-depth scores and category averages. Torchmetrics states give the task@length scores, reduced
over ranks.

Every prompt, generated or read, has at most L - (the task's generation length) tokens, HELMET's input budget.
Category scores follow HELMET's `collect_results` (`categories.aggregate`; incomplete categories get none).

Synthetic tasks have `samples_per_task` examples per task@length, the depths taken in turn (example i has depth
depths[i % len(depths)]). HELMET tasks sample as HELMET does (see `helmet`).

Under several ranks every rank must call this with the same arguments (`distributed=None` detects it); a caller
that evaluates on one rank only passes `distributed=False`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import categories, registry
from prolong_lit.evals import distributed as ev_dist
from prolong_lit.evals.generation import GenerationStats, greedy_generate, stop_token_ids
from prolong_lit.evals.helmet import HelmetData, HelmetTaskData, build_helmet_example, load_helmet_task
from prolong_lit.evals.metrics import build_metric
from prolong_lit.evals.results import EvalExample, EvalResults
from prolong_lit.evals.settings import EvalSettings
from prolong_lit.evals.synthetic import build_synthetic_example

log = logging.getLogger(__name__)


def _build(
    spec: registry.TaskSpec,
    tokenizer,
    length: int,
    depths: Sequence[float],
    samples: int,
    seed: int,
    helmet: HelmetTaskData | None,
    budget: int,
    enabled: bool,
    chat: bool = False,
) -> list[EvalExample]:
    """This rank's examples of `spec` at `length` (`chat`: prompts in the tokenizer's chat template)."""
    if spec.source == "synthetic":
        slots = ev_dist.shard(range(samples), enabled)
        return [
            build_synthetic_example(spec.name, tokenizer, length, depths[i % len(depths)], i, seed, budget, chat=chat)
            for i in slots
        ]
    slots = ev_dist.shard(range(len(helmet.records)), enabled)
    return [build_helmet_example(helmet, i, tokenizer, budget, chat=chat) for i in slots]


def _metric_scores(records: list[dict]) -> dict[str, dict[str, dict[int, float | None]]]:
    """task -> metric -> length -> 100 x the mean of the records' `metrics` (the metrics besides the main one).
    A metric some record could not compute (None) is None: "not computed", never 0; a metric only some records
    have (ALCE's citation scores skip outputs without a sentence) is averaged over those."""
    groups: dict = defaultdict(list)
    for r in records:
        for name, value in (r.get("metrics") or {}).items():
            groups[(r["task"], name, r["length"])].append(value)
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (task, name, length), values in sorted(groups.items()):
        known = all(v is not None for v in values)
        out[task][name][length] = 100.0 * sum(values) / len(values) if known else None
    return {t: dict(m) for t, m in out.items()}


def _nli_judge(settings: EvalSettings, specs: list[registry.TaskSpec], device):
    """The NLI model of the citation scores, loaded when a cite task runs and `nli_model_dir` is set."""
    if settings.nli_model_dir is None or not any(s.category == "cite" for s in specs):
        return None
    from prolong_lit.evals.nli import NLIModel

    return NLIModel(settings.nli_model_dir, device=device)


def _target_json(target):
    return dict(target) if isinstance(target, dict) else list(target)


def _depth_scores(records: list[dict]) -> dict[str, dict[int, dict[float, float]]]:
    groups: dict = defaultdict(list)
    for r in records:
        if r["depth"] is not None:
            groups[(r["task"], r["length"], round(r["depth"], 4))].append(r["score"])
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (task, length, depth), scores in sorted(groups.items()):
        out[task][length][depth] = 100.0 * sum(scores) / len(scores)
    return {t: dict(d) for t, d in out.items()}


def run_evaluation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    settings: EvalSettings,
    max_position_embeddings: int | None,
    distributed: bool | None = None,
    keep_records: bool = True,
    helmet_data: HelmetData | None = None,
) -> EvalResults:
    """Evaluate `model` (any transformers causal LM) as `settings` say (tasks, lengths, depths, samples...).

    Args:
        model: the causal LM; put in eval mode for the run and restored afterwards.
        tokenizer: its tokenizer; prompts are sized in its tokens.
        settings: what to evaluate (see `EvalSettings`).
        max_position_embeddings: the model's; lengths above it are refused, and it is the length evaluated when
            `settings.lengths` is None (None: no check, and `settings.lengths` must be given).
        distributed: shard examples across torch.distributed ranks and gather results (None: if initialised).
        keep_records: keep per-example records (outputs, scores) in the results.
        helmet_data: HELMET task data already read for these settings (`check_settings` returns it); the files of
            any (task, length) it lacks are read here.
    """
    # local names for the settings the body below reads again and again
    tasks, lengths, depths = settings.tasks, settings.resolved_lengths(max_position_embeddings), settings.depths
    samples_per_task, seed, helmet_dir = settings.samples_per_task, settings.seed, settings.helmet_dir
    batch_size, use_cache, max_new_tokens = settings.batch_size, settings.use_cache, settings.max_new_tokens
    specs = registry.validate_request(
        tasks, lengths, depths, samples_per_task, helmet_dir, max_position_embeddings, tokenizer, max_new_tokens
    )
    enabled = ev_dist.resolve(distributed)
    given = helmet_data or {}
    helmet_data = {
        (s.name, n): given.get((s.name, n))
        or load_helmet_task(s.name, helmet_dir, n, settings.samples_for(s.name), seed, tokenizer)
        for s in specs
        if s.source == "helmet"
        for n in lengths
    }  # reads and checks every HELMET line before any generation
    rank, _ = ev_dist.rank_and_world(enabled)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stats = GenerationStats(use_cache=use_cache)
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    local_records: list[dict] = []
    nli = _nli_judge(settings, specs, device)
    was_training = model.training
    model.eval()
    try:
        for spec in specs:
            stop = stop_token_ids(tokenizer, spec.stop_newline)
            max_new = registry.new_tokens(spec, max_new_tokens)
            for length in lengths:
                examples = _build(
                    spec,
                    tokenizer,
                    length,
                    depths,
                    settings.samples_for(spec.name),
                    seed,
                    helmet_data.get((spec.name, length)),
                    length - max_new,
                    enabled,
                    settings.chat_for(spec),
                )
                generated, batch_stats = greedy_generate(
                    model, [e.input_ids for e in examples], max_new, stop, pad_id, batch_size, use_cache, enabled
                )
                stats.add(batch_stats)
                outputs = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
                metric = build_metric(spec.metric, spec.answer_prefix, nli=nli, sync_on_compute=enabled).to(device)
                metric.update(outputs, [e.target for e in examples])
                for example, output in zip(examples, outputs):
                    local_records.append(
                        {
                            "task": spec.name,
                            "length": length,
                            "index": example.index,
                            "depth": example.depth,
                            "output": output,
                            "score": metric.score_one(output, example.target),
                            "prompt_tokens": len(example.input_ids),
                            "target": _target_json(example.target),
                            "metrics": metric.details(output, example.target, example.meta),
                        }
                    )
                scores[spec.name][length] = 100.0 * float(metric.compute())
                counts[spec.name][length] = len(examples)
                if rank == 0:
                    log.info("eval %s@%d: %s = %.2f", spec.name, length, spec.metric, scores[spec.name][length])
    finally:
        model.train(was_training)
    records = ev_dist.gather_lists(local_records, enabled)
    task_order = {s.name: i for i, s in enumerate(specs)}
    records.sort(key=lambda r: (task_order[r["task"]], r["length"], r["index"]))
    for task, by_length in counts.items():  # the per-rank counts become global ones
        for length in by_length:
            by_length[length] = sum(1 for r in records if r["task"] == task and r["length"] == length)
    metric_scores = _metric_scores(records)
    grouped = categories.aggregate(scores, {s.name: s.metric for s in specs}, metric_scores)
    return EvalResults(
        scores=dict(scores),
        depth_scores=_depth_scores(records),
        categories=grouped.average,
        category_scores=grouped.by_length,
        incomplete_categories=grouped.missing,
        task_categories={s.name: s.category for s in specs},
        task_metrics={s.name: s.metric for s in specs},
        metric_scores=metric_scores,
        num_examples=dict(counts),
        generation=_merge_stats(stats, enabled),
        config={
            "tasks": list(tasks),
            "lengths": list(lengths),
            "depths": list(depths),
            "samples_per_task": samples_per_task,
            "task_samples": dict(settings.task_samples),
            "seed": seed,
            "batch_size": batch_size,
            "use_cache": use_cache,
            "max_new_tokens": max_new_tokens,
            "helmet_dir": None if helmet_dir is None else str(helmet_dir),
            "use_chat_template": settings.use_chat_template,
            "chat_tasks": [s.name for s in specs if settings.chat_for(s)],
            "nli_model_dir": settings.nli_model_dir,
        },
        records=records if keep_records else [],
    )


def _merge_stats(stats: GenerationStats, enabled: bool) -> dict:
    parts = ev_dist.gather_lists([stats.as_dict()], enabled)
    total = GenerationStats(use_cache=stats.use_cache)
    for part in parts:
        total.add(GenerationStats(**part))
    return total.as_dict()
