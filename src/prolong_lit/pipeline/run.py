"""`pipeline`: run the named phases of a pipeline file in order, resumably.

    python -m prolong_lit pipeline --config configs/demo/pipeline.yaml [--run_dir DIR]

Each phase is an ordinary `fit` (see `config.py` for the file): the `fit` parser builds its complete config
(`phase_fit_args`), which is written to `<run_dir>/<phase>/fit.yaml` and run in this process by the same
LightningCLI as `fit`. A phase that starts from an earlier one gets that phase's Hugging Face export as its model
(`model.llama.name_or_path`); with `carry_optimizer` it also gets that phase's AdamW moments while its LR schedule
and step count restart (the `CarryOptimizerState` callback's `checkpoint`). At the end of a phase: its final
checkpoint (`checkpoints/final.ckpt`, saved whatever the checkpoint interval), its export (`export/`), and
`phase.json` (steps, tokens, final losses, eval scores), written last: the marker of a finished phase. The
numbers travel inside every checkpoint of the phase (`phase_stats.FitStats`), so a phase killed right after its
final checkpoint still reports them. At the end of the run, `summary.md` / `summary.json` tabulate every phase.
Every file is written atomically (a hidden file fsynced, then renamed: `prolong_lit.checkpoint_io`).

Re-running the same command skips finished phases, exports a phase whose training finished but whose export did
not, and resumes an interrupted phase from its newest checkpoint that loads (`checkpoints/*.ckpt`, or the
`hpc_ckpt_<N>.ckpt` a Slurm requeue wrote; a damaged newer one is named in a warning and set aside, and if none
loads the run stops with an error naming them rather than training from scratch). A phase whose data preparation
was interrupted prepares it again. Under several processes (torchrun, srun, or Lightning's own launcher, which
re-runs this command per device) every rank runs this loop; files other than the fit configs are written by global
rank 0, and ranks meet at a barrier after each phase.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prolong_lit.callbacks.optimizer_handoff import CarryOptimizerState
from prolong_lit.checkpoint_io import atomic_write
from prolong_lit.checkpoint_resume import UNLOADABLE_SUFFIX, checkpoint_problem, find_checkpoints, newest_loadable
from prolong_lit.errors import ConfigError, DataError, MissingPathError
from prolong_lit.pipeline.config import PhaseConfig, PipelineConfig, callback_entries, init_source, write_yaml_text
from prolong_lit.pipeline.phase_stats import SUMMARY_METRICS, FitStats, read_fit_stats

log = logging.getLogger(__name__)

FIT_CONFIG = "fit.yaml"
MARKER = "phase.json"
LEGACY_FIT_STATS = ".fit-stats.json"  # where runs before FitStats kept the numbers of a finished fit
FINAL_CHECKPOINT = "final.ckpt"
LAST_CHECKPOINT = "last.ckpt"
EXPORT_DIR = "export"


@dataclass
class PhaseResult:
    """What a finished phase did: the row of the summary, also its `phase.json` marker."""

    name: str
    steps: int
    tokens: int | None
    metrics: dict[str, float]
    export: str | None
    checkpoint: str
    config_digest: str
    seconds: float = 0.0
    actions: list[str] = field(default_factory=list)  # this invocation: skipped / trained / resumed / exported


class PhaseIncomplete(RuntimeError):
    """A phase's training stopped before trainer.max_steps (a callback or signal asked it to stop)."""


def is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def phase_dir(config: PipelineConfig, name: str) -> Path:
    return Path(config.run_dir) / name


def read_marker(directory: Path) -> PhaseResult | None:
    """The phase's result if it finished (marker written and its export, if any, present)."""
    marker = directory / MARKER
    if not marker.is_file():
        return None
    result = PhaseResult(**json.loads(marker.read_text()))
    if result.export is not None and not (Path(result.export) / "config.json").is_file():
        return None
    return result


def run_pipeline(config: PipelineConfig) -> list[PhaseResult]:
    """Run (or skip, or resume) every phase in order; returns one result per phase and writes the summary."""
    finished_before = [read_marker(phase_dir(config, phase.name)) for phase in config.phases]
    # every unfinished phase's config is parsed (and checked) before the first phase trains
    fit_configs = [None if finished else parse_phase(config, i) for i, finished in enumerate(finished_before)]
    results = []
    for i, phase in enumerate(config.phases):
        directory = phase_dir(config, phase.name)
        fit_config = fit_configs[i]
        finished = finished_before[i]
        if finished is not None:
            if finished.config_digest != _digest_or_none(config, i):
                log.warning("phase %s finished earlier with a different config; keeping it (delete %s to rerun it)",
                            phase.name, directory)
            log.info("phase %s: finished earlier, skipped", phase.name)
            finished.actions = ["skipped"]
            results.append(finished)
            continue
        check_inputs(config, i)
        results.append(run_phase(config, i, directory, fit_config))
        barrier()  # the next phase reads this one's export
    if is_rank_zero():
        write_summary(Path(config.run_dir), results)
    return results


def phase_fit_args(config: PipelineConfig, index: int) -> list[str]:
    """The `fit` arguments of phase `index`: its config files, its overrides, then the pipeline's settings of the
    phase (its root directory, the export it starts from, the optimizer state it carries, its callbacks)."""
    phase = config.phases[index]
    args = [f"--config={file}" for file in phase.config]
    # as on the command line: a string as it is (JSON would keep its quotes in a str setting), the rest as JSON
    args += [f"--{key}={value if isinstance(value, str) else json.dumps(value)}"
             for key, value in phase.overrides.items()]
    args.append(f"--trainer.default_root_dir={phase_dir(config, phase.name)}")
    source = init_source(config, index)
    carry = None
    if source is not None:
        args.append(f"--model.init_args.llama.name_or_path={phase_dir(config, source) / EXPORT_DIR}")
        if phase.carry_optimizer:
            carry = str(phase_dir(config, source) / "checkpoints" / FINAL_CHECKPOINT)
    # every phase records its optimizer's parameter names, so that a later phase can carry its moments
    handoff = {"class_path": f"{CarryOptimizerState.__module__}.{CarryOptimizerState.__qualname__}",
               "init_args": {"checkpoint": carry}}
    args += [f"--trainer.callbacks+={json.dumps(entry)}" for entry in (handoff, *callback_entries(phase))]
    return args


def parse_phase(config: PipelineConfig, index: int) -> str:
    """Phase `index`'s complete fit config as YAML, parsed and checked by the `fit` parser (nothing is built);
    a clear error naming the phase if it does not parse."""
    from prolong_lit.trainer_cli import ProLongCLI

    phase = config.phases[index]
    try:
        cli = ProLongCLI(args=phase_fit_args(config, index), parse_only=True)
    except Exception as err:  # jsonargparse's ArgumentError / ValueError name the bad key
        message = str(err).strip().splitlines()
        raise ConfigError(
            f"phases[{index}] ({phase.name}): its fit config does not parse (config {phase.config} + overrides): "
            + " ".join(line.strip() for line in message[:3])
        ) from err
    _check_resumable(phase, cli.config.trainer.callbacks or [])
    return cli.dump_config()


def config_digest(fit_config: str) -> str:
    return hashlib.sha256(fit_config.encode()).hexdigest()[:16]


def _digest_or_none(config: PipelineConfig, index: int) -> str | None:
    """The digest of a finished phase's config today; None when it no longer parses (it is skipped anyway)."""
    try:
        return config_digest(parse_phase(config, index))
    except ValueError:
        return None


def check_inputs(config: PipelineConfig, index: int) -> None:
    """Before phase `index` builds anything: the export it starts from exists, and so does the optimizer state
    it carries (readable, with its parameter names)."""
    source = init_source(config, index)
    if source is None:
        return
    where = f"phases[{index}] ({config.phases[index].name})"
    export = phase_dir(config, source) / EXPORT_DIR
    if not (export / "config.json").is_file():
        raise MissingPathError(f"{where}.init_from: phase {source!r} has no export at {str(export)!r}")
    if config.phases[index].carry_optimizer:
        from prolong_lit.callbacks.optimizer_handoff import saved_state_shapes

        checkpoint = phase_dir(config, source) / "checkpoints" / FINAL_CHECKPOINT
        if not checkpoint.exists():
            raise MissingPathError(
                f"{where}.carry_optimizer: phase {source!r}'s final checkpoint {str(checkpoint)!r} (the optimizer "
                "state to carry) is missing; restore it, or set carry_optimizer: false"
            )
        saved_state_shapes(checkpoint)  # raises if it holds no usable optimizer state


def prepare_data(config: PipelineConfig, index: int) -> None:
    """Run the phase's `prepare` arguments unless their output_dir already holds prepared data (rank 0 only:
    the other ranks wait in the process-group set-up of the phase's fit). An output_dir left by an interrupted
    preparation (prepare's incomplete marker, no manifest) is prepared again, as a rerun resumes the pipeline; a
    non-empty folder that is not prepared data is refused, naming the phase's setting."""
    phase = config.phases[index]
    if not phase.prepare or not is_rank_zero():
        return
    from prolong_lit.data.format import MANIFEST_NAME
    from prolong_lit.data.prepare import INCOMPLETE_MARKER, parse_config, prepare

    data_config, overwrite = parse_config([str(arg) for arg in phase.prepare])
    output = Path(data_config.output_dir)
    if (output / MANIFEST_NAME).is_file() and not overwrite:
        log.info("phase %s: data at %s is prepared", phase.name, output)
        return
    if output.is_dir() and not overwrite:
        if (output / INCOMPLETE_MARKER).exists() or not any(output.iterdir()):
            log.warning("phase %s: %s holds an interrupted preparation (%s, no %s); preparing it again",
                        phase.name, output, INCOMPLETE_MARKER, MANIFEST_NAME)
            overwrite = True
        else:
            raise DataError(
                f"phases[{index}] ({phase.name}).prepare: its output_dir {str(output)!r} exists but holds no "
                f"{MANIFEST_NAME} (it is not prepared data); remove that folder, or give another --output_dir "
                "in the phase's prepare list, then run the pipeline again"
            )
    elif output.exists() and not output.is_dir():
        raise DataError(f"phases[{index}] ({phase.name}).prepare: its output_dir {str(output)!r} is a file")
    log.info("phase %s: preparing %s", phase.name, output)
    prepare(data_config, overwrite=overwrite)


def resume_checkpoint(directory: Path) -> Path | None:
    """Where an interrupted phase resumes: the newest checkpoint that loads among `checkpoints/*.ckpt` and the
    `hpc_ckpt_<N>.ckpt` a Slurm requeue writes into the phase directory (Lightning's default_root_dir). A newer
    one that does not load is named in a warning and set aside (`checkpoint_resume.newest_loadable`); None when the
    phase saved none; a CheckpointError naming them when none loads."""
    candidates = [path for path in find_checkpoints([directory / "checkpoints"], directory)
                  if path.name != FINAL_CHECKPOINT]
    fix = "delete them (or the phase's folder) to train the phase from its start"
    return newest_loadable(candidates, f"the interrupted phase in {str(directory)!r}", fix)


def _final_checkpoint(directory: Path) -> Path | None:
    """The phase's final checkpoint if it was saved and loads; a damaged one is set aside (the phase resumes)."""
    final = directory / "checkpoints" / FINAL_CHECKPOINT
    if not final.exists():
        return None
    problem = checkpoint_problem(final)
    if problem is None:
        return final
    if is_rank_zero():
        target = final.with_name(final.name + UNLOADABLE_SUFFIX)
        os.replace(final, target)
        log.warning("final checkpoint %s %s; kept as %s, the phase resumes from its newest intact checkpoint",
                    final, problem, target)
    barrier()
    return None


def run_phase(config: PipelineConfig, index: int, directory: Path, fit_config: str) -> PhaseResult:
    """Train (or resume) one phase, then save its final checkpoint, export it and write its marker."""
    phase = config.phases[index]
    started = time.perf_counter()
    final = directory / "checkpoints" / FINAL_CHECKPOINT
    actions: list[str] = []
    if _final_checkpoint(directory) is not None:  # trained earlier; the export or the marker is missing
        steps, tokens, metrics = _saved_fit_stats(directory, final)
    else:
        last = resume_checkpoint(directory)
        prepare_data(config, index)
        fit_path = directory / FIT_CONFIG
        write_yaml_text(fit_config, fit_path)
        if last is not None:
            actions.append("resumed")
            log.info("phase %s: resuming from %s", phase.name, last)
        else:
            actions.append("trained")
            log.info("phase %s: training (%s)", phase.name, fit_path)
        steps, tokens, metrics = _fit(phase, fit_path, last, final)
    export = None
    if phase.export:
        export = directory / EXPORT_DIR
        if is_rank_zero():
            from prolong_lit.checkpoint import export_hf

            export_hf(final, export, dtype=config.export_dtype, overwrite=True)
            actions.append("exported")
    result = PhaseResult(
        name=phase.name, steps=steps, tokens=tokens, metrics=metrics, export=None if export is None else str(export),
        checkpoint=str(final), config_digest=config_digest(fit_config), seconds=round(time.perf_counter() - started, 1),
        actions=actions,
    )
    if is_rank_zero():
        write_json(result.__dict__, directory / MARKER)
    log.info("phase %s: finished (%s) in %.0f s", phase.name, ", ".join(actions), result.seconds)
    return result


def _fit(phase: PhaseConfig, fit_path: Path, resume: Path | None,
         final: Path) -> tuple[int, int | None, dict[str, float]]:
    """Run `fit --config fit_path [--ckpt_path resume]` in this process; save the final checkpoint; return
    (steps, tokens, final metrics)."""
    from prolong_lit.trainer_cli import ProLongCLI

    cli = ProLongCLI(args=["--config", str(fit_path)], run=False)
    trainer = cli.trainer
    fit_stats = FitStats()  # the phase's numbers, in every checkpoint it saves (final.ckpt included)
    trainer.callbacks.append(fit_stats)
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=None if resume is None else str(resume))
    if trainer.interrupted or trainer.global_step < trainer.max_steps:
        raise PhaseIncomplete(
            f"phase {phase.name!r} stopped at step {trainer.global_step} of {trainer.max_steps}; run the same "
            "command again to resume it from its last checkpoint"
        )
    # collective; the hand-off callback records the parameter names in it, FitStats the numbers below
    trainer.save_checkpoint(final)
    stats = fit_stats.stats(trainer)
    del cli, trainer, fit_stats
    gc.collect()
    return stats["steps"], stats["tokens"], stats["metrics"]


def _check_resumable(phase: PhaseConfig, callbacks: list) -> None:
    """An interrupted phase resumes from `<phase>/checkpoints/last.ckpt`: its trainer needs one ModelCheckpoint
    that writes there (no dirpath: it follows trainer.default_root_dir) with save_last."""
    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = [c for c in callbacks if isinstance(c, Namespace) and issubclass(_class(c.class_path), ModelCheckpoint)]
    args = saving[0].get("init_args") or Namespace() if len(saving) == 1 else None
    if args is None or args.get("dirpath") is not None or not args.get("save_last"):
        raise ConfigError(
            f"phase {phase.name!r}: the pipeline resumes an interrupted phase from checkpoints/{LAST_CHECKPOINT} in "
            "its directory; its trainer.callbacks need exactly one ModelCheckpoint, with save_last: true and no "
            f"dirpath (it then follows trainer.default_root_dir); found {len(saving)}"
            + ("" if args is None else f" (dirpath {args.get('dirpath')}, save_last {args.get('save_last')})")
        )


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _saved_fit_stats(directory: Path, final: Path) -> tuple[int, int | None, dict[str, float]]:
    """The numbers of a phase trained earlier: from its final checkpoint (FitStats), else from the file that
    runs before FitStats wrote; a warning when neither has them."""
    stats = read_fit_stats(final)
    legacy = directory / LEGACY_FIT_STATS
    if stats is None and legacy.is_file():
        stats = json.loads(legacy.read_text())
    if stats is None:
        log.warning("phase %s: %s records no step count or losses; the summary shows none", directory.name, final)
        return 0, None, {}
    return stats["steps"], stats["tokens"], stats["metrics"]


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as JSON atomically (fsynced, then renamed into place)."""
    write_text_atomically(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def write_text_atomically(text: str, path: Path) -> None:
    atomic_write(path, lambda file: file.write(text.encode()), what="the pipeline record")


# ---- summary ------------------------------------------------------------------------------------------------


def summary_table(results: list[PhaseResult]) -> str:
    """A Markdown table: one row per phase; steps, tokens, final train/val loss, then the eval scores: the
    category averages (`eval/<category>`) when there are any, else every `eval/<task>@<length>` (all of them are
    in summary.json and in each phase's evaluation report)."""
    evals = sorted({key for r in results for key in r.metrics if key.startswith("eval/")})
    evals = [key for key in evals if "@" not in key] or evals
    header = ["phase", "steps", "tokens", *SUMMARY_METRICS, *evals]
    rows = [header, ["---"] * len(header)]
    for r in results:
        values = [r.metrics.get(key) for key in (*SUMMARY_METRICS, *evals)]
        rows.append([r.name, str(r.steps), _tokens(r.tokens), *(_number(v) for v in values)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def _tokens(tokens: int | None) -> str:
    if tokens is None:
        return "-"
    for unit, size in (("B", 2**30), ("M", 2**20), ("K", 2**10)):  # binary prefixes, as the paper
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def write_summary(run_dir: Path, results: list[PhaseResult]) -> None:
    table = summary_table(results)
    write_text_atomically(table, run_dir / "summary.md")
    write_json({"phases": [r.__dict__ for r in results]}, run_dir / "summary.json")
    log.info("pipeline summary (%s):\n%s", run_dir / "summary.md", table)
