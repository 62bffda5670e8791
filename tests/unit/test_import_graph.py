"""The layering of prolong_lit's subpackages, checked statically from the source: who may import whom.

The layers, bottom up: `parallel` (distributed building blocks) and `data` (the on-disk format, packing, the
DataModule) know nothing of the model; `evals` (task builders and metrics) knows nothing of training; `model`
uses `parallel` and only the batch contract of `data` (`data.format`, docs/batch-contract.md); the entry points
(`commands`, `cli`, `pipeline`, `callbacks`) sit on top. Keeping the lower layers free of upward imports is
what lets each be tested, benchmarked and reused without the rest; an upward import is how cycles start.

Every `import` / `from ... import` statement counts, at module level or inside functions (a lazy import is still
a dependency, only a later one), including those under `if TYPE_CHECKING:`. Strings naming modules
(importlib, `class_path` in configs, cli's subcommand table) are not imports and are not seen.

The rules are data (`RULES`); `layer_violations` and `subpackage_cycles` take any source root, so the tests below
also prove on planted trees that each check can fail.
"""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOT = REPO / "src"
PACKAGE = "prolong_lit"


@dataclass(frozen=True)
class Rule:
    """Modules under `importers` must not import any module under `forbidden`, except those under `allowed`.

    Names are dotted prefixes matched at component boundaries (`prolong_lit.pipeline` covers
    `prolong_lit.pipeline` and `prolong_lit.pipeline.x`, not `prolong_lit.pipeline_config`). Importers under
    `exempt` are not checked, and neither is an import inside the importer's own subpackage.
    """

    importers: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"{self.importers} must not import {', '.join(self.forbidden)}"
        if self.allowed:
            text += f" (except {', '.join(self.allowed)})"
        return text


def _qualified(*names: str) -> tuple[str, ...]:
    return tuple(f"{PACKAGE}.{name}" for name in names)


# the layers on top: nothing below may reach up
ENTRY_POINTS = ("callbacks", "commands", "pipeline", "cli", "trainer_cli")
RULES = (
    Rule(f"{PACKAGE}.parallel", _qualified("model", "data", "evals", *ENTRY_POINTS)),
    Rule(f"{PACKAGE}.data", _qualified("model", "parallel", "evals", *ENTRY_POINTS)),
    Rule(f"{PACKAGE}.evals", _qualified("model", "parallel", "data", *ENTRY_POINTS)),
    # the model consumes the batch contract (PackedBatch) and nothing else of the data layer
    Rule(f"{PACKAGE}.model", _qualified("data", "evals", *ENTRY_POINTS), allowed=_qualified("data.format")),
    # commands are leaves: cli names them by string in its subcommand table and imports them lazily by name
    Rule(PACKAGE, _qualified("commands"), exempt=_qualified("cli")),
    # `python -m prolong_lit` and the pipeline (which runs each phase's fit through the CLI) are the only users
    Rule(PACKAGE, _qualified("cli"), exempt=_qualified("__main__", "pipeline")),
    Rule(PACKAGE, _qualified("trainer_cli"), exempt=_qualified("cli", "pipeline")),
)


@dataclass(frozen=True, order=True)
class Import:
    """One imported module: `file` (relative to the source root, posix) line `line` makes `importer` import
    `target`."""

    file: str
    line: int
    importer: str
    target: str


@dataclass(frozen=True, order=True)
class Violation:
    file: str
    line: int
    importer: str
    target: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} imports {self.target} ({self.rule})"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _modules(source_root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `source_root` (packages by __init__)."""
    modules = {}
    for path in sorted((source_root / package).rglob("*.py")):
        parts = path.relative_to(source_root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement names; relative levels count from the importer's package
    (a package's __init__ is its own package, a plain module's package is its parent)."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def find_imports(source_root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of a `package` module by a `package` module, with file and line.

    `from a.b import c` imports module a.b.c when that is a module of the tree (a submodule), else a.b (c is a
    name defined in a.b): so `from prolong_lit.data import format` counts as importing prolong_lit.data.format.
    """
    modules = _modules(source_root, package)
    found = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        file = path.relative_to(source_root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(importer, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):  # `from x import a, b` of two names: one import of x
                if _under(target, package):
                    found.append(Import(file, node.lineno, importer, target))
    return sorted(found)


def subpackage_of(module: str) -> str:
    """The node of the subpackage graph: `<package>.<first component>`, so a top-level module such as
    prolong_lit.constants is its own node; the package's __init__ is the node `<package>`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_violations(source_root: Path, rules: tuple[Rule, ...] = RULES, package: str = PACKAGE) -> list[Violation]:
    """Every import under `source_root` that breaks one of `rules`."""
    violations = []
    for imp in find_imports(source_root, package):
        if subpackage_of(imp.importer) == subpackage_of(imp.target):
            continue  # within a subpackage, anything goes
        for rule in rules:
            if not _under(imp.importer, rule.importers) or any(_under(imp.importer, e) for e in rule.exempt):
                continue
            if any(_under(imp.target, f) for f in rule.forbidden) and not any(
                _under(imp.target, a) for a in rule.allowed
            ):
                violations.append(Violation(imp.file, imp.line, imp.importer, imp.target, rule.describe()))
    return sorted(set(violations))


def subpackage_cycles(source_root: Path, package: str = PACKAGE) -> list[tuple[list[str], list[Import]]]:
    """The cycles of the subpackage graph: each strongly connected component of more than one node, with the
    imports that form its edges (the evidence to break one of them)."""
    edges: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    nodes: set[str] = set()
    for imp in find_imports(source_root, package):
        src, dst = subpackage_of(imp.importer), subpackage_of(imp.target)
        nodes |= {src, dst}
        if src != dst:
            edges[src][dst].append(imp)

    # Tarjan's strongly connected components (recursive: the graph has a few dozen nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            components.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    cycles = []
    for component in sorted(c for c in components if len(c) > 1):
        inside = set(component)
        evidence = [imp for src in component for dst, imps in edges[src].items() if dst in inside for imp in imps]
        cycles.append((component, sorted(evidence)))
    return cycles


def _report(lines: list[str]) -> str:
    return "\n  " + "\n  ".join(lines)


# --- the real tree ---------------------------------------------------------------------------------------------


def test_real_tree_keeps_the_layer_rules():
    violations = layer_violations(SOURCE_ROOT)
    assert not violations, _report([str(v) for v in violations])


def test_real_tree_has_no_subpackage_cycle():
    cycles = subpackage_cycles(SOURCE_ROOT)
    assert not cycles, _report(
        [" <-> ".join(nodes) + ": " + ", ".join(f"{i.file}:{i.line} -> {i.target}" for i in imps)
         for nodes, imps in cycles]
    )


def test_the_scan_sees_the_whole_package():
    """Guards the checks against passing vacuously (a wrong root or package name finds no imports)."""
    imports = find_imports(SOURCE_ROOT)
    importers = {subpackage_of(i.importer) for i in imports}
    assert {f"{PACKAGE}.model", f"{PACKAGE}.data", f"{PACKAGE}.parallel", f"{PACKAGE}.evals"} <= importers
    assert any(i.importer == f"{PACKAGE}.__main__" and i.target == f"{PACKAGE}.cli" for i in imports)


# --- the checks can fail -----------------------------------------------------------------------------------------


def test_a_planted_back_import_is_reported_exactly(tmp_path):
    """A copy of the real tree plus one upward import (parallel -> model) gives exactly one more violation."""
    shutil.copytree(SOURCE_ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    before = set(layer_violations(tmp_path))  # the tree may have violations of its own (mid-refactor)
    victim = sorted(p for p in (tmp_path / PACKAGE / "parallel").glob("*.py") if p.name != "__init__.py")[0]
    text = victim.read_text()
    line = text.count("\n") + (0 if text.endswith("\n") else 1) + 1
    victim.write_text(text + ("" if text.endswith("\n") else "\n") + f"from {PACKAGE}.model import module\n")

    after = set(layer_violations(tmp_path))
    assert before <= after
    file = victim.relative_to(tmp_path).as_posix()
    rule = RULES[0].describe()
    importer = f"{PACKAGE}.parallel.{victim.stem}"
    assert after - before == {Violation(file, line, importer, f"{PACKAGE}.model.module", rule)}


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_resolution_of_relative_lazy_and_submodule_imports(tmp_path):
    _write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from . import x\n",
        "pkg/a/x.py": "from ..b import y\nfrom .x import thing\n",
        "pkg/b/__init__.py": "",
        "pkg/b/y.py": "def f():\n    from pkg.a import x as ax\n    import pkg.c\n",
        "pkg/c.py": "from pkg.b import name_in_init, y\n",
    })
    found = {(i.file, i.line, i.importer, i.target) for i in find_imports(tmp_path, "pkg")}
    assert found == {
        ("pkg/a/__init__.py", 1, "pkg.a", "pkg.a.x"),
        ("pkg/a/x.py", 1, "pkg.a.x", "pkg.b.y"),
        ("pkg/a/x.py", 2, "pkg.a.x", "pkg.a.x"),
        ("pkg/b/y.py", 2, "pkg.b.y", "pkg.a.x"),  # inside a function
        ("pkg/b/y.py", 3, "pkg.b.y", "pkg.c"),
        ("pkg/c.py", 1, "pkg.c", "pkg.b"),  # a name defined in pkg/b/__init__.py
        ("pkg/c.py", 1, "pkg.c", "pkg.b.y"),
    }


def test_a_planted_cycle_is_reported(tmp_path):
    _write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/core.py": "def late():\n    from pkg.high import api\n",  # the back edge, hidden in a function
        "pkg/high/__init__.py": "",
        "pkg/high/api.py": "from pkg.low import core\nfrom pkg import leaf\n",
        "pkg/leaf.py": "",
    })
    cycles = subpackage_cycles(tmp_path, "pkg")
    assert [nodes for nodes, _ in cycles] == [["pkg.high", "pkg.low"]]
    assert [(i.file, i.line) for i in cycles[0][1]] == [("pkg/high/api.py", 1), ("pkg/low/core.py", 2)]
