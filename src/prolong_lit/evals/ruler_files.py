"""HELMET's own RULER files: `ruler/<RULER task>/validation_<H>.jsonl` under the HELMET data folder.

Tasks: `ruler_qa_1` (RULER's SQuAD QA) and `ruler_qa_2` (HotpotQA) exist only as files (their documents come from
those datasets); every generated RULER task also has a file twin, `helmet_ruler_<name>` (e.g.
`helmet_ruler_niah_mk_2`), which reads HELMET's pre-generated prompts instead of generating new ones. H is the HELMET
length serving the evaluation length (`helmet_files.helmet_length`).

Line schema (what HELMET's `load_ruler` formats its templates with; extra fields are ignored):
- `context` str: the haystack, cut from its end to fit the budget like every HELMET context;
- `outputs` list of str (or `answer`, a str or list of str): the gold values;
- `query` str (or `question`): the key(s) of niah, the value of vt, the question of qa;
- `type_needle_v` str: niah only ("numbers", "uuids"; the singular for single-value tasks, as stored);
- `num_v` int: vt only (the number of variables);
- `example` str, optional: the one-shot example of vt and cwe (followed by a blank line when not empty);
- `depth`, optional: where the needle sits (a fraction, or a percentage if > 1).

Sampling as HELMET: the file is shuffled with numpy's default_rng(seed) permutation (`datasets.Dataset.shuffle`)
and the first `samples` lines are kept. Prompts: HELMET's `load_ruler` templates (those of `ruler` and `prompts`).
Scoring: ruler_recall on the raw output; QA substring exact match (HELMET's `default_post_process`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np

from prolong_lit.errors import ConfigError
from prolong_lit.evals import helmet_files as hf
from prolong_lit.evals import prompts, ruler

# task -> RULER's folder name
_DIRS = {
    "ruler_niah_s_1": "niah_single_1",
    "ruler_niah_s_2": "niah_single_2",
    "ruler_niah_s_3": "niah_single_3",
    "ruler_niah_mk_1": "niah_multikey_1",
    "ruler_niah_mk_2": "niah_multikey_2",
    "ruler_niah_mk_3": "niah_multikey_3",
    "ruler_niah_mq": "niah_multiquery",
    "ruler_niah_mv": "niah_multivalue",
    "ruler_cwe": "cwe",
    "ruler_fwe": "fwe",
    "ruler_vt": "vt",
}
FILE_TASKS: dict[str, str] = {f"helmet_{name}": folder for name, folder in _DIRS.items()}
FILE_TASKS.update({"ruler_qa_1": "qa_1", "ruler_qa_2": "qa_2"})


def generated_name(task: str) -> str:
    """The generated task a file task mirrors (`helmet_ruler_vt` -> `ruler_vt`); QA tasks are their own."""
    return task.removeprefix("helmet_")


def task_files(task: str, length: int) -> dict[str, str]:
    """{"test": path relative to the HELMET data folder} of `task` at evaluation length `length`."""
    if task not in FILE_TASKS:
        raise ConfigError(f"unknown RULER file task {task!r}; known: {list(FILE_TASKS)}")
    return {"test": f"ruler/{FILE_TASKS[task]}/validation_{hf.helmet_length(length)}.jsonl"}


def check_line(task: str, r: Mapping) -> str | None:
    """None when the line has what `task`'s template needs, else what is wrong."""
    if not isinstance(r.get("context"), str):
        return "field 'context' must be a string"
    answers = r.get("outputs", r.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "field 'outputs' (or 'answer') must be a non-empty list of strings"
    name = generated_name(task)
    if name != "ruler_cwe" and name != "ruler_fwe" and not isinstance(r.get("query", r.get("question")), str):
        return "field 'query' (or 'question') must be a string"
    if name.startswith("ruler_niah") and not isinstance(r.get("type_needle_v"), str):
        return "field 'type_needle_v' must be a string"
    if name == "ruler_vt" and not isinstance(r.get("num_v"), int | str):
        return "field 'num_v' must be an integer"
    if "example" in r and not isinstance(r["example"], str):
        return "field 'example' must be a string"
    return None


def read_task(task: str, helmet_dir: str | Path, length: int, samples: int, seed: int) -> list[dict]:
    """Read and check every line of `task`'s file, then keep `samples` lines as HELMET samples them."""
    root = hf.resolve_helmet_dir(helmet_dir)
    records = hf.read_jsonl(root / task_files(task, length)["test"], partial(check_line, task))
    order = np.random.default_rng(seed).permutation(len(records))[:samples]
    return [records[int(i)] for i in order]


def _templates(name: str) -> tuple[str, str]:
    """HELMET's (user template, answer prefix) for a RULER task; the context is left open as {context}."""
    mq_mv = name in ("ruler_niah_mq", "ruler_niah_mv")
    if name.startswith("ruler_niah"):
        return (prompts.RULER_MULTI_USER, prompts.RULER_MULTI_PREFIX) if mq_mv else (
            prompts.RULER_SINGLE_USER, prompts.RULER_SINGLE_PREFIX)
    return {
        "ruler_vt": (ruler.VT_USER, ruler.VT_PREFIX),
        "ruler_cwe": (ruler.CWE_USER, ruler.CWE_PREFIX),
        "ruler_fwe": (ruler.FWE_USER, ruler.FWE_PREFIX),
    }.get(name, (ruler.QA_USER, ruler.QA_PREFIX))


def file_parts(data, record: dict, shots: int):
    """HELMET's prompt parts of one line: (user template with the context open, answer prefix, context, target,
    meta), the signature `helmet.build_helmet_example` uses (`data.task` names the task; `shots` is unused: RULER
    has no demonstrations beyond its one-shot `example`)."""
    name = generated_name(data.task)
    user_t, prefix_t = _templates(name)
    query = record.get("query", record.get("question", ""))
    example = record.get("example") or ""
    fields = {
        "type_needle_v": record.get("type_needle_v", ""),
        "query": query,
        "question": query,
        "num_v": record.get("num_v", ""),
        "example": example + "\n\n" if example else "",
    }
    answers = record.get("outputs", record.get("answer"))
    target = [answers] if isinstance(answers, str) else list(answers)
    prefix = prefix_t.format(**fields)
    return partial(user_t.format, **fields), prefix, record["context"], target, {"question": query}
