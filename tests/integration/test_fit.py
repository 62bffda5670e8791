"""`fit` on the demo config (tiny data, few steps): TensorBoard scalars, checkpoints, and an exact resume.

Each run keeps its files under its trainer.default_root_dir (`tmp_path / <run>`): logs/, checkpoints/, samples/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prolong_lit.cli import main
from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import (
    CHECKPOINTS,
    DOMAINS,
    LOGS,
    MICRO_BATCH,
    SEQ_LEN,
    demo_config,
    final_weights,
    read_scalars,
    run_dir,
    seen_samples,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepared")
    write_prepared(path, DOMAINS, seq_len=SEQ_LEN)
    return path


def test_fit_logs_checkpoints_and_resumes_exactly(tmp_path, data_dir):
    main(["fit", "--config", str(demo_config(tmp_path, data_dir, "straight", max_steps=6))])
    straight_dir, resumed_dir = run_dir(tmp_path, "straight"), run_dir(tmp_path, "resumed")

    scalars = read_scalars(straight_dir / LOGS)
    for tag in ["train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_seen",
                "train/tokens_per_sec", *(f"train/tokens_seen/{d}" for d in DOMAINS)]:
        assert tag in scalars, f"{tag} not logged; logged: {sorted(scalars)}"
    per_domain = sum(scalars[f"train/tokens_seen/{d}"][-1][1] for d in DOMAINS)
    assert per_domain == scalars["train/tokens_seen"][-1][1] == 6 * MICRO_BATCH * SEQ_LEN  # steps * rows * length
    checkpoints = straight_dir / CHECKPOINTS
    assert (checkpoints / "last.ckpt").is_file() and (checkpoints / "step000004.ckpt").is_file()
    assert (straight_dir / LOGS / "config.yaml").is_file()

    # Interrupt at step 4 (a checkpoint), resume to 6: same samples, same final weights as the straight run.
    main(["fit", "--config", str(demo_config(tmp_path, data_dir, "resumed", max_steps=6, stop_at=4))])
    main(
        [
            "fit",
            "--config",
            str(demo_config(tmp_path, data_dir, "resumed", max_steps=6)),
            "--ckpt_path",
            str(resumed_dir / CHECKPOINTS / "step000004.ckpt"),
        ]
    )
    assert seen_samples(resumed_dir / "samples") == seen_samples(straight_dir / "samples")
    straight = final_weights(checkpoints / "last.ckpt")
    resumed = final_weights(resumed_dir / CHECKPOINTS / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert {"fit", "validate", "prepare", "eval", "export", "pipeline", "tokenizer"} <= listed, listed
