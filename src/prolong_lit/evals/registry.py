"""Task names -> how to build, generate and score them; and the checks run before any evaluation work.

- recall (`json_kv`, `helmet_json_kv`: substring_exact_match after "Corresponding value:", 100 new tokens;
  `ruler_niah_s_1`, `ruler_niah_mk_2`, `ruler_niah_mv`: ruler_recall, 50; `ruler_niah_mk_3`: ruler_recall, 100);
  no stop at newline.
- rag (`kilt_nq`, `kilt_triviaqa`, `kilt_hotpotqa`, `kilt_popqa_3`): substring_exact_match after "Answer:", 20 new
  tokens, stop at newline.
- rerank (`msmarco_rerank_psg`): ndcg@10 of the ranking after "Ranking:", 200 new tokens, stop at newline.
- icl (`icl_trec_coarse`, `icl_trec_fine`, `icl_banking77`, `icl_clinic150`, `icl_nlu`): accuracy of the label after
  "label:", 20 new tokens, stop at newline.

Generation lengths and newline stops are HELMET's configs (its recall config does not stop at newlines; the
parsed answer is the first line anyway). The first five tasks are generated (`synthetic`), the rest read HELMET's
files (`helmet_files`). Synthetic prompts are built to the evaluation length L; HELMET prompts are cut to
L - max_new_tokens, HELMET's own budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import helmet_files, synthetic

CATEGORIES = ("recall", "rag", "rerank", "icl")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str
    metric: str
    answer_prefix: str
    max_new_tokens: int
    stop_newline: bool
    source: str  # "synthetic" or "helmet"


def _specs() -> dict[str, TaskSpec]:
    specs = {
        "json_kv": TaskSpec(
            "json_kv", "recall", "substring_exact_match", "Corresponding value:", 100, False, "synthetic"
        )
    }
    for name, max_new in (
        ("ruler_niah_s_1", 50),
        ("ruler_niah_mk_2", 50),
        ("ruler_niah_mk_3", 100),
        ("ruler_niah_mv", 50),
    ):
        specs[name] = TaskSpec(name, "recall", "ruler_recall", "Answer:", max_new, False, "synthetic")
    specs["helmet_json_kv"] = TaskSpec(
        "helmet_json_kv", "recall", "substring_exact_match", "Corresponding value:", 100, False, "helmet"
    )
    for name in helmet_files.RAG_FILES:
        specs[name] = TaskSpec(name, "rag", "substring_exact_match", "Answer:", 20, True, "helmet")
    specs["msmarco_rerank_psg"] = TaskSpec("msmarco_rerank_psg", "rerank", "ndcg@10", "Ranking:", 200, True, "helmet")
    for name in helmet_files.ICL_TASKS:
        specs[name] = TaskSpec(name, "icl", "accuracy", "label:", 20, True, "helmet")
    return specs


TASKS: dict[str, TaskSpec] = _specs()


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def new_tokens(spec: TaskSpec, max_new_tokens: int | None) -> int:
    """The task's generation length, capped by a run-wide `max_new_tokens` if one is given."""
    return spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)


def validate_request(
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_task: int,
    helmet_dir: str | Path | None,
    max_position_embeddings: int | None,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int | None = None,
) -> list[TaskSpec]:
    """Every check that can fail before work starts (except reading file contents); returns the task specs."""
    if not tasks:
        raise ValueError(f"tasks: give at least one evaluation task; known tasks: {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: {list(tasks)} lists a task twice")
    if not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"lengths: give positive integer token counts, got {list(lengths)}")
    if max_position_embeddings is not None:
        too_long = [n for n in lengths if n > max_position_embeddings]
        if too_long:
            raise ValueError(
                f"lengths: {too_long} exceed the model's max_position_embeddings ({max_position_embeddings})"
            )
    if samples_per_task < 1:
        raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (or None for each task's own), got {max_new_tokens}")
    specs = [TASKS[t] for t in tasks]
    if any(s.source == "synthetic" for s in specs):
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths: give needle depths between 0.0 and 1.0, got {list(depths)}")
        for spec in (s for s in specs if s.source == "synthetic"):
            floor = synthetic.minimum_length(spec.name, tokenizer)
            short = [n for n in lengths if n < floor]
            if short:
                raise ValueError(f"lengths: {spec.name} needs at least {floor} tokens; {short} are too short")
    helmet_specs = [s for s in specs if s.source == "helmet"]
    if helmet_specs:
        _check_helmet(helmet_specs, lengths, helmet_dir, max_new_tokens)
    return specs


def _check_helmet(specs: list[TaskSpec], lengths: Sequence[int], helmet_dir, max_new_tokens: int | None) -> None:
    names = [s.name for s in specs]
    if helmet_dir is None:
        raise ValueError(f"helmet_dir: tasks {names} read HELMET's data files; give the folder that holds them")
    root = helmet_files.resolve_helmet_dir(helmet_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"helmet_dir: {helmet_dir} is not a directory")
    missing = sorted(
        {
            str(root / rel)
            for spec in specs
            for n in lengths
            for rel in helmet_files.task_files(spec.name, n).values()
            if not (root / rel).is_file()
        }
    )
    if missing:
        raise FileNotFoundError(
            f"helmet_dir: {len(missing)} HELMET file(s) missing under {root}:\n  " + "\n  ".join(missing)
        )
    for spec in specs:
        small = [n for n in lengths if n <= new_tokens(spec, max_new_tokens)]
        if small:
            raise ValueError(f"lengths: {small} leave no room for {spec.name}'s prompt after its generation length")
