"""Shared by the reliability tests: the real command line in a subprocess, folder snapshots, small mounts.

`run_command` runs `python -m prolong_lit ...` as a user would (its own process, the repository as working
directory, offline) with a wall-clock limit, so a hang fails the test instead of stalling the suite.
`snapshot` records every file of a folder (size, modification time, inode) to show that a refused command left
it unchanged. `mount_tmpfs` gives a separate filesystem of a chosen size (root only): checkpoints on another
filesystem than the temporary directory, or a disk that fills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
USER_ERROR = 2  # prolong_lit.errors.USER_ERROR_EXIT_STATUS


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: offline, the tests' helper callbacks importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def run_command(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m prolong_lit <args>` to completion; a test failure (not a hang) after `timeout` seconds."""
    command = [sys.executable, "-m", "prolong_lit", *map(str, args)]
    try:
        return subprocess.run(command, cwd=REPO, env=command_env(**env), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"`{' '.join(command[2:])}` hung: still running after {timeout} s\n{err.stderr}")


def assert_refused(result: subprocess.CompletedProcess, *names: str) -> str:
    """The command ended with prolong_lit's one-line user error (exit 2, no traceback) naming each of `names`;
    returns the message."""
    assert result.returncode == USER_ERROR, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], f"{name!r} not named in: {errors[0]}"
    return errors[0]


def kill_when(args: list[str], condition: Callable[[], bool], timeout: float = 120,
              **env: str) -> subprocess.CompletedProcess:
    """Start `python -m prolong_lit <args>`, SIGKILL it as soon as `condition()` holds (polled every
    millisecond), as a preemption or a time limit would; fails if the command ends first or runs past
    `timeout`."""
    command = [sys.executable, "-m", "prolong_lit", *map(str, args)]
    log = open(os.devnull, "w")  # noqa: SIM115 - the child's output is not read; pipes could fill and block it
    process = subprocess.Popen(command, cwd=REPO, env=command_env(**env), stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if condition():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return subprocess.CompletedProcess(command, process.returncode)
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(command[2:])}` still running after {timeout} s")
            time.sleep(0.001)
        pytest.fail(f"`{' '.join(command[2:])}` ended (exit {process.returncode}) before the moment to kill it")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under `folder`: relative path -> (size, mtime_ns, inode). A rewrite, a rename over
    it, a truncation or a new file shows up as a difference."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns,
                                         p.stat().st_ino)
            for p in sorted(folder.rglob("*"))}


def is_root() -> bool:
    return os.geteuid() == 0


@contextmanager
def mount_tmpfs(where: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` (e.g. "300m") mounted at `where` for the block; unmounted after. Root only."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
