"""The pipeline file: named phases, each an ordinary `fit` config plus overrides (see `run.py`).

    run_dir: runs/prolong-8b              # one directory per phase below it
    paths: {model: /path/to/Meta-Llama-3-8B-Instruct}   # free-form settings, for ${paths.x} interpolation
    phases:
      - name: stage1-64k
        config: [configs/prolong-8b/base.yaml, configs/prolong-8b/stage1-64k.yaml]
        overrides: {model.init_args.llama.name_or_path: "${paths.model}"}
      - name: stage2-512k
        config: [configs/prolong-8b/base.yaml, configs/prolong-8b/stage2-512k.yaml]
        carry_optimizer: true             # start from stage1-64k's export AND its AdamW moments

The file is read with OmegaConf and its `${...}` resolved first. A phase's fit config is built by the `fit`
parser itself (`run.phase_fit_args`): its files as repeated `--config`, then its overrides, its directory, the
model it starts from and its callbacks as command-line arguments; the parsed result is written to
`<run_dir>/<phase>/fit.yaml`, an ordinary config that `python -m prolong_lit fit --config` runs as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from prolong_lit.constants import DTYPES
from prolong_lit.errors import ConfigError, MissingPathError

PREVIOUS = "previous"  # init_from's default: the phase listed before this one


@dataclass
class PhaseConfig:
    """One phase: an ordinary `fit` run.

    Args:
        name: the phase's name: its directory under run_dir and its row in the summary.
        config: the fit config file(s) (LightningCLI YAML), merged in order (a later file replaces lists).
        overrides: dotted key -> value (e.g. `trainer.max_steps: 100`), given to the `fit` parser after the
            config files as `--key=value`.
        init_from: the earlier phase whose Hugging Face export this phase's model starts from (it becomes
            model.init_args.llama.name_or_path); `previous` (default): the phase listed before, none for the
            first; null: the config's own model.
        carry_optimizer: also copy the AdamW state of init_from's final checkpoint into this phase's optimizer,
            while the LR schedule and step count restart (ProLong's 64K -> 512K hand-off).
        callbacks: appended to the phase's trainer.callbacks: class_path/init_args entries, or YAML bundle files
            holding `trainer.callbacks` or `trainer.callbacks+` (e.g. callbacks/long_eval.yaml). Per-phase
            evaluation goes here.
        prepare: arguments of `python -m prolong_lit prepare` (e.g. [--config, configs/data/demo.yaml]), run
            before the phase when their output_dir holds no manifest.json yet.
        export: write the Hugging Face export at the phase end (a phase that a later one starts from needs it).
    """

    name: str
    config: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = PREVIOUS
    carry_optimizer: bool = False
    callbacks: list[Any] = field(default_factory=list)
    prepare: list[str] | None = None
    export: bool = True


@dataclass
class PipelineConfig:
    """A pipeline of phases run in order.

    Args:
        run_dir: the directory of the run: `<run_dir>/<phase>/` per phase, and the summary.
        phases: the phases, in order.
        export_dtype: weight dtype of each phase's export; the next phase starts from it, so float32 (default)
            keeps the trained weights exact, bfloat16 halves the size.
        paths: free-form settings (paths the user fills in), referenced elsewhere in the file as ${paths.name}.
    """

    run_dir: str
    phases: list[PhaseConfig]
    export_dtype: str = "float32"
    paths: dict[str, Any] = field(default_factory=dict)


def load_pipeline_config(path: str | Path, run_dir: str | None = None) -> PipelineConfig:
    """Read and check a pipeline file (its ${...} resolved); `run_dir` replaces the file's."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"--config: {str(path)!r} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # a YAML error or an interpolation that names no key
        raise ConfigError(f"--config: {str(path)!r} does not load: {err}") from err
    if not isinstance(raw, dict) or "phases" not in raw:
        raise ConfigError(f"--config: {str(path)!r} is not a pipeline file (it has no `phases` list)")
    if run_dir is not None:
        raw["run_dir"] = run_dir
    _check_keys(raw, PipelineConfig, "")
    if not raw.get("run_dir"):
        raise ConfigError("run_dir: set the directory the pipeline writes its phases into")
    if not isinstance(raw["phases"], list) or not raw["phases"]:
        raise ConfigError("phases: give a non-empty list of phases")
    phases = [_phase(entry, i) for i, entry in enumerate(raw["phases"])]
    config = PipelineConfig(**{**raw, "phases": phases})
    validate(config)
    return config


def _check_keys(raw: Any, schema: type, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the pipeline file'}: expected a mapping, got {type(raw).__name__}")
    known = [f.name for f in fields(schema)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(known)})")


def _phase(raw: Any, index: int) -> PhaseConfig:
    where = f"phases[{index}]."
    _check_keys(raw, PhaseConfig, where)
    for key in ("name", "config"):
        if not raw.get(key):
            raise ConfigError(f"{where}{key}: required")
    raw = dict(raw)
    raw["config"] = [raw["config"]] if isinstance(raw["config"], str) else list(raw["config"])
    for key, kind in (("overrides", dict), ("callbacks", list), ("prepare", list)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise ConfigError(f"{where}{key}: expected a {kind.__name__}, got {raw[key]!r}")
    return PhaseConfig(**raw)


def validate(config: PipelineConfig) -> None:
    """Every cross-phase rule, checked before anything runs; errors name the setting to fix."""
    if config.export_dtype not in DTYPES:
        raise ConfigError(f"export_dtype: {config.export_dtype!r} is not one of {', '.join(DTYPES)}")
    names = [phase.name for phase in config.phases]
    for i, phase in enumerate(config.phases):
        where = f"phases[{i}] ({phase.name})"
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", str(phase.name)):
            raise ConfigError(f"phases[{i}].name: {phase.name!r} must be a directory name (letters, digits, _ . -)")
        if phase.name in names[:i]:
            raise ConfigError(f"phases[{i}].name: {phase.name!r} is used by an earlier phase; names must be unique")
        for file in phase.config:
            if not Path(file).is_file():
                raise MissingPathError(f"{where}.config: {file!r} does not exist")
        for key in phase.overrides:
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
                raise ConfigError(f"{where}.overrides: {key!r} is not a dotted key like trainer.max_steps")
        for j, entry in enumerate(phase.callbacks):
            if isinstance(entry, str) and not Path(entry).is_file():
                raise MissingPathError(f"{where}.callbacks[{j}]: {entry!r} does not exist")
            if not isinstance(entry, str) and not (isinstance(entry, dict) and "class_path" in entry):
                raise ConfigError(f"{where}.callbacks[{j}]: give a YAML bundle file or a class_path/init_args entry")
        source = init_source(config, i)
        if source is not None and source not in names[:i]:
            later = source in names
            raise ConfigError(
                f"{where}.init_from: {source!r} is {'a later phase' if later else 'not a phase of this pipeline'}; "
                f"a phase starts from an EARLIER phase (here: {', '.join(names[:i]) or 'none'}) or from null"
            )
        if source is not None and not config.phases[names.index(source)].export:
            raise ConfigError(f"{where}.init_from: phase {source!r} has export: false; the next phase starts from it")
        if phase.carry_optimizer and source is None:
            raise ConfigError(f"{where}.carry_optimizer: needs init_from (the phase whose optimizer state to carry)")


def init_source(config: PipelineConfig, index: int) -> str | None:
    """The name of the phase that phase `index` starts from, or None."""
    init_from = config.phases[index].init_from
    if init_from == PREVIOUS:
        return config.phases[index - 1].name if index > 0 else None
    return init_from


def callback_entries(phase: PhaseConfig) -> list[dict[str, Any]]:
    """The phase's extra callbacks: entries as given, bundle files expanded to the entries they list."""
    entries = []
    for entry in phase.callbacks:
        if isinstance(entry, str):
            trainer = (yaml.safe_load(Path(entry).read_text()) or {}).get("trainer") or {}
            listed = trainer.get("callbacks", trainer.get("callbacks+"))
            if not isinstance(listed, list):
                raise ConfigError(f"phase {phase.name!r}.callbacks: {entry!r} holds no trainer.callbacks list")
            entries.extend(listed)
        else:
            entries.append(entry)
    return entries


def write_yaml_text(text: str, path: Path) -> None:
    """Write `text` atomically (every rank of a multi-process run may write the same file)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(text)
    os.replace(scratch, path)
