"""Evaluation reports: JSON + Markdown files and matplotlib pictures.

`write_report(results, out_dir)` writes
- `eval_results.json`: `EvalResults.to_dict()` (schema in `results`),
- `eval_report.md`: HELMET's length x (category, task) table, a task x length score table, per-depth tables of needle
  tasks, generation cost,
- `helmet_table.csv` / `helmet_table.md`: HELMET's results table alone (`table`),
- `score_vs_length.png`: one line per task, score (0-100) against length (log2 axis),
- `needle_<task>.png`: for every task with depths, a heatmap of score by depth (rows) x length (columns).

The figures are built with matplotlib's object API on an Agg canvas (no pyplot, no global backend change), so a
callback can pass them to TensorBoard (`SummaryWriter.add_figure`) or turn them into arrays (`figure_to_array`,
HWC uint8 for `add_image(..., dataformats="HWC")`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prolong_lit.evals.results import EvalResults
from prolong_lit.evals.table import render_table_markdown, write_tables


def _fmt(score: float | None) -> str:
    return "-" if score is None or math.isnan(score) else f"{score:.1f}"


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 and length >= 1024 else str(length)


def render_markdown(results: EvalResults, title: str = "Long-context evaluation") -> str:
    lengths = sorted({n for by_length in results.scores.values() for n in by_length})
    lines = [f"# {title}", ""]
    if results.category_scores or results.incomplete_categories:
        lines += ["## HELMET categories (per length, and the mean over lengths)", "", render_table_markdown(results)]
    lines += ["| task | category | metric | " + " | ".join(_length_label(n) for n in lengths) + " |"]
    lines.append("|---|---|---|" + "---|" * len(lengths))
    for task, by_length in results.scores.items():
        cells = " | ".join(_fmt(by_length.get(n)) for n in lengths)
        lines.append(
            f"| {task} | {results.task_categories.get(task, '')} | {results.task_metrics.get(task, '')} | {cells} |"
        )
    lines.append("")
    for task, by_length in results.depth_scores.items():
        task_lengths = sorted(by_length)
        depths = sorted({d for by_depth in by_length.values() for d in by_depth})
        lines += [f"## {task}: score by needle depth", ""]
        lines.append("| depth | " + " | ".join(_length_label(n) for n in task_lengths) + " |")
        lines.append("|---|" + "---|" * len(task_lengths))
        for d in depths:
            lines.append(f"| {d:.0%} | " + " | ".join(_fmt(by_length[n].get(d)) for n in task_lengths) + " |")
        lines.append("")
    gen = results.generation
    if gen:
        lines += [
            "## Generation",
            "",
            f"{gen.get('sequences', 0)} sequences, {gen.get('prompt_tokens', 0)} prompt tokens, "
            f"{gen.get('generated_tokens', 0)} generated tokens, {gen.get('forward_calls', 0)} forward calls "
            f"(KV cache: {gen.get('use_cache')}); prefill {gen.get('prefill_seconds', 0.0):.2f} s, "
            f"decoding {gen.get('decode_seconds', 0.0):.2f} s (summed over ranks).",
            "",
        ]
    return "\n".join(lines)


def needle_heatmap(results: EvalResults, task: str) -> Figure:
    """Score by needle depth (rows, 0% at the top) x length (columns), 0 red .. 100 green; grey where missing."""
    by_length = results.depth_scores.get(task)
    if not by_length:
        raise ValueError(f"{task} has no per-depth scores (known: {sorted(results.depth_scores)})")
    lengths = sorted(by_length)
    depths = sorted({d for by_depth in by_length.values() for d in by_depth})
    grid = np.full((len(depths), len(lengths)), np.nan)  # (depths, lengths)
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            grid[i, j] = by_length[n].get(d, np.nan)
    fig = Figure(figsize=(2.5 + 0.9 * len(lengths), 1.6 + 0.45 * len(depths)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task}")
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    return fig


def score_vs_length(results: EvalResults) -> Figure:
    """Every task's score (0-100) against the evaluation length, log2 length axis."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lengths = sorted({n for by_length in results.scores.values() for n in by_length})
    for task, by_length in results.scores.items():
        xs = sorted(n for n, s in by_length.items() if not math.isnan(s))
        ax.plot(xs, [by_length[n] for n in xs], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def make_figures(results: EvalResults) -> dict[str, Figure]:
    """`score_vs_length` and `needle/<task>` for each task with depths; names suit a logger's image tags."""
    figures = {"score_vs_length": score_vs_length(results)}
    for task in results.depth_scores:
        figures[f"needle/{task}"] = needle_heatmap(results, task)
    return figures


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def _nan_to_none(value):
    """Strict JSON has no NaN: a missing score becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def write_report(
    results: EvalResults, out_dir: str | Path, title: str = "Long-context evaluation", overwrite: bool = False
) -> dict[str, Path]:
    """Write the JSON, the Markdown and the PNGs into `out_dir`; returns name -> path.

    Refuses (before writing anything) to replace existing report files unless `overwrite`.
    """
    out = Path(out_dir)
    figures = make_figures(results)
    paths = {"json": out / "eval_results.json", "markdown": out / "eval_report.md",
             "csv": out / "helmet_table.csv", "table": out / "helmet_table.md"}
    for name in figures:
        paths[name] = out / (name.replace("needle/", "needle_") + ".png")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"report files already exist (pass overwrite=True to replace them): {existing}")
    out.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(
        json.dumps(_nan_to_none(results.to_dict()), indent=1, ensure_ascii=False), encoding="utf-8"
    )
    paths["markdown"].write_text(render_markdown(results, title), encoding="utf-8")
    write_tables(results, out)
    for name, fig in figures.items():
        fig.savefig(paths[name])
    return paths
