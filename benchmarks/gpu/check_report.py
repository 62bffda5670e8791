"""The tables `benchmarks/gpu/check.py` writes: one section per check, each a list of rows, a status and its time.

A section that raises is recorded (status `error`, the exception's last line) and the next one still runs; a
section the global time budget has no room for is recorded as `skipped`. `write` puts `check.md` (markdown
tables) and `check.json` (the same rows, plus the environment) into the output folder.
"""

from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Report:
    """Sections of rows, in the order they ran, under one global time budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.environment: dict[str, Any] = {}
        self.sections: dict[str, dict[str, Any]] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - self.elapsed()

    @contextmanager
    def section(self, name: str, needs_s: float = 0.0):
        """Run a section's body with its rows list; record its status and time whatever happens."""
        entry = {"status": "ok", "seconds": 0.0, "rows": [], "notes": []}
        self.sections[name] = entry
        start = time.monotonic()
        if self.left() < needs_s:
            entry["status"] = f"skipped: {self.left():.0f} s of the budget left, needs ~{needs_s:.0f} s"
            print(f"[check] {name}: {entry['status']}", flush=True)
            yield None
            return
        print(f"[check] {name} ...", flush=True)
        try:
            yield entry
        except Exception as err:  # a section's failure is a result: record it, run the next one
            entry["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            entry["traceback"] = traceback.format_exc(limit=6)
            print(f"[check] {name}: {entry['status']}\n{entry['traceback']}", flush=True)
        finally:
            entry["seconds"] = round(time.monotonic() - start, 1)
            failed = [row for row in entry["rows"] if row.get("pass") is False]
            if failed and entry["status"] == "ok":
                entry["status"] = f"FAILED: {len(failed)} row(s) out of tolerance"
            print(f"[check] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)

    def ok(self) -> bool:
        """No section failed or raised (skipped ones do not count as failures)."""
        return all(s["status"] == "ok" or s["status"].startswith("skipped") for s in self.sections.values())

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        data = {"environment": self.environment, "seconds": round(self.elapsed(), 1), "ok": self.ok(),
                "sections": self.sections}
        json_path, md_path = out / "check.json", out / "check.md"
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        md_path.write_text(self.markdown())
        return [md_path, json_path]

    def markdown(self) -> str:
        lines = ["# GPU check", ""]
        lines += [f"- {key}: {value}" for key, value in self.environment.items()]
        lines += [f"- total: {self.elapsed():.0f} s of a {self.budget_s:.0f} s budget; all ok: {self.ok()}", ""]
        for name, entry in self.sections.items():
            lines += [f"## {name}", "", f"status: {entry['status']} ({entry['seconds']} s)", ""]
            lines += [f"- {note}" for note in entry["notes"]]
            if entry["notes"]:
                lines.append("")
            lines += table(entry["rows"])
            lines.append("")
        return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of rows (dicts), the columns in the order they first appear."""
    if not rows:
        return []
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key, "")) for key in columns) + " |")
    return lines


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value).replace("|", "/")
