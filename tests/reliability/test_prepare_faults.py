"""`prepare` and `tokenizer` when the disk fails them, and `prepare` killed, through the real command line.

- A full disk while `prepare` writes shards (a small tmpfs, root only) and a file size limit (RLIMIT_FSIZE, which
  any user can set: the same failed write, EFBIG instead of ENOSPC): exit 2 within seconds, one line naming the
  file, and neither the partial output nor the scratch folder left behind. litdata's multiprocess writer used to
  deadlock here with nothing printed.
- A read-only output folder: refused before any work, naming it.
- `prepare` killed (SIGKILL) while it writes: its scratch folder is removed by the next run, the partial output
  is refused by `fit` and by a rerun without --overwrite (which says it is incomplete and what to do, and leaves
  it as it was), and a rerun with --overwrite builds the data. SIGTERM cleans up at once.
- `tokenizer --output` on a full or read-only disk: one line naming the folder, no half-written tokenizer.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prolong_lit.data.format import MANIFEST_NAME
from prolong_lit.data.verify import INCOMPLETE_MARKER, check_prepared_dir, verify_domain
from prolong_lit.data.write import scratch_path
from tests.helpers.fault_helpers import REPO, assert_refused, command_env, is_root, mount_tmpfs, run_command, snapshot
from tests.reliability.test_data_faults import TIMEOUT, fit_config, prepare_config, write_jsonl

pytestmark = pytest.mark.reliability
MDS = REPO / "tests" / "fixtures" / "mds"


@pytest.fixture
def spec(tmp_path, llama3_tokenizer_dir):
    """A data spec factory: two domains of 300 documents (~290 samples, ~150 KB of chunks each)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = {name: [{"type": "jsonl", "path": str(write_jsonl(corpus / f"{name}.jsonl", 300, seed))}]
               for seed, name in enumerate(("web", "code"))}

    def make(output_dir: Path, **settings) -> Path:
        return prepare_config(tmp_path / "data.yaml", llama3_tokenizer_dir, output_dir, sources, **settings)

    return make


def run_limited(args: list[str], file_size: int, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m prolong_lit <args>` under RLIMIT_FSIZE = `file_size` bytes (a write past it fails with EFBIG:
    Python ignores SIGXFSZ)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    command = [sys.executable, "-m", "prolong_lit", *map(str, args)]
    try:
        return subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"`{' '.join(command[2:])}` hung: still running after {timeout} s\n{err.stderr}")


@pytest.mark.skipif(not is_root(), reason="mounting a small tmpfs needs root (test_a_file_size_limit_... runs "
                                          "the same failed write without it)")
def test_a_full_disk_while_writing_shards_is_one_error_naming_the_file(tmp_path, spec):
    """A 400 KB filesystem: the scratch token files fit, the shards of the second domain do not."""
    with mount_tmpfs(tmp_path / "small", "400k") as disk:
        out = disk / "data"
        started = time.monotonic()
        result = run_command(["prepare", "--config", spec(out)], timeout=TIMEOUT)
        message = assert_refused(result, f"{out}/", "chunk-0-", "No space left on device", "output_dir")
        assert "MiB free there" in message
        assert time.monotonic() - started < TIMEOUT
        assert list(disk.iterdir()) == []  # no partial output, no scratch folder


def test_a_file_size_limit_while_writing_is_one_error_naming_the_file(tmp_path, spec):
    """RLIMIT_FSIZE of 100 KB (every user can set it): a scratch token file (~150 KB) cannot be written."""
    out = tmp_path / "out" / "data"
    result = run_limited(["prepare", "--config", spec(out)], file_size=100_000)
    assert_refused(result, str(scratch_path(out)), "File too large", "output_dir")
    assert list(out.parent.iterdir()) == []


def test_a_read_only_output_is_refused_before_any_work(tmp_path, spec):
    if is_root():  # root writes through permission bits: a read-only mount it is
        with mount_tmpfs(tmp_path / "ro", "1m", read_only=True) as disk:
            result = run_command(["prepare", "--config", spec(disk / "data")], timeout=TIMEOUT)
            assert_refused(result, "output_dir", str(disk / "data"), "read-only file system")
            assert list(disk.iterdir()) == []
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        result = run_command(["prepare", "--config", spec(folder / "data")], timeout=TIMEOUT)
        assert_refused(result, "output_dir", str(folder / "data"), "not writable")


def start_prepare(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prolong_lit", "prepare", "--config", str(config)], cwd=REPO,
                            env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def signal_when(process: subprocess.Popen, condition, signum: int, timeout: float = TIMEOUT) -> None:
    """Send `signum` as soon as `condition()` holds (polled every millisecond); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"prepare ended (exit {process.returncode}) before the moment to signal it")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"prepare still running after {timeout} s")
        time.sleep(0.001)
    process.send_signal(signum)


def test_a_killed_prepare_leaves_nothing_fit_or_a_rerun_accepts(tmp_path, spec):
    """SIGKILL once the output is being written (its incomplete marker exists, a domain partly written)."""
    out = tmp_path / "out" / "data"
    config = spec(out)
    process = start_prepare(config)
    signal_when(process, lambda: (out / INCOMPLETE_MARKER).exists(), signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert scratch_path(out).is_dir() and not (out / MANIFEST_NAME).exists()  # what a kill leaves

    fit = fit_config(tmp_path / "fit.yaml", out, tmp_path / "run", {"web": 0.5, "code": 0.5})
    before = snapshot(tmp_path / "out")
    assert_refused(run_command(["fit", "--config", fit], timeout=TIMEOUT), str(out), "incomplete")
    message = assert_refused(run_command(["prepare", "--config", config], timeout=TIMEOUT), "output_dir", str(out),
                             "incomplete", "--overwrite")
    assert "interrupted" in message
    assert snapshot(tmp_path / "out") == before  # both refusals left the partial output (and scratch) as they were

    result = run_command(["prepare", "--config", config, "--overwrite"], timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removing the scratch folder" in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no scratch folder survives the rerun
    check_prepared_dir(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(p.name for p in out.iterdir()) == ["code", MANIFEST_NAME, "web"]
    for name in ("web", "code"):
        assert verify_domain(out / name) == manifest["domains"][name]["samples"]


def test_a_terminated_prepare_removes_its_scratch_and_partial_output(tmp_path, spec):
    """SIGTERM (`kill`, a Slurm time limit) while writing: prepare's own clean-up runs; nothing is left."""
    out = tmp_path / "out" / "data"
    process = start_prepare(spec(out))
    signal_when(process, lambda: (out / INCOMPLETE_MARKER).exists(), signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert list(out.parent.iterdir()) == []


def test_tokenizer_on_a_full_or_read_only_disk_is_one_error_naming_the_folder(tmp_path):
    """The Llama-3 tokenizer (~9 MB of tokenizer.json) onto 1 MB: the Rust library's "os error 28" becomes one
    line naming --output, and no tokenizer.json (which would say "built") is left. A read-only folder is
    refused before the build."""
    if is_root():
        with mount_tmpfs(tmp_path / "small", "1m") as disk:
            result = run_command(["tokenizer", "--output", disk / "tok"], timeout=TIMEOUT)
            assert_refused(result, "--output", str(disk / "tok"), "No space left on device")
            assert list(disk.iterdir()) == []
        with mount_tmpfs(tmp_path / "ro", "1m", read_only=True) as disk:
            result = run_command(["tokenizer", "--output", disk / "tok"], timeout=TIMEOUT)
            assert_refused(result, "--output", str(disk / "tok"), "not writable")
    else:
        result = run_limited(["tokenizer", "--output", tmp_path / "tok"], file_size=1_000_000)
        assert_refused(result, "--output", str(tmp_path / "tok"), "File too large")
        assert list(tmp_path.iterdir()) == []


def test_a_failed_write_in_a_rows_worker_reaches_the_command(tmp_path, llama3_tokenizer_dir):
    """Mode rows writes chunks from worker processes (num_workers 2): one failing under a 300-byte file size
    limit ends the command at once with the chunk file named, the other worker stopped, nothing left."""
    out = tmp_path / "out" / "data"
    spec = tmp_path / "data.yaml"
    spec.write_text(json.dumps({
        "tokenizer": str(llama3_tokenizer_dir), "output_dir": str(out), "seq_len": 64, "num_workers": 2,
        "chunk_bytes": "64KB",
        "domains": {"pre": {"mode": "rows", "sources": [{"type": "mds", "path": str(MDS / "pretrain")}]}},
    }))
    result = run_limited(["prepare", "--config", spec], file_size=300)  # a shard's chunk: > 500 bytes
    assert_refused(result, f"{scratch_path(out)}/pre/chunk-0-", "File too large")
    assert list(out.parent.iterdir()) == []


def test_a_scratch_folder_of_a_running_prepare_is_left_alone(tmp_path, spec):
    """A scratch folder whose owner (this host, a live pid: here the test's own process) still runs: a second
    prepare of the same output refuses, naming the pid and the folder, and leaves it as it was."""
    out = tmp_path / "out" / "data"
    scratch = scratch_path(out)
    scratch.mkdir(parents=True)
    (scratch / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    (scratch / "web.tokens").write_bytes(b"\0" * 64)
    before = snapshot(tmp_path / "out")
    result = run_command(["prepare", "--config", spec(out)], timeout=TIMEOUT)
    assert_refused(result, "output_dir", f"another prepare (pid {os.getpid()})", str(scratch))
    assert snapshot(tmp_path / "out") == before


def test_a_tokenizing_worker_killed_ends_prepare_instead_of_hanging(tmp_path, llama3_tokenizer_dir):
    """SIGKILL to one of two tokenizing workers (what the out-of-memory killer does): multiprocessing.Pool would
    wait forever for its task; prepare ends with an error saying a worker died, and removes its scratch."""
    out = tmp_path / "out" / "data"
    corpus = write_jsonl(tmp_path / "web.jsonl", 600, seed=3, words=2000)
    spec = prepare_config(tmp_path / "data.yaml", llama3_tokenizer_dir, out, {"web": [{"type": "jsonl",
                          "path": str(corpus)}]}, num_workers=2)
    process = start_prepare(spec)
    workers: list[int] = []

    def a_worker() -> bool:
        found = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        workers.extend(int(pid) for pid in found)
        return bool(found)

    signal_when(process, a_worker, 0)  # signal 0: only wait for a worker to exist
    time.sleep(0.5)  # tokenizing
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode not in (0, None) and "a worker process of `prepare` died" in stderr, stderr[-3000:]
    assert not scratch_path(out).exists() and not out.exists()
