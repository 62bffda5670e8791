"""Two-process DDP on CPU (gloo) through the real command line: it trains, and the ranks see disjoint samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import (
    CHECKPOINTS,
    DOMAINS,
    LOGS,
    MICRO_BATCH,
    SEQ_LEN,
    demo_config,
    read_scalars,
    run_dir,
)

pytestmark = pytest.mark.distributed


def test_two_process_ddp_trains_on_disjoint_samples(tmp_path):
    data_dir = tmp_path / "prepared"
    write_prepared(data_dir, DOMAINS, seq_len=SEQ_LEN)
    config = demo_config(tmp_path, data_dir, "ddp", max_steps=4)
    root = run_dir(tmp_path, "ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "prolong_lit", "fit", "--config", str(config),
               "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    seen = {}
    for rank in (0, 1):
        lines = (root / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
        seen[rank] = [i for line in lines for i in json.loads(line)["sample_index"]]
    micro_batch, steps, world = MICRO_BATCH, 4, 2
    assert len(seen[0]) == len(seen[1]) == steps * micro_batch
    assert not set(seen[0]) & set(seen[1])
    # together the ranks consumed exactly the first steps * micro_batch * world samples of the global stream
    assert sorted(seen[0] + seen[1]) == list(range(steps * micro_batch * world))

    checkpoint = torch.load(root / CHECKPOINTS / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == steps
    losses = [value for _, value in read_scalars(root / LOGS)["train/loss"]]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    tokens = read_scalars(root / LOGS)["train/tokens_seen"][-1][1]
    assert tokens == steps * micro_batch * world * SEQ_LEN  # counted over both ranks, not rank 0 alone
