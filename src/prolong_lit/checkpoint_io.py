"""Checkpoints that are whole or absent: how every checkpoint of a run is written.

Lightning's own writer (fsspec's transaction) writes into a temporary file under $TMPDIR and moves it into place;
when the checkpoint folder is on another filesystem, that move is a copy, and a job killed during the copy (a time
limit, a preemption) or a disk that fills leaves a truncated checkpoint, often `last.ckpt` over an intact older
one. Here every checkpoint is written into a hidden file beside its destination (`.<name>.partial-<pid>`), flushed
and fsynced, then renamed over the destination (`os.replace`, atomic on one filesystem): a reader sees the old
checkpoint or the new one, never half of one (`AtomicCheckpointIO`, which ProLongCLI gives every trainer). A
distributed checkpoint (a directory of shards, FSDP2Strategy) is written the same way into a hidden directory that
is renamed into place (`save_distributed_atomically`). Leftovers of a killed process are removed at the next save
in the same folder and when a run starts (`clean_partials`).

A full disk, a read-only folder or a permission error while writing becomes one CheckpointError naming the path
and the setting that chooses another place (`storage_error`); `check_writable` refuses such a folder before a run
starts. Which checkpoint a resume picks is `checkpoint_resume`'s concern.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prolong_lit.checkpoint import DCP_META_FILE
from prolong_lit.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

PARTIAL_RE = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)")  # a write in progress, or a killed one's leftover
REPLACED_SUFFIX = ".replaced"  # `.<name>.replaced`: a distributed checkpoint being swapped out (see below)
OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) quote an errno
# errno values that mean "this place cannot take the file" rather than a bug: disk full, quota, read-only, denied
STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for that filesystem",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


# ---- writing ------------------------------------------------------------------------------------------------


def partial_path(path: Path) -> Path:
    """The hidden name a checkpoint is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


RUN_FOLDERS = "trainer.default_root_dir, or the ModelCheckpoint's dirpath"


def storage_cause(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, one it was raised from or during, one rank's in a torch.distributed
    CheckpointException (rank -> (error, trace)), or the errno a library quotes (safetensors: "(os error 28)")."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        for failure in (getattr(err, "failures", None) or {}).values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, OSError):
                return cause
        if match := OS_ERROR_RE.search(str(err)):
            number = int(match.group(1))
            return OSError(number, os.strerror(number))
        err = err.__cause__ or err.__context__
    return None


def storage_error(err: BaseException, path: str | Path, what: str = "the checkpoint",
                  setting: str = RUN_FOLDERS) -> CheckpointError | None:
    """A CheckpointError naming `path` (and `setting`, where to choose another place) when `err` means the place
    cannot take the file (disk full, read-only, no permission: `storage_cause`); None for anything else (a bug,
    to re-raise as it is, as is a UserError already)."""
    if isinstance(err, UserError):
        return None
    err = storage_cause(err)
    reason = None if err is None else STORAGE_ERRNOS.get(err.errno or 0)
    if reason is None:
        return None
    where = f" ({err.strerror}: {str(err.filename)!r})" if err.filename else f" ({err.strerror})"
    return CheckpointError(
        f"cannot write {what} {str(path)!r}: {reason}{where}; free space or fix the permissions there, or choose "
        f"another folder ({setting}); what was written there before is intact"
    )


def check_writable(folder: Path, setting: str) -> None:
    """Refuse, before anything runs, a folder that cannot be written (read-only, no permission), naming `setting`.
    Nothing is created: a missing folder is checked through its nearest existing parent (the run creates it
    later), so a run refused for another reason leaves no empty folders behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = partial_path(existing / "write-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        error = storage_error(err, folder, "into the folder", setting)
        if error is None:
            raise
        raise error from err


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: torch.save's C++ writer turns it into a
    RuntimeError without the errno ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def atomic_write(path: str | Path, write: Callable[[Any], None], what: str = "the checkpoint") -> None:
    """Call `write(file)` on a hidden file beside `path`, fsync it and rename it to `path`. On any failure the
    hidden file is removed and `path` is left as it was; a full or read-only disk raises a CheckpointError."""
    path = Path(path)
    scratch = partial_path(path)
    recording = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_partials(path.parent)
        with open(scratch, "wb") as file:
            recording = _RecordingFile(file)
            write(recording)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
        fsync_dir(path.parent)
    except BaseException as err:  # an interrupt too: leave no partial file behind
        scratch.unlink(missing_ok=True)
        cause = getattr(recording, "error", None) or err
        if (error := storage_error(cause, path, what)) is not None:
            raise error from err
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda file: torch.save(obj, file))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing local checkpoints atomically in their own folder (`atomic_write`)
    instead of through a temporary file elsewhere. Remote URLs (s3://, ...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def save_distributed_atomically(save: Callable[[Path], None], path: Path, strategy: Any) -> None:
    """Run `save(staging)` (a collective that writes a distributed checkpoint directory) into a hidden directory
    beside `path`, then let global rank 0 swap it into place: the old checkpoint (file or directory) is renamed
    to `.<name>.replaced`, the new one to `path`, the old one removed. A kill between the two renames leaves
    the old one as `.<name>.replaced`, which `clean_partials` puts back at the next start (the new one, not in
    place yet, is dropped with the other partial writes)."""
    staging = path.with_name(f".{path.name}.partial-{strategy.broadcast(os.getpid())}")  # rank 0's pid, all ranks
    if strategy.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_partials(path.parent)
    strategy.barrier("checkpoint_staging")
    try:
        save(staging)
        strategy.barrier("checkpoint_saved")
        if strategy.is_global_zero:
            _fsync_file(staging / DCP_META_FILE)  # DCP fsyncs its shards; meta.pt is Lightning's plain torch.save
            _swap_into_place(staging, path)
    except BaseException as err:  # torch.distributed.checkpoint raises a CheckpointException (a BaseException)
        if strategy.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
        if (error := storage_error(err, path)) is not None:
            raise error from err
        raise
    strategy.barrier("checkpoint_in_place")


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _swap_into_place(staging: Path, path: Path) -> None:
    replaced = path.with_name(f".{path.name}{REPLACED_SUFFIX}")
    if path.exists() and replaced.exists():  # an older swap's leftover: the one at `path` is newer
        remove_path(replaced)
    if path.exists():
        os.replace(path, replaced)
    os.replace(staging, path)
    fsync_dir(path.parent)
    remove_path(replaced)


def remove_path(path: Path) -> None:
    """Remove a checkpoint file or a distributed-checkpoint directory, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one checkpoint at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(directory: str | Path) -> list[Path]:
    """Remove the leftovers of killed checkpoint writes in `directory` (partial files and directories of
    processes no longer running); restore a distributed checkpoint whose swap was interrupted. Returns what was
    removed. Call it on global rank 0 only: other ranks may be writing into a partial directory."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.endswith(REPLACED_SUFFIX) and entry.name.startswith("."):
            final = entry.with_name(entry.name[1:-len(REPLACED_SUFFIX)])
            if not final.exists():  # killed between the two renames: the old checkpoint goes back
                os.replace(entry, final)
            else:
                remove_path(entry)
                removed.append(entry)
            continue
        match = PARTIAL_RE.fullmatch(entry.name)
        if match and not _alive(int(match["pid"])):
            remove_path(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d partial checkpoint write(s) of a killed run in %s", len(removed), directory)
    return removed
