"""Checkpoints under faults, through the real command line: a kill during a save across two filesystems, a
truncated checkpoint where resume looks, a full or read-only disk under `fit` and `export`, two run roots.

Each case runs `python -m prolong_lit ...` in its own process (tests/helpers/fault_helpers.py) with a time limit,
and asserts the exit status, that the message names the file or setting, and, for a refusal, that the folders
are unchanged. The filesystem cases mount a tmpfs (root only; skipped otherwise): checkpoints on another
filesystem than $TMPDIR, a disk too small for a checkpoint, a read-only folder. The tiny demo model's checkpoint
is 198 MB (its 128K-token embedding and LM head, with AdamW's two moments).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from prolong_lit.checkpoint_io import clean_partials, save_distributed_atomically
from prolong_lit.checkpoint_resume import UNLOADABLE_SUFFIX, checkpoint_problem, find_checkpoints
from tests.helpers.data_factory import write_prepared
from tests.helpers.fault_helpers import (
    assert_refused,
    is_root,
    kill_when,
    mount_tmpfs,
    run_command,
    snapshot,
)
from tests.helpers.run_helpers import CHECKPOINTS, DOMAINS, LOGS, SEQ_LEN, demo_config, run_dir

pytestmark = pytest.mark.reliability
needs_root = pytest.mark.skipif(not is_root(), reason="mounting a tmpfs needs root")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepared")
    write_prepared(path, DOMAINS, seq_len=SEQ_LEN)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """The root of a finished 4-step fit: checkpoints/step000002.ckpt, step000004.ckpt, last.ckpt (= step 4).
    Tests only read it (or copy it)."""
    tmp = tmp_path_factory.mktemp("trained")
    result = run_command(["fit", "--config", demo_config(tmp, data_dir, "run", max_steps=4)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir(tmp, "run")


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """The files of `folder` (a refusal may create and remove a probe file, which touches folder times only)."""
    return {name: stat for name, stat in snapshot(folder).items() if (folder / name).is_file()}


# ---- a kill during a save --------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_fs(tmp_path):
    """A folder on another filesystem than tmp_path ($TMPDIR of the command): a tmpfs where root may mount one,
    else tmp_path itself (the checkpoint writer no longer depends on where $TMPDIR is)."""
    if not is_root():
        yield tmp_path / "other"
        return
    with mount_tmpfs(tmp_path / "mnt", "1200m") as mount:
        yield mount


@pytest.mark.slow  # two fits of the 198 MB-checkpoint demo model: about a minute on 2 busy cores
def test_kill_while_last_ckpt_is_written_across_filesystems_then_resume(tmp_path, data_dir, checkpoint_fs):
    """SIGKILL while last.ckpt (step 4) is being written over an intact older last.ckpt (step 2), the
    checkpoints on a tmpfs and $TMPDIR on disk: last.ckpt stays the intact step-2 file, only a hidden partial
    file is left; `--ckpt_path last` removes it and resumes from step000004.ckpt, the newest that loads."""
    root = checkpoint_fs / "run"
    checkpoints = root / CHECKPOINTS
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    config = demo_config(tmp_path, data_dir, "run", max_steps=6)
    args = ["fit", "--config", config, f"--trainer.default_root_dir={root}"]

    def writing_last_over_an_older_one() -> bool:
        try:
            return (checkpoints / "last.ckpt").is_file() and any(
                p.name.startswith(".last.ckpt.partial-") and p.stat().st_size > 0 for p in checkpoints.iterdir())
        except FileNotFoundError:  # renamed between the listing and the stat: not this time
            return False

    kill_when(args, writing_last_over_an_older_one, timeout=240, TMPDIR=str(scratch))
    leftovers = [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.partial-")  # killed mid-write
    visible = find_checkpoints([checkpoints])
    assert {p.name for p in visible} == {"last.ckpt", "step000002.ckpt", "step000004.ckpt"}
    assert all(checkpoint_problem(p) is None for p in visible)  # no truncated checkpoint where resume looks
    assert global_step(checkpoints / "last.ckpt") == 2
    assert not [p for p in scratch.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]  # none via $TMPDIR

    result = run_command([*args, "--ckpt_path", "last"], timeout=240, TMPDIR=str(scratch))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'step000004.ckpt'}" in result.stderr
    assert "removed 1 partial checkpoint write" in result.stderr
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert global_step(checkpoints / "last.ckpt") == 6 and global_step(checkpoints / "step000006.ckpt") == 6


@pytest.mark.slow  # two 2-process FSDP2 fits: about 1.5 minutes on 2 cores
@pytest.mark.distributed
def test_kill_while_a_distributed_last_ckpt_is_written_then_resume(tmp_path, data_dir):
    """The demo sharded over 2 processes (FSDP2Strategy, distributed checkpoints: directories of shards), SIGKILL
    while the ranks write last.ckpt (step 4) over the step-2 one: last.ckpt stays the whole step-2 directory, a
    hidden partial directory is left; `--ckpt_path last` removes it and resumes both ranks from step000004.ckpt."""
    root = run_dir(tmp_path, "run")
    checkpoints = root / CHECKPOINTS
    args = ["fit", "--config", demo_config(tmp_path, data_dir, "run", max_steps=6),
            "--config", "configs/demo/pretrain-fsdp.yaml", f"--trainer.default_root_dir={root}"]

    def shards_of_a_new_last_being_written() -> bool:
        try:
            return (checkpoints / "last.ckpt").is_dir() and any(
                p.name.startswith(".last.ckpt.partial-") and any(f.stat().st_size > 0 for f in p.iterdir())
                for p in checkpoints.iterdir())
        except FileNotFoundError:
            return False

    kill_when(args, shards_of_a_new_last_being_written, timeout=300)
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.partial-")
    assert all(checkpoint_problem(p) is None for p in find_checkpoints([checkpoints]))  # 2, 4 and last (= 2)
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 2

    result = run_command([*args, "--ckpt_path", "last"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'step000004.ckpt'}" in result.stderr
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 6


# ---- truncated checkpoints where resume looks --------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, data_dir, trained):
    """last.ckpt and step000004.ckpt truncated (what a kill during Lightning's cross-filesystem copy, or a full
    disk, left): `--ckpt_path last` warns naming each and the one it resumes from, step000002.ckpt, sets them
    aside, and trains to the end instead of failing or restarting from step 0."""
    root = run_dir(tmp_path, "run")
    shutil.copytree(trained / CHECKPOINTS, root / CHECKPOINTS)
    checkpoints = root / CHECKPOINTS
    truncate(checkpoints / "last.ckpt", 0.6)
    truncate(checkpoints / "step000004.ckpt", 0.3)

    config = demo_config(tmp_path, data_dir, "run", max_steps=6)
    result = run_command(["fit", "--config", config, "--ckpt_path", "last"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    older = checkpoints / "step000002.ckpt"
    for damaged in ("last.ckpt", "step000004.ckpt"):
        warning = f"checkpoint {checkpoints / damaged} is truncated"
        assert warning in result.stderr and f"resuming from the older {older} instead" in result.stderr
        assert (checkpoints / (damaged + UNLOADABLE_SUFFIX)).is_file()
    assert f"Restored all states from the checkpoint at {older}" in result.stderr
    assert global_step(checkpoints / "step000004.ckpt") == 4  # trained again from step 2, under its own name
    assert global_step(checkpoints / "last.ckpt") == 6


def test_resume_when_no_checkpoint_loads_is_refused(tmp_path, data_dir, trained):
    root = run_dir(tmp_path, "run")
    (root / CHECKPOINTS).mkdir(parents=True)
    for name in ("last.ckpt", "step000002.ckpt"):
        (root / CHECKPOINTS / name).write_bytes((trained / CHECKPOINTS / name).read_bytes()[: 1 << 20])
    config = demo_config(tmp_path, data_dir, "run", max_steps=6)
    before = files(tmp_path)
    result = run_command(["fit", "--config", config, "--ckpt_path", "last"], timeout=120)
    message = assert_refused(result, "--ckpt_path last", root / CHECKPOINTS / "last.ckpt",
                             root / CHECKPOINTS / "step000002.ckpt", "no checkpoint to resume from loads")
    assert "truncated" in message
    assert files(tmp_path) == before


def test_an_explicit_truncated_ckpt_path_is_refused(tmp_path, data_dir, trained):
    damaged = tmp_path / "step000004.ckpt"
    damaged.write_bytes((trained / CHECKPOINTS / "step000004.ckpt").read_bytes()[: 5 << 20])
    config = demo_config(tmp_path, data_dir, "run", max_steps=6)
    before = files(tmp_path)
    result = run_command(["fit", "--config", config, "--ckpt_path", damaged], timeout=120)
    assert_refused(result, "--ckpt_path", damaged)
    assert files(tmp_path) == before


def test_a_requeued_slurm_job_resumes_from_the_newest_checkpoint_that_loads(tmp_path, monkeypatch):
    """What `fit` does on a requeued Slurm job (no --ckpt_path): Lightning would load the highest
    hpc_ckpt_<N> even when the job was killed while saving it; here the newest checkpoint that loads wins."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from prolong_lit.checkpoint_resume import resolve_resume_path

    checkpoints = tmp_path / CHECKPOINTS
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=checkpoints)], logger=False)
    checkpoints.mkdir()
    for path, when in ((tmp_path / "hpc_ckpt_1.ckpt", 1000), (checkpoints / "last.ckpt", 2000),
                       (tmp_path / "hpc_ckpt_2.ckpt", 3000)):
        torch.save({"state_dict": {}, "global_step": when}, path)
        os.utime(path, (when, when))
    assert resolve_resume_path(None, trainer) is None  # not a Slurm job: a fresh start, as Lightning's

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "prolong")
    assert resolve_resume_path(None, trainer) == str(tmp_path / "hpc_ckpt_2.ckpt")
    truncate(tmp_path / "hpc_ckpt_2.ckpt", 0.5)  # the job was killed while saving it
    os.utime(tmp_path / "hpc_ckpt_2.ckpt", (3000, 3000))
    assert resolve_resume_path(None, trainer) == str(checkpoints / "last.ckpt")
    assert (tmp_path / ("hpc-ckpt-2.ckpt" + UNLOADABLE_SUFFIX)).is_file()
    # without a requeue checkpoint that loads, a Slurm job starts afresh (as Lightning's would), and Lightning's own
    # scan for "hpc_ckpt_" names no longer finds the damaged one either
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    assert resolve_resume_path(None, trainer) is None
    assert trainer._checkpoint_connector._hpc_resume_path is None


# ---- full and read-only disks ------------------------------------------------------------------------------------


@needs_root
def test_a_disk_that_fills_during_a_save_is_one_error_and_leaves_no_partial_file(tmp_path, data_dir):
    """300 MB hold step000002.ckpt (198 MB) but not last.ckpt as well: exit 2 naming last.ckpt and the full
    disk; the step-2 checkpoint loads, no last.ckpt and no partial file are left."""
    with mount_tmpfs(tmp_path / "small", "300m") as mount:
        root = mount / "run"
        config = demo_config(tmp_path, data_dir, "run", max_steps=4)
        result = run_command(["fit", "--config", config, f"--trainer.default_root_dir={root}"], timeout=180)
        assert_refused(result, root / CHECKPOINTS / "last.ckpt", "the disk is full")
        checkpoints = root / CHECKPOINTS
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step000002.ckpt"]
        assert checkpoint_problem(checkpoints / "step000002.ckpt") is None


@needs_root
def test_a_read_only_run_folder_is_refused_before_training(tmp_path, data_dir):
    with mount_tmpfs(tmp_path / "ro", "10m", read_only=True) as mount:
        root = mount / "run"
        config = demo_config(tmp_path, data_dir, "run", max_steps=4)
        result = run_command(["fit", "--config", config, f"--trainer.default_root_dir={root}"], timeout=120)
        assert_refused(result, "trainer.default_root_dir", root, "read-only")
        assert not list(mount.iterdir())
    assert not (tmp_path / "run" / "samples").exists()  # refused before training began


@needs_root
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_export_to_a_full_or_read_only_disk_names_the_output(tmp_path, trained, llama3_tokenizer_dir, fault):
    """The float32 export of the tiny model (66 MB of weights) into 20 MB, or into a read-only folder: exit 2
    naming --output; nothing is left on the disk (the export's scratch folder is removed)."""
    with mount_tmpfs(tmp_path / "mnt", "20m", read_only=fault == "read-only") as mount:
        output = mount / "hf"
        result = run_command(["export", "--checkpoint", trained / CHECKPOINTS / "last.ckpt", "--output", output,
                              "--tokenizer", llama3_tokenizer_dir, "--dtype", "float32"], timeout=120)
        assert_refused(result, "--output", output, "the disk is full" if fault == "full" else "read-only")
        assert not list(mount.iterdir())


# ---- where a run's files go ----------------------------------------------------------------------------------


def test_two_runs_of_one_config_keep_their_files_under_their_own_roots(tmp_path, data_dir):
    """The same config with two --trainer.default_root_dir: each root holds its own checkpoints and logs, no
    versioned names (last-v1.ckpt) anywhere, nothing under the config's own root."""
    config = demo_config(tmp_path, data_dir, "shared", max_steps=2)
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        result = run_command(["fit", "--config", config, f"--trainer.default_root_dir={root}"], timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
    for root in roots:
        assert sorted(p.name for p in (root / CHECKPOINTS).iterdir()) == ["last.ckpt", "step000002.ckpt"]
        assert (root / LOGS / "config.yaml").is_file() and list((root / LOGS).glob("events.out.tfevents.*"))
        assert str(root) in (root / LOGS / "config.yaml").read_text()
    assert not list(tmp_path.rglob("*-v1*"))
    assert sorted(p.name for p in run_dir(tmp_path, "shared").iterdir()) == ["samples"]  # the config's own path


# ---- distributed checkpoints: written aside, swapped into place -------------------------------------------------


class OneProcess:
    """The strategy calls save_distributed_atomically makes, for a run of one process (no process group)."""

    is_global_zero = True

    def broadcast(self, value):
        return value

    def barrier(self, name: str | None = None) -> None:
        pass


def save_dcp(value: float, fail_after_shards: bool = False):
    """A `save(directory)` writing a real torch.distributed.checkpoint plus Lightning's meta.pt; optionally
    failing after the shards, as a kill or a full disk would before meta.pt."""
    import torch.distributed.checkpoint as dcp

    def save(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        dcp.save({"state_dict": {"w": torch.full((4,), value)}}, checkpoint_id=str(directory), no_dist=True)
        if fail_after_shards:
            raise OSError(28, "No space left on device", str(directory / "meta.pt"))
        torch.save({"global_step": int(value)}, directory / "meta.pt")

    return save


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "last.ckpt"
    save_distributed_atomically(save_dcp(1.0), path, OneProcess())
    assert checkpoint_problem(path) is None and torch.load(path / "meta.pt")["global_step"] == 1

    with pytest.raises(ValueError, match=r"cannot write the checkpoint .*last\.ckpt'.*the disk is full"):
        save_distributed_atomically(save_dcp(2.0, fail_after_shards=True), path, OneProcess())
    assert torch.load(path / "meta.pt")["global_step"] == 1 and checkpoint_problem(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial directory is gone

    save_distributed_atomically(save_dcp(3.0), path, OneProcess())
    assert torch.load(path / "meta.pt")["global_step"] == 3 and checkpoint_problem(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed between the swap's two renames: the old one is `.last.ckpt.replaced`, no last.ckpt; the next start
    # puts it back
    (path).rename(tmp_path / ".last.ckpt.replaced")
    clean_partials(tmp_path)
    assert torch.load(path / "meta.pt")["global_step"] == 3 and checkpoint_problem(path) is None

    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert "truncated shard" in checkpoint_problem(path)
