"""Which checkpoint a run resumes from: the newest one that loads, never silently none.

`checkpoint_problem` tells cheaply whether a checkpoint loads (a single file: its zip directory, which a truncated
file lacks, and its pickle with the tensors memory-mapped, not read; a distributed checkpoint: its index,
`meta.pt`, and every shard file at least as long as the index says). `newest_loadable` picks the newest checkpoint
that loads, warns naming each newer one that does not and the one resumed from instead (and moves the damaged one
aside to `<name>.unloadable`, so that the resumed run can write that name again), and raises a CheckpointError
naming them all when none loads: a damaged checkpoint never makes a run start silently from sample 0.
`resolve_resume_path` applies this to `fit --ckpt_path last` / `hpc` and a Slurm requeue (ProLongCLI.before_fit);
the pipeline applies it to an interrupted phase.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from prolong_lit.checkpoint import DCP_INDEX_FILE, DCP_META_FILE, torch_load
from prolong_lit.checkpoint_io import RUN_FOLDERS, check_writable, clean_partials, remove_path
from prolong_lit.errors import CheckpointError

log = logging.getLogger(__name__)

UNLOADABLE_SUFFIX = ".unloadable"  # where a resume moves a checkpoint that does not load
HPC_RE = re.compile(r"hpc_ckpt_(\d+)\.ckpt")  # Lightning's Slurm requeue checkpoints, in trainer.default_root_dir


def checkpoint_problem(path: str | Path) -> str | None:
    """None if the checkpoint at `path` loads, else why it does not (a phrase). Cheap: a single file is opened
    memory-mapped (the tensors are not read), a distributed checkpoint's shard files are only measured."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return _distributed_problem(path)
    try:
        with zipfile.ZipFile(path) as archive:  # the zip directory is written last: a truncated file has none
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"is truncated or not a checkpoint ({err})"
    try:
        checkpoint = torch_load(path)
    except Exception as err:  # noqa: BLE001 - any failure to load is the answer
        return f"does not load ({type(err).__name__}: {err})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "is not a Lightning checkpoint (no state_dict)"
    return None


def _distributed_problem(path: Path) -> str | None:
    """Whether a torch.distributed.checkpoint directory is whole: its index and meta.pt load, and every shard
    file the index refers to is there and at least as long as the bytes it is said to hold."""
    for name in (DCP_INDEX_FILE, DCP_META_FILE):
        if not (path / name).is_file():
            return f"is a directory without {name} (not a finished distributed checkpoint)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata()
        torch_load(path / DCP_META_FILE)
    except Exception as err:  # noqa: BLE001
        return f"does not load ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        size = shard.stat().st_size if shard.is_file() else -1
        if size < end:
            return f"has a missing or truncated shard {name} ({max(size, 0)} of {end} bytes)"
    return None


def modified(path: Path) -> float:
    """Modification time of a checkpoint file, or of the newest file of a distributed checkpoint directory."""
    if path.is_dir():
        return max((child.stat().st_mtime for child in path.rglob("*") if child.is_file()), default=0.0)
    return path.stat().st_mtime


def is_checkpoint(path: Path) -> bool:
    """A visible `*.ckpt` file, or a distributed-checkpoint directory (named like one, or holding meta.pt)."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return path.suffix == ".ckpt" or (path / DCP_META_FILE).exists()
    return path.suffix == ".ckpt"


def find_checkpoints(checkpoint_dirs: Iterable[str | Path], root_dir: str | Path | None = None) -> list[Path]:
    """Every checkpoint a run may resume from: those in its ModelCheckpoint folders, and the Slurm requeue
    checkpoints (`hpc_ckpt_<N>.ckpt`) in its root directory; newest first."""
    found: set[Path] = set()
    for directory in checkpoint_dirs:
        directory = Path(directory)
        if directory.is_dir():
            found |= {entry for entry in directory.iterdir() if is_checkpoint(entry)}
    if root_dir is not None and Path(root_dir).is_dir():
        found |= {entry for entry in Path(root_dir).iterdir() if HPC_RE.fullmatch(entry.name)}
    # newest first; at equal times (last.ckpt is written right after the step's own file) the later name
    return sorted(found, key=lambda p: (modified(p), p.name), reverse=True)


FIT_FIX = "delete them to start from scratch, or pass --ckpt_path with an intact checkpoint"


def newest_loadable(candidates: list[Path], what: str, fix: str = FIT_FIX, move_aside: bool = True) -> Path | None:
    """The first of `candidates` (newest first) that loads; None if there are none.

    Each newer one that does not load is named in a warning (with the one resumed from instead) and, with
    `move_aside`, renamed to `<name>.unloadable` on global rank 0 so that the resumed run can write that name
    again. A CheckpointError naming every candidate when none loads: `what` names the setting or folder, `fix`
    what to do."""
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if bad:
                _set_aside(bad, path, move_aside)
            return path
        bad.append((path, problem))
    if bad:
        listing = "; ".join(f"{str(p)!r} {why}" for p, why in bad)
        raise CheckpointError(
            f"{what}: no checkpoint to resume from loads: {listing}; {fix}"
        )
    return None


def unloadable_path(path: Path) -> Path:
    """Where a checkpoint that does not load is kept: `<name>.unloadable`; `hpc_ckpt_<N>` becomes `hpc-ckpt-<N>`,
    since Lightning finds requeue checkpoints by the text "hpc_ckpt_" in a name and would resume this one."""
    return path.with_name(path.name.replace("hpc_ckpt_", "hpc-ckpt-") + UNLOADABLE_SUFFIX)


def _set_aside(bad: list[tuple[Path, str]], chosen: Path, move_aside: bool) -> None:
    for path, problem in bad:
        target = unloadable_path(path)
        if rank_zero_only.rank == 0:
            if move_aside:
                remove_path(target)
                os.replace(path, target)
            log.warning(
                "checkpoint %s %s; resuming from the older %s instead%s", path, problem, chosen,
                f" (the damaged file is kept as {target})" if move_aside else "",
            )


def resolve_resume_path(ckpt_path: str | None, trainer: Any) -> str | None:
    """The checkpoint `trainer.fit(ckpt_path=...)` should load. `last` and `hpc`, and in a Slurm job a run that
    left requeue checkpoints (`hpc_ckpt_<N>.ckpt`), take the newest checkpoint that loads among the run's
    ModelCheckpoint folders and its root directory (`newest_loadable`); other values pass through (an explicit
    path is checked where the config is parsed). First, a folder the run cannot write is refused
    (`check_writable`) and partial writes of a killed run are removed (rank 0)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    root = Path(trainer.default_root_dir)
    for folder in dict.fromkeys([root, *folders]):
        check_writable(folder, "trainer.default_root_dir" if folder == root else RUN_FOLDERS)
        if rank_zero_only.rank == 0:
            clean_partials(folder)
    requeued = ckpt_path is None and SLURMEnvironment.detect()  # Lightning would resume its hpc_ckpt_<N>
    if ckpt_path not in ("last", "hpc") and not requeued:
        return ckpt_path
    candidates = find_checkpoints(folders, root)
    if requeued and not any(HPC_RE.fullmatch(path.name) for path in candidates):
        return None  # a first submission, not a requeued job
    where = ", ".join(str(folder) for folder in dict.fromkeys([*folders, root]))
    chosen = newest_loadable(candidates, f"--ckpt_path {ckpt_path or 'hpc (Slurm requeue)'} (in {where})")
    if chosen is None:
        return ckpt_path  # nothing saved yet: Lightning says so ("last" starts fresh with a warning)
    log.info("resuming from %s", chosen)
    return str(chosen)
