"""`pipeline` under faults, through the real command line: a kill right after a phase's final checkpoint, a
truncated last.ckpt beside an intact older checkpoint, a phase's data folder left by an interrupted or a foreign
preparation, a read-only run directory.

Each case runs `python -m prolong_lit pipeline ...` in its own process with a time limit (see
tests/helpers/fault_helpers.py) and asserts the exit status, what the message names, and what the run directory
holds afterwards. Phases are the demo config on tiny data (tests/helpers/pipeline_helpers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prolong_lit.data.format import MANIFEST_NAME
from prolong_lit.data.prepare import INCOMPLETE_MARKER
from prolong_lit.pipeline.run import FINAL_CHECKPOINT, MARKER
from tests.helpers.data_factory import write_prepared
from tests.helpers.fault_helpers import assert_refused, is_root, kill_when, mount_tmpfs, run_command, snapshot
from tests.helpers.pipeline_helpers import MICRO_BATCH, SEQ_LEN, phase, write_pipeline

pytestmark = pytest.mark.reliability
CRASH = {"class_path": "tests.helpers.pipeline_helpers.CrashAtStep", "init_args": {"step": 2}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    path = tmp_path_factory.mktemp("pipeline-data")
    write_prepared(path, {"code": 12, "docs": 12}, seq_len=SEQ_LEN, tokenizer=str(llama3_tokenizer_dir))
    return path


def summary_row(run_dir: Path, name: str) -> list[str]:
    """The cells of phase `name`'s row in summary.md: phase, steps, tokens, train/loss, val/loss, ..."""
    for line in (run_dir / "summary.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in {run_dir / 'summary.md'}")


def test_a_kill_right_after_the_final_checkpoint_keeps_the_phase_numbers(tmp_path, data_dir):
    """SIGKILL as soon as final.ckpt appears (the export and the marker not written yet): the rerun exports it
    and records its real steps, tokens and losses (they were 0 steps and no loss)."""
    run_dir = tmp_path / "run"
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", run_dir, [phase("a", 3, data_dir, tmp_path / "probes")])
    final = run_dir / "a" / "checkpoints" / FINAL_CHECKPOINT
    kill_when(["pipeline", "--config", pipeline], final.exists, timeout=240)
    assert not (run_dir / "a" / MARKER).exists() and not (run_dir / "summary.md").exists()

    result = run_command(["pipeline", "--config", pipeline], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    marker = json.loads((run_dir / "a" / MARKER).read_text())
    assert marker["actions"] == ["exported"]  # not trained again
    assert (marker["steps"], marker["tokens"]) == (3, 3 * MICRO_BATCH * SEQ_LEN)
    assert {"train/loss", "val/loss"} <= marker["metrics"].keys()
    assert 0 < marker["metrics"]["train/loss"] < 20 and 0 < marker["metrics"]["val/loss"] < 20
    name, steps, tokens, train_loss, val_loss = summary_row(run_dir, "a")[:5]
    assert (steps, tokens) == ("3", "768") and train_loss != "-" and val_loss != "-"
    assert (run_dir / "a" / "export" / "config.json").is_file()


@pytest.mark.slow  # two pipeline runs (a crash, then the resume and export): over a minute on 2 busy cores
def test_a_truncated_last_ckpt_resumes_from_the_intact_older_checkpoint(tmp_path, data_dir):
    """A phase crashed after step 2 (step2.ckpt, last.ckpt); last.ckpt then truncated, as a kill during the save
    used to leave it. The rerun warns naming both, resumes at step 2 (not 0) and finishes the phase."""
    run_dir = tmp_path / "run"
    crashing = [phase("a", 4, data_dir, tmp_path / "first", callbacks=[CRASH])]
    result = run_command(["pipeline", "--config", write_pipeline(tmp_path / "first.yaml", run_dir, crashing)],
                         timeout=180)
    assert result.returncode == 1 and "simulated crash at step 2" in result.stderr
    checkpoints = run_dir / "a" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    pipeline = write_pipeline(tmp_path / "second.yaml", run_dir, [phase("a", 4, data_dir, tmp_path / "second")])
    result = run_command(["pipeline", "--config", pipeline], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {last} is truncated" in result.stderr
    assert f"resuming from the older {checkpoints / 'step2.ckpt'} instead" in result.stderr
    start = torch.load(tmp_path / "second" / "a-start.pt", weights_only=False)
    assert start["global_step"] == 2  # resumed, not restarted from sample 0
    marker = json.loads((run_dir / "a" / MARKER).read_text())
    assert marker["actions"] == ["resumed", "exported"] and marker["steps"] == 4


def test_a_phase_whose_checkpoints_all_fail_to_load_is_refused(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "a" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("last.ckpt", "step2.ckpt"):
        (checkpoints / name).write_bytes(b"PK\x03\x04" + bytes(1000))  # the start of a zip, cut short
    before = snapshot(run_dir)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", run_dir, [phase("a", 4, data_dir, tmp_path / "probes")])
    result = run_command(["pipeline", "--config", pipeline], timeout=120)
    assert_refused(result, checkpoints / "last.ckpt", checkpoints / "step2.ckpt", "no checkpoint to resume from")
    assert snapshot(run_dir) == before


# ---- the data a phase prepares -----------------------------------------------------------------------------------


def prepare_args(tmp_path: Path, tokenizer: Path, output: Path) -> list[str]:
    """`prepare` arguments of a one-domain corpus (`web`, concat rows of SEQ_LEN tokens) written into tmp_path."""
    words = "the of and river stone light window paper garden music winter letter mountain".split()
    documents = [" ".join(words[(d * 7 + i * 3) % len(words)] for i in range(120)) for d in range(30)]
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    config = tmp_path / "prepare.yaml"
    config.write_text(f"tokenizer: {tokenizer}\noutput_dir: {output}\nseq_len: {SEQ_LEN}\nnum_workers: 1\n"
                      f"domains:\n  web: {{mode: concat, sources: [{{type: jsonl, path: {corpus}}}]}}\n")
    return ["--config", str(config)]


def data_phase(tmp_path: Path, tokenizer: Path, output: Path) -> dict:
    overrides = {"data.init_args.weights": {"web": 1.0}}
    return phase("a", 2, output, tmp_path / "probes", prepare=prepare_args(tmp_path, tokenizer, output),
                 overrides=overrides)


def test_a_foreign_folder_as_a_phase_data_folder_is_refused_naming_the_setting(tmp_path, llama3_tokenizer_dir):
    """The phase's prepare output_dir holds files that are not prepared data: exit 2 naming the phase's prepare
    setting and the folder, without the `--overwrite` that `pipeline` does not take; nothing changed."""
    output = tmp_path / "data"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    run_dir = tmp_path / "run"
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", run_dir, [data_phase(tmp_path, llama3_tokenizer_dir, output)])
    before = snapshot(tmp_path)
    result = run_command(["pipeline", "--config", pipeline], timeout=120)
    message = assert_refused(result, "phases[0] (a).prepare", output, MANIFEST_NAME)
    assert "pass --overwrite" not in message
    assert snapshot(tmp_path) == before and not run_dir.exists()


def test_an_interrupted_preparation_is_prepared_again(tmp_path, llama3_tokenizer_dir):
    """What a kill during `prepare` leaves (its incomplete marker, a partial domain, no manifest): the pipeline
    prepares the data again and trains the phase."""
    output = tmp_path / "data"
    (output / "web").mkdir(parents=True)
    (output / INCOMPLETE_MARKER).write_text("")
    (output / "web" / "chunk-0-0.bin").write_bytes(b"\0" * 100)
    run_dir = tmp_path / "run"
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", run_dir, [data_phase(tmp_path, llama3_tokenizer_dir, output)])
    result = run_command(["pipeline", "--config", pipeline], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds an interrupted preparation" in result.stderr
    assert (output / MANIFEST_NAME).is_file() and not (output / INCOMPLETE_MARKER).exists()
    assert json.loads((run_dir / "a" / MARKER).read_text())["steps"] == 2


@pytest.mark.skipif(not is_root(), reason="mounting a tmpfs needs root")
def test_a_read_only_run_dir_is_one_error_naming_it(tmp_path, data_dir):
    with mount_tmpfs(tmp_path / "ro", "10m", read_only=True) as mount:
        pipeline = write_pipeline(tmp_path / "pipeline.yaml", mount / "run", [phase("a", 2, data_dir, tmp_path)])
        result = run_command(["pipeline", "--config", pipeline], timeout=120)
        assert_refused(result, str(mount / "run"), "read-only", "run_dir")
        assert not list(mount.iterdir())
