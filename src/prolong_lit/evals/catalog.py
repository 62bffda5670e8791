"""The task list `python -m prolong_lit eval --list_tasks` prints, read from the registry (every registered task
appears, whoever registered it): name, HELMET categories, metric, generation length, newline stop, data source."""

from __future__ import annotations

from dataclasses import dataclass

from prolong_lit.evals import categories, registry

SHOWN_LENGTH = 131072  # file tasks name the files of this HELMET length (other lengths read their own)


@dataclass(frozen=True)
class TaskRow:
    name: str
    categories: str  # the HELMET categories whose slots the task fills, else its registry category
    metric: str
    max_new_tokens: int
    stop_newline: bool
    source: str  # "generated", or the HELMET file(s) it reads


def _categories_of(spec: registry.TaskSpec) -> str:
    found = [c for c, slots in categories.CATEGORIES.items() if any(spec.name in s.tasks for s in slots)]
    return ", ".join(found) if found else spec.category


def _source(spec: registry.TaskSpec) -> str:
    if spec.source == "synthetic":
        return "generated"
    try:
        files = registry.task_files(spec.name, SHOWN_LENGTH)
    except ValueError:  # a task whose files the registry cannot name
        return "HELMET files"
    return "HELMET " + ", ".join(f"{role}: {path}" for role, path in files.items())


def task_rows() -> list[TaskRow]:
    """One row per registered task, in registry order."""
    return [
        TaskRow(s.name, _categories_of(s), s.metric, s.max_new_tokens, s.stop_newline, _source(s))
        for s in registry.TASKS.values()
    ]


def render_task_list() -> str:
    """A fixed-width table of `task_rows()`, with a header and a note on the file lengths."""
    header = ("task", "category", "metric", "gen", "stop\\n", "data")
    rows = [(r.name, r.categories, r.metric, str(r.max_new_tokens), "yes" if r.stop_newline else "no", r.source)
            for r in task_rows()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *rows]]
    lines.append("")
    lines.append(f"HELMET files are relative to --helmet_dir and shown for {SHOWN_LENGTH} tokens; an evaluation "
                 "length L reads the files of the smallest HELMET length >= L. gen: generation length (tokens).")
    return "\n".join(lines)
