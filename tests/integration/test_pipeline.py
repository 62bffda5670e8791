"""`pipeline`: two tiny phases (the demo config on tiny data), an optimizer hand-off, a crash and a resume.

One module-scoped run does: phase `a` (3 steps), phase `b` (4 steps, larger RoPE base, starts from a's export
and carries a's AdamW moments), crashing before b's step 3; then the same pipeline again, which must skip `a`
and resume `b` from its step-2 checkpoint. The tests read what the probes and the pipeline recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prolong_lit.errors import CheckpointError
from prolong_lit.pipeline.config import load_pipeline_config
from prolong_lit.pipeline.run import FINAL_CHECKPOINT, MARKER, resume_checkpoint, run_pipeline
from tests.helpers.data_factory import write_prepared
from tests.helpers.pipeline_helpers import LR, MICRO_BATCH, SEQ_LEN, phase, write_pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama3_tokenizer_dir):
    """The crashed then resumed pipeline; returns its directories and the results of the second invocation."""
    root = tmp_path_factory.mktemp("pipeline")
    data_dir = root / "data"
    write_prepared(data_dir, {"code": 12, "docs": 12}, seq_len=SEQ_LEN, tokenizer=str(llama3_tokenizer_dir))
    probes, run_dir = root / "probes", root / "run"

    def pipeline(crash: bool, name: str) -> Path:
        crash_at = {"class_path": "tests.helpers.pipeline_helpers.CrashAtStep", "init_args": {"step": 2}}
        crashes = [crash_at] if crash else []
        stage2 = {"overrides": {"model.init_args.llama.rope_theta": 1.28e8}, "carry_optimizer": True,
                  "callbacks": crashes}
        phases = [phase("a", 3, data_dir, probes / name), phase("b", 4, data_dir, probes / name, **stage2)]
        return write_pipeline(root / f"{name}.yaml", run_dir, phases)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # phase configs name repository files
        with pytest.raises(RuntimeError, match="simulated crash at step 2"):
            run_pipeline(load_pipeline_config(pipeline(crash=True, name="first")))
        a_marker_time = (run_dir / "a" / MARKER).stat().st_mtime_ns
        results = run_pipeline(load_pipeline_config(pipeline(crash=False, name="second")))
    return {"root": root, "run_dir": run_dir, "probes": probes, "results": results, "a_marker_time": a_marker_time}


def saved_state(checkpoint: Path) -> dict[str, dict]:
    """The optimizer state saved in a single-file checkpoint, by parameter name (via the recorded names)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    names = [n for group in saved["optimizer_param_names"] for n in group]
    keys = [k for group in saved["optimizer_states"][0]["param_groups"] for k in group["params"]]
    return {n: saved["optimizer_states"][0]["state"][k] for n, k in zip(names, keys)}


def assert_same_state(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    assert actual.keys() == expected.keys() and len(actual) > 0
    for name in expected:
        assert set(actual[name]) == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, value in expected[name].items():
            torch.testing.assert_close(actual[name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")


def test_handoff_restarts_schedule_and_step_and_carries_the_moments(run):
    start = torch.load(run["probes"] / "first" / "b-start.pt", weights_only=False)
    assert start["global_step"] == 0 and start["scheduler_last_epoch"] == 0
    assert start["lr"] == 0.0  # linear warmup from 0, as at the start of any run
    lrs = torch.load(run["probes"] / "first" / "b-lrs.pt")
    assert lrs == pytest.approx([0.0, LR / 2, LR])  # warmup_steps 2; the crash came as step 3 began
    a_final = run["run_dir"] / "a" / "checkpoints" / FINAL_CHECKPOINT
    expected = saved_state(a_final)
    assert all(float(state["step"]) == 3 for state in expected.values())  # a's AdamW took 3 steps
    assert_same_state(start["state"], expected)
    # the weights come from a's export (float32: exact), the RoPE base from b's override
    a_weights = torch.load(a_final, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in start["weights"].items():
        torch.testing.assert_close(value, a_weights[name], rtol=0, atol=0, msg=name)
    assert start["rope_theta"] == 1.28e8
    assert torch.load(run["probes"] / "first" / "a-start.pt", weights_only=False)["rope_theta"] == 8.0e6


def test_rerun_skips_the_finished_phase_and_resumes_the_interrupted_one(run):
    a, b = run["results"]
    assert a.actions == ["skipped"] and (run["run_dir"] / "a" / MARKER).stat().st_mtime_ns == run["a_marker_time"]
    assert not (run["probes"] / "second" / "a-start.pt").exists()  # a did not train again
    assert b.actions == ["resumed", "exported"]
    resumed = torch.load(run["probes"] / "second" / "b-start.pt", weights_only=False)
    assert resumed["global_step"] == 2 and resumed["scheduler_last_epoch"] == 2
    # its own step-2 state is restored, not a's carried again
    assert_same_state(resumed["state"], saved_state(run["run_dir"] / "b" / "checkpoints" / "step2.ckpt"))
    final = torch.load(run["run_dir"] / "b" / "checkpoints" / FINAL_CHECKPOINT, map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 4
    assert (run["run_dir"] / "b" / "export" / "config.json").is_file()


def test_summary_lists_tokens_and_final_losses(run):
    a, b = run["results"]
    assert (a.steps, a.tokens) == (3, 3 * MICRO_BATCH * SEQ_LEN)
    assert (b.steps, b.tokens) == (4, 4 * MICRO_BATCH * SEQ_LEN)  # the resumed phase counts its whole stream
    for result in (a, b):
        assert set(result.metrics) >= {"train/loss", "val/loss"} and 0 < result.metrics["val/loss"] < 20
    table = (run["run_dir"] / "summary.md").read_text().splitlines()
    assert table[0].startswith("| phase | steps | tokens | train/loss | val/loss")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| a", "| b"]
    assert "| 768 |" in table[2] and "| 1K |" in table[3]  # 3 x 2 x 128 and 4 x 2 x 128 tokens


def test_carrying_into_a_different_model_fails_before_training(run):
    """A phase whose parameters differ from the carried state's (1 layer instead of 2) stops at fit start."""
    phases = [
        phase("a", 3, Path("unused"), run["probes"] / "third"),
        phase("c", 2, run["root"] / "data", run["probes"] / "third", carry_optimizer=True, init_from="a",
              overrides={"model.init_args.llama.overrides": {"num_hidden_layers": 1}}),
    ]
    path = write_pipeline(run["root"] / "third.yaml", run["run_dir"], phases)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        with pytest.raises(ValueError, match=r"saved parameters are not in this phase's optimizer.*layers\.1\."):
            run_pipeline(load_pipeline_config(path))
    assert not (run["probes"] / "third" / "c-start.pt").exists()  # training never started
    assert not list((run["run_dir"] / "c" / "checkpoints").glob("*.ckpt"))


def test_a_missing_carried_checkpoint_fails_before_training(run, tmp_path):
    """Phase a finished (marker, export) but its final checkpoint is gone: b cannot carry its moments."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"] / "a", run_dir / "a", ignore=shutil.ignore_patterns("checkpoints"))
    phases = [phase("a", 3, run["root"] / "data", tmp_path / "probes"),
              phase("b", 2, run["root"] / "data", tmp_path / "probes", carry_optimizer=True)]
    path = write_pipeline(tmp_path / "pipeline.yaml", run_dir, phases)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        with pytest.raises(FileNotFoundError, match=r"phases\[1\] \(b\)\.carry_optimizer: phase 'a'.*final.ckpt"):
            run_pipeline(load_pipeline_config(path))
    assert not (run_dir / "b").exists()


@pytest.mark.parametrize(
    "phases, error",
    [
        ([{"name": "a", "config": "configs/demo/pretrain.yaml"},
          {"name": "b", "config": "configs/demo/pretrain.yaml", "init_from": "stage1"}],
         r"phases\[1\] \(b\)\.init_from: 'stage1' is not a phase of this pipeline"),
        ([{"name": "a", "config": "configs/demo/pretrain.yaml", "init_from": "b"},
          {"name": "b", "config": "configs/demo/pretrain.yaml"}],
         r"phases\[0\] \(a\)\.init_from: 'b' is a later phase"),
        ([{"name": "a", "config": "configs/demo/pretrain.yaml", "carry_optimizer": True}],
         r"phases\[0\] \(a\)\.carry_optimizer: needs init_from"),
        ([{"name": "a", "config": "configs/demo/missing.yaml"}], r"phases\[0\] \(a\)\.config: .* does not exist"),
        ([{"name": "a", "config": "configs/demo/pretrain.yaml"}, {"name": "a", "config": "configs/demo/pretrain.yaml"}],
         r"phases\[1\]\.name: 'a' is used by an earlier phase"),
        ([{"name": "a", "config": "configs/demo/pretrain.yaml", "carry": True}], r"phases\[0\]\.carry: unknown"),
    ],
)
def test_bad_pipeline_files_fail_before_anything_is_written(tmp_path, monkeypatch, phases, error):
    monkeypatch.chdir(REPO)
    path = write_pipeline(tmp_path / "pipeline.yaml", tmp_path / "run", phases)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_pipeline_config(path)
    assert not (tmp_path / "run").exists()


def test_an_override_that_does_not_parse_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    phases = [{"name": "a", "config": "configs/demo/pretrain.yaml", "overrides": {"trainer.max_stepz": 3}}]
    config = load_pipeline_config(write_pipeline(tmp_path / "pipeline.yaml", tmp_path / "run", phases))
    with pytest.raises(ValueError, match=r"phases\[0\] \(a\): its fit config does not parse.*max_stepz"):
        run_pipeline(config)
    assert not (tmp_path / "run").exists()


def _checkpoint_file(path: Path, when: int) -> Path:
    """A small single-file Lightning-like checkpoint (loads, holds a state_dict), modified at `when`."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": when}, path)
    os.utime(path, (when, when))
    return path


def _distributed_checkpoint(path: Path, when: int) -> Path:
    """A real torch.distributed.checkpoint directory plus Lightning's meta.pt, modified at `when`."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": when}, path / "meta.pt")
    for file in path.iterdir():
        os.utime(file, (when, when))
    return path


def test_an_interrupted_phase_resumes_from_its_newest_checkpoint(tmp_path):
    """last.ckpt / step files (periodic) against the hpc_ckpt_<N> a Slurm requeue writes into the phase
    directory; a newer checkpoint that does not load is set aside for the newest one that does."""
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = _checkpoint_file(tmp_path / "checkpoints" / "last.ckpt", 1000)
    assert resume_checkpoint(tmp_path) == last
    for n, when in ((1, 2000), (2, 3000)):  # distributed checkpoints: directories of shards
        _distributed_checkpoint(tmp_path / f"hpc_ckpt_{n}.ckpt", when)
    assert resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"
    os.utime(last, (4000, 4000))  # a periodic checkpoint after the requeue's
    assert resume_checkpoint(tmp_path) == last
    _checkpoint_file(tmp_path / "checkpoints" / FINAL_CHECKPOINT, 5000)  # never a resume point
    assert resume_checkpoint(tmp_path) == last

    # a truncated newer last.ckpt and a distributed one with a short shard: both set aside, hpc_ckpt_1 resumes
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    os.utime(last, (4000, 4000))
    shard = next((tmp_path / "hpc_ckpt_2.ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-4])
    assert resume_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert (tmp_path / "checkpoints" / "last.ckpt.unloadable").is_file() and not last.exists()
    assert (tmp_path / "hpc-ckpt-2.ckpt.unloadable").is_dir()  # out of Lightning's "hpc_ckpt_" name scan


def test_an_interrupted_phase_whose_checkpoints_all_fail_to_load_stops(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from loads: .*last\.ckpt' is truncated"):
        resume_checkpoint(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # a refusal leaves the files alone
