"""HELMET's results table: one row per evaluation length (and a mean row), a column per category and per task.

`write_tables(results, out_dir)` writes `helmet_table.csv` and `helmet_table.md` next to the evaluation's report.
Category columns come first in HELMET's order (`categories.ORDER`), then the tasks in evaluation order. A category
that is incomplete at a length (some of its HELMET slots were not evaluated; `categories`) is an empty CSV cell
and "incomplete" in Markdown, where a note below the table names its missing slots. Scores are 0-100, two decimals.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from prolong_lit.evals.categories import ORDER
from prolong_lit.evals.results import EvalResults

MEAN_ROW = "mean"


def _lengths(results: EvalResults) -> list[int]:
    return sorted({n for by_length in results.scores.values() for n in by_length})


def _category_columns(results: EvalResults) -> list[str]:
    shown = set(results.category_scores) | set(results.incomplete_categories)
    return [c for c in ORDER if c in shown]


def _task_mean(by_length: dict[int, float], lengths: list[int]) -> float | None:
    values = [by_length.get(n) for n in lengths]
    if any(v is None or math.isnan(v) for v in values):
        return None
    return sum(values) / len(values)


def table_rows(results: EvalResults) -> tuple[list[str], list[list[float | None | str]]]:
    """(header, rows): `length` then the category and task columns; a cell is a score, None (no score) or
    "incomplete" (a category missing some of its slots at that length)."""
    lengths, cats, tasks = _lengths(results), _category_columns(results), list(results.scores)
    rows: list[list] = []
    for n in lengths:
        row: list = [n]
        for c in cats:
            score = results.category_scores.get(c, {}).get(n)
            row.append(score if score is not None else "incomplete")
        for t in tasks:
            score = results.scores[t].get(n)
            row.append(None if score is None or math.isnan(score) else score)
        rows.append(row)
    mean: list = [MEAN_ROW]
    mean += [results.categories.get(c, "incomplete" if c in results.incomplete_categories else None) for c in cats]
    mean += [_task_mean(results.scores[t], lengths) for t in tasks]
    rows.append(mean)
    return ["length", *cats, *tasks], rows


def _cell(value, markdown: bool) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if value == "incomplete":
        return "incomplete" if markdown else ""
    if value is None:
        return "-" if markdown else ""
    return str(value)


def render_csv(results: EvalResults) -> str:
    header, rows = table_rows(results)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v, markdown=False) for v in row])
    return out.getvalue()


def render_table_markdown(results: EvalResults) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v, markdown=True) for v in row) + " |" for row in rows]
    if results.incomplete_categories:
        lines += ["", "Incomplete categories (HELMET slots without a score at some length; no category score):"]
        lines += [f"- {c}: {', '.join(missing)}" for c, missing in results.incomplete_categories.items()]
    return "\n".join(lines) + "\n"


def write_tables(results: EvalResults, out_dir: str | Path) -> dict[str, Path]:
    """Write `helmet_table.csv` and `helmet_table.md` into `out_dir`; returns {"csv": path, "table": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "helmet_table.csv", "table": out / "helmet_table.md"}
    paths["csv"].write_text(render_csv(results), encoding="utf-8")
    paths["table"].write_text("# HELMET table\n\n" + render_table_markdown(results), encoding="utf-8")
    return paths
