"""Task names -> how to build, generate and score them; and the checks run before any evaluation work.

- recall (`json_kv`, `helmet_json_kv`: substring_exact_match after "Corresponding value:", 100 new tokens;
  `ruler_niah_mk_2`, `ruler_niah_mv`: ruler_recall, 50; `ruler_niah_mk_3`: ruler_recall, 100); no stop at newline.
- ruler (the other RULER tasks, HELMET's generation lengths in `ruler.GENERATION_LENGTHS`: ruler_recall, except
  `ruler_qa_1`/`ruler_qa_2`: substring_exact_match after "Answer:"); no stop at newline. Generated (`synthetic`)
  except QA; `helmet_ruler_<name>` reads the same task from HELMET's RULER files (`ruler_files`).
- rag (`kilt_nq`, `kilt_triviaqa`, `kilt_hotpotqa`, `kilt_popqa_3`): substring_exact_match after "Answer:", 20 new
  tokens, stop at newline.
- rerank (`msmarco_rerank_psg`): ndcg@10 of the ranking after "Ranking:", 200 new tokens, stop at newline.
- icl (`icl_trec_coarse`, `icl_trec_fine`, `icl_banking77`, `icl_clinic150`, `icl_nlu`): accuracy of the label after
  "label:", 20 new tokens, stop at newline.
- longqa (`narrativeqa`: rougeL_f1, 100 new tokens; `infbench_qa_eng`: rougeL_f1, 10; `infbench_choice_eng`:
  choice_accuracy, 10), after "Answer:"; summ (`infbench_sum_eng`: rougeLsum_f1, 1200; `multi_lexsum`:
  rougeLsum_f1, 400), after "Summary:"; cite (`alce_asqa`: str_em, `alce_qampari`: qampari_rec_top5, 300, plus
  citation recall/precision with an NLI model). No stop at newline. HELMET's GPT-4o judge scores narrativeqa and
  the summaries; it cannot run offline, so these report HELMET's automatic metrics (`metrics`).

`TaskSpec.chat` is HELMET's per-task `use_chat_template` default (its configs): on for longqa, summ and cite,
off for the others; `EvalSettings.use_chat_template` keeps it (None) or overrides it for every task.

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

from prolong_lit.errors import ConfigError, MissingPathError
from prolong_lit.evals import helmet_files, longdoc, ruler, ruler_files, synthetic

CATEGORIES = ("recall", "rag", "rerank", "icl", "longqa", "summ", "cite", "ruler")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str
    metric: str
    answer_prefix: str
    max_new_tokens: int
    stop_newline: bool
    source: str  # "synthetic" or "helmet"
    chat: bool = False  # HELMET's use_chat_template default for the task (on for longqa, summ, cite)


def _specs() -> dict[str, TaskSpec]:
    specs = {
        "json_kv": TaskSpec(
            "json_kv", "recall", "substring_exact_match", "Corresponding value:", 100, False, "synthetic"
        )
    }
    for name, max_new in ruler.GENERATION_LENGTHS.items():  # HELMET's Recall takes mk_2, mk_3 and mv
        category = "recall" if name in ("ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv") else "ruler"
        qa = name.startswith("ruler_qa")
        metric, source = ("substring_exact_match", "helmet") if qa else ("ruler_recall", "synthetic")
        specs[name] = TaskSpec(name, category, metric, "Answer:", max_new, False, source)
        if not qa:
            file_name = f"helmet_{name}"
            specs[file_name] = TaskSpec(file_name, category, metric, "Answer:", max_new, False, "helmet")
    specs["helmet_json_kv"] = TaskSpec(
        "helmet_json_kv", "recall", "substring_exact_match", "Corresponding value:", 100, False, "helmet"
    )
    for name in helmet_files.RAG_FILES:
        specs[name] = TaskSpec(name, "rag", "substring_exact_match", "Answer:", 20, True, "helmet")
    specs["msmarco_rerank_psg"] = TaskSpec("msmarco_rerank_psg", "rerank", "ndcg@10", "Ranking:", 200, True, "helmet")
    for name in helmet_files.ICL_TASKS:
        specs[name] = TaskSpec(name, "icl", "accuracy", "label:", 20, True, "helmet")
    for name, category, metric, prefix, max_new in (
        ("narrativeqa", "longqa", "rougeL_f1", "Answer:", 100),
        ("infbench_qa_eng", "longqa", "rougeL_f1", "Answer:", 10),
        ("infbench_choice_eng", "longqa", "choice_accuracy", "Answer:", 10),
        ("infbench_sum_eng", "summ", "rougeLsum_f1", "Summary:", 1200),
        ("multi_lexsum", "summ", "rougeLsum_f1", "Summary:", 400),
        ("alce_asqa", "cite", "str_em", "Answer:", 300),
        ("alce_qampari", "cite", "qampari_rec_top5", "Answer:", 300),
    ):
        specs[name] = TaskSpec(name, category, metric, prefix, max_new, False, "helmet", chat=True)
    return specs


TASKS: dict[str, TaskSpec] = _specs()


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def new_tokens(spec: TaskSpec, max_new_tokens: int | None) -> int:
    """The task's generation length, capped by a run-wide `max_new_tokens` if one is given."""
    return spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)


def task_files(task: str, length: int) -> dict[str, str]:
    """The HELMET files (relative to the HELMET data folder) a file task reads at `length`."""
    if task in ruler_files.FILE_TASKS:
        return ruler_files.task_files(task, length)
    return helmet_files.task_files(task, length)


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
        raise ConfigError(f"tasks: give at least one evaluation task; known tasks: {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"tasks: unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks: {list(tasks)} lists a task twice")
    if not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise ConfigError(f"lengths: give positive integer token counts, got {list(lengths)}")
    if max_position_embeddings is not None:
        too_long = [n for n in lengths if n > max_position_embeddings]
        if too_long:
            raise ConfigError(
                f"lengths: {too_long} exceed the model's max_position_embeddings ({max_position_embeddings})"
            )
    if samples_per_task < 1:
        raise ConfigError(f"samples_per_task must be >= 1, got {samples_per_task}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (or None for each task's own), got {max_new_tokens}")
    specs = [TASKS[t] for t in tasks]
    if any(s.source == "synthetic" for s in specs):
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ConfigError(f"depths: give needle depths between 0.0 and 1.0, got {list(depths)}")
        for spec in (s for s in specs if s.source == "synthetic"):
            floor = synthetic.minimum_length(spec.name, tokenizer)
            short = [n for n in lengths if n - new_tokens(spec, max_new_tokens) < floor]
            if short:  # the prompt's budget is the length less the generation length (HELMET's budget)
                raise ConfigError(
                    f"lengths: {spec.name} needs at least {floor} + {new_tokens(spec, max_new_tokens)} (its generation "
                    f"length) tokens; {short} are too short"
                )
    helmet_specs = [s for s in specs if s.source == "helmet"]
    if helmet_specs:
        _check_helmet(helmet_specs, lengths, helmet_dir, max_new_tokens)
    return specs


def _check_helmet(specs: list[TaskSpec], lengths: Sequence[int], helmet_dir, max_new_tokens: int | None) -> None:
    names = [s.name for s in specs]
    if helmet_dir is None:
        raise ConfigError(f"helmet_dir: tasks {names} read HELMET's data files; give the folder that holds them")
    root = helmet_files.resolve_helmet_dir(helmet_dir)
    if not root.is_dir():
        raise MissingPathError(f"helmet_dir: {helmet_dir} is not a directory")
    missing = sorted(
        {
            str(root / rel)
            for spec in specs
            for n in lengths
            for rel in task_files(spec.name, n).values()
            if not helmet_files.locate(root, rel).is_file()
        }
    )
    if missing:
        raise MissingPathError(
            f"helmet_dir: {len(missing)} HELMET file(s) missing under {root}:\n  " + "\n  ".join(missing)
        )
    for spec in specs:  # long documents also keep HELMET's reserve for the instructions free
        room = new_tokens(spec, max_new_tokens) + longdoc.RESERVE.get(spec.name, 0)
        small = [n for n in lengths if n <= room]
        if small:
            raise ConfigError(f"lengths: {small} leave no room for {spec.name}'s prompt after its generation length")
