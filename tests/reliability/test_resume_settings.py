"""`fit --ckpt_path` never silently swaps the config's model settings for the checkpoint's (--resume_settings).

Refusals run the real command line (`python -m prolong_lit fit ...` in a subprocess): exit status 2, one line
naming the setting, no traceback, the run directory untouched, within a time bound. The applied changes run in
process: the learning rate after a resume with a new lr equals, step for step, that of a run configured with it
from the start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prolong_lit.cli import main
from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import CHECKPOINTS, DOMAINS, LOGS, SEQ_LEN, demo_config, read_scalars, run_dir

pytestmark = pytest.mark.reliability
REFUSAL_TIMEOUT_S = 120  # a refusal happens before any model is built: seconds, not minutes


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> tuple[Path, Path]:
    """(tmp dir, data dir) holding run 'a': 2 of 4 steps done at lr 3e-3, checkpoint step000002.ckpt."""
    tmp = tmp_path_factory.mktemp("resume")
    write_prepared(tmp / "data", DOMAINS, seq_len=SEQ_LEN)
    main(["fit", "--config", str(demo_config(tmp, tmp / "data", "a", max_steps=4, stop_at=2))])
    return tmp, tmp / "data"


def _config(tmp: Path, data: Path, run: str, lr: float | None = None, layers: int | None = None) -> Path:
    path = demo_config(tmp, data, run, max_steps=4)
    config = yaml.safe_load(path.read_text())
    model = config["model"]["init_args"]
    if lr is not None:
        model["optimizer"]["init_args"]["lr"] = lr
    if layers is not None:
        model["llama"]["overrides"] = {"num_hidden_layers": layers}
    path.write_text(yaml.safe_dump(config))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], cwd: Path) -> str:
    """Run `python -m prolong_lit <args>`; assert exit 2 and no traceback; the stderr."""
    done = subprocess.run([sys.executable, "-m", "prolong_lit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=REFUSAL_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr


def test_another_model_is_refused_naming_the_setting(resumable):
    tmp, data = resumable
    run = run_dir(tmp, "a")
    before = _snapshot(run)
    stderr = _refused(["fit", "--config", str(_config(tmp, data, "a", layers=1)),
                       "--ckpt_path", str(run / CHECKPOINTS / "step000002.ckpt")], cwd=tmp)
    assert "model.llama.overrides" in stderr and "--resume_settings checkpoint" in stderr
    assert _snapshot(run) == before


def test_ckpt_path_last_gets_the_same_check(resumable):
    """`last` is resolved to a file only once the trainer exists; the resolved checkpoint is checked all the same."""
    tmp, data = resumable
    run = run_dir(tmp, "a")
    before = _snapshot(run)
    stderr = _refused(["fit", "--config", str(_config(tmp, data, "a", layers=1)), "--ckpt_path", "last"], cwd=tmp)
    assert "model.llama.overrides" in stderr and "last.ckpt" in stderr
    assert _snapshot(run) == before


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "state_dict"])
def test_a_file_that_is_not_a_training_checkpoint_is_refused(resumable, tmp_path, content):
    tmp, data = resumable
    bad = tmp_path / "bad.ckpt"
    if content == "state_dict":  # a bare torch file: weights without Lightning's training state
        torch.save({"weight": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)
    stderr = _refused(["fit", "--config", str(_config(tmp, data, "a")), "--ckpt_path", str(bad)], cwd=tmp)
    assert "--ckpt_path" in stderr and str(bad) in stderr


def test_a_truncated_checkpoint_is_refused(resumable, tmp_path):
    tmp, data = resumable
    intact = (run_dir(tmp, "a") / CHECKPOINTS / "step000002.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(intact[: len(intact) // 2])
    stderr = _refused(["fit", "--config", str(_config(tmp, data, "a")), "--ckpt_path", str(truncated)], cwd=tmp)
    assert "cannot be read as a checkpoint" in stderr and str(truncated) in stderr


def _lr_by_step(root: Path) -> dict[int, float]:
    return dict(read_scalars(root / LOGS)["train/lr"])


def test_a_new_learning_rate_applies_from_the_resumed_step(resumable, caplog):
    tmp, data = resumable
    ckpt = run_dir(tmp, "a") / CHECKPOINTS / "step000002.ckpt"
    # the reference: lr 1e-3 from the start
    main(["fit", "--config", str(_config(tmp, data, "b", lr=1e-3))])
    # the same checkpoint resumed twice: with the config's new lr, and keeping the checkpoint's
    with caplog.at_level("WARNING"):
        main(["fit", "--config", str(_config(tmp, data, "resumed_config", lr=1e-3)), "--ckpt_path", str(ckpt)])
    assert "model.optimizer.init_args.lr" in caplog.text and "applies the config's" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        main(["fit", "--config", str(_config(tmp, data, "resumed_kept", lr=1e-3)), "--ckpt_path", str(ckpt),
              "--resume_settings", "checkpoint"])
    assert "keeps the checkpoint's model.optimizer.init_args.lr" in caplog.text

    reference, original = _lr_by_step(run_dir(tmp, "b")), _lr_by_step(run_dir(tmp, "a"))
    applied, kept = _lr_by_step(run_dir(tmp, "resumed_config")), _lr_by_step(run_dir(tmp, "resumed_kept"))
    resumed_steps = sorted(step for step in applied if step >= 2)
    assert resumed_steps, applied
    for step in resumed_steps:
        assert applied[step] == pytest.approx(reference[step], rel=1e-6), (step, applied, reference)
    # the kept run continues the 3e-3 schedule: 3x the reference's learning rate at every resumed step
    for step in sorted(step for step in kept if step >= 2):
        assert kept[step] == pytest.approx(3 * reference[step], rel=1e-6), (step, kept, reference)
    assert original  # run 'a' logged its own (3e-3) rates before the interruption
    saved = torch.load(run_dir(tmp, "resumed_config") / CHECKPOINTS / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert saved["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 1e-3
    assert all(group["initial_lr"] == 1e-3 for group in saved["optimizer_states"][0]["param_groups"])
