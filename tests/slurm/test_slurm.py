"""The sbatch template on a real Slurm (2 emulated nodes x 1 task, CPU, FSDP2 over gloo): training, auto-requeue.

Needs a running cluster: `make test-slurm`, or `scripts/slurm/local_cluster.sh up` first; skipped otherwise.
Each job gets two config files, as the FSDP2 demo runs (`--config pretrain.yaml --config pretrain-fsdp.yaml`): the
demo config on tiny data, then the FSDP2 demo's delta (its FSDP2Strategy).
Two jobs run side by side from the same configs: one straight through, one sent SIGUSR1 with
`scancel --signal=USR1` after STOP optimizer steps, so that the SlurmRequeue callback (added by ProLongCLI in
every Slurm job) checkpoints at the step boundary on both ranks (`hpc_ckpt_1.ckpt`), requeues the job, and the
requeued job resumes from that checkpoint (Lightning's own resume). Both must train on the
same disjoint per-rank samples and end in the same state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import CHECKPOINTS, DOMAINS, MICRO_BATCH, REPO, SEQ_LEN, demo_config, run_dir

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

TEMPLATE = REPO / "scripts" / "slurm" / "train.sbatch"
LOCAL_CONF = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/prolong_lit-slurm")) / "slurm.conf"
# The job trains the demo sharded as in the FSDP2 demo: its delta file (FSDP2Strategy) after the demo config.
SHARDED_DEMO = REPO / "configs" / "demo" / "pretrain-fsdp.yaml"
NODES, STEPS, STOP = 2, 6, 5  # STOP after the validation at step 4: its workers exist too
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 300


def _slurm_conf() -> Path:
    """The configuration of a running cluster with NODES usable nodes. Without one the test skips, or fails where
    PROLONG_LIT_REQUIRE_SLURM=1 (`make test-slurm`, so that a cluster that did not come up is not a pass)."""
    unavailable = pytest.fail if os.environ.get("PROLONG_LIT_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sbatch") is None:
        unavailable("no Slurm here (sbatch not on PATH): run `make test-slurm`")
    conf = Path(os.environ.get("SLURM_CONF", LOCAL_CONF))
    if not conf.is_file():
        unavailable(f"no Slurm cluster configured ({conf} missing): run `scripts/slurm/local_cluster.sh up`")
    # Against a stopped controller sinfo retries for ~9 s: look at the controller's pid file first.
    match = re.search(r"^SlurmctldPidFile=(\S+)", conf.read_text(), re.MULTILINE)
    if match is None or not _pid_alive(Path(match.group(1))):
        unavailable(f"the Slurm cluster of {conf} is not running: run `scripts/slurm/local_cluster.sh up`")
    nodes = subprocess.run(["sinfo", "-h", "-t", "idle,mix", "-o", "%D"], env={**os.environ, "SLURM_CONF": str(conf)},
                           capture_output=True, text=True, timeout=30)
    if sum(int(n) for n in nodes.stdout.split()) < NODES:
        unavailable(f"the Slurm cluster of {conf} has fewer than {NODES} usable nodes: {nodes.stdout}{nodes.stderr}")
    return conf


def _pid_alive(pid_file: Path) -> bool:
    """The process exists and is no zombie (a container's init may never reap a daemon that died)."""
    try:
        stat = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Job:
    """One sbatch submission of the template with the demo config on tiny data + the FSDP2 delta, and what it
    wrote."""

    def __init__(self, tmp_path: Path, data_dir: Path, name: str, conf: Path, hold_at: int | None = None) -> None:
        self.name = name
        self.dir = run_dir(tmp_path, name)  # trainer.default_root_dir (hpc_ckpt_*), logs/, checkpoints/, samples/
        self.output = tmp_path / f"{name}.out"
        self.markers = tmp_path / f"{name}-held"
        self.scratch = tmp_path
        config_path = demo_config(tmp_path, data_dir, name, max_steps=STEPS)
        config = yaml.safe_load(config_path.read_text())
        checkpoint = config["trainer"]["callbacks"][0]
        checkpoint["init_args"]["every_n_train_steps"] = STEPS  # only the final state is compared
        if hold_at is not None:
            hold = {"step": hold_at, "marker_dir": str(self.markers)}
            hold_callback = {"class_path": "tests.slurm.slurm_hold.HoldForRequeue", "init_args": hold}
            config["trainer"]["callbacks"].append(hold_callback)
        config_path.write_text(yaml.safe_dump(config))
        # A clean environment for sbatch: nothing of an enclosing allocation, this cluster, this venv.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        self.env.update(
            SLURM_CONF=str(conf),
            PROLONG_LIT_VENV=sys.prefix,
            PROLONG_LIT_RUN_DIR=str(self.dir),
            # the config names tests.helpers.run_helpers / tests.slurm.slurm_hold classes by dotted path
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
        )
        # The GPU template on CPU nodes: command-line options override its #SBATCH lines. Its arguments: the config
        # files in order (the template passes each as --config; the sbatch sets the topology and the run directory,
        # PROLONG_LIT_RUN_DIR, after them), then a fit argument: the FSDP2 delta's micro-batch of 1 row per rank
        # back to the demo config's MICRO_BATCH, which the sample checks below count with.
        command = ["sbatch", "--parsable", f"--job-name=prolong-lit-test-{name}", f"--nodes={NODES}",
                   "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                   f"--output={self.output}", str(TEMPLATE), str(config_path), str(SHARDED_DEMO),
                   f"--data.init_args.micro_batch_size={MICRO_BATCH}"]
        submitted = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        self.id = submitted.stdout.strip().split(";")[0]

    def state(self) -> dict[str, str]:
        """`scontrol show job` as a dict (no accounting here: a finished job stays visible for MinJobAge)."""
        shown = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.env, capture_output=True,
                               text=True, check=True, timeout=30)
        return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)

    def log(self) -> str:
        return self.output.read_text() if self.output.is_file() else "(no output)"

    def wait(self, until, what: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Polls until `until(state)` holds; fails with the job's output if it ends or times out first."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            if until(state):
                return state
            if state["JobState"] in FINAL_STATES or time.monotonic() > deadline:
                pytest.fail(f"job {self.id} ({self.name}) never {what}: {state}\n{self.log()[-6000:]}")
            time.sleep(0.5)

    def held(self, state: dict[str, str]) -> bool:
        return all((self.markers / f"rank{rank}").exists() for rank in range(NODES))

    def samples(self, rank: int) -> list[list[int]]:
        """The sample indices of each training micro-batch rank `rank` logged, in order."""
        lines = (self.dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line)["sample_index"] for line in lines]

    def checkpoint(self, path: Path) -> dict:
        """A Lightning checkpoint as one dict: a file, or a distributed (FSDP2) directory of DCP shards + meta.pt."""
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        gathered = self.scratch / "gathered" / f"{self.name}-{path.name}.pt"
        gathered.parent.mkdir(exist_ok=True)
        dcp_to_torch_save(path, gathered)
        return {**torch.load(path / "meta.pt", weights_only=False), **torch.load(gathered, weights_only=False)}

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)


def _finished(state: dict[str, str]) -> bool:
    return state["JobState"] in FINAL_STATES


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict/list, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in _tensors(value, f"{prefix}/{key}").items()}


def _trained_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Weights and optimizer state (`optimizer_states` in a file, `optimizer_0` in a distributed checkpoint)."""
    return _tensors({key: checkpoint[key] for key in ("state_dict", "optimizer_states", "optimizer_0")
                     if key in checkpoint})


def test_sbatch_trains_across_nodes_and_resumes_exactly_after_requeue(tmp_path):
    conf = _slurm_conf()
    data_dir = tmp_path / "prepared"
    write_prepared(data_dir, DOMAINS, seq_len=SEQ_LEN)
    # side by side: each job takes one of the two CPUs of each emulated node
    straight = Job(tmp_path, data_dir, "straight", conf)
    requeued = Job(tmp_path, data_dir, "requeued", conf, hold_at=STOP)
    try:
        requeued.wait(requeued.held, f"reached step {STOP} on all ranks")
        signal = subprocess.run(["scancel", "--signal=USR1", requeued.id], env=requeued.env, capture_output=True,
                                text=True, timeout=30)
        assert signal.returncode == 0, signal.stderr
        straight_state = straight.wait(_finished, "finished")
        requeued_state = requeued.wait(_finished, "finished")
    finally:
        straight.cancel()
        requeued.cancel()

    for job, state in ((straight, straight_state), (requeued, requeued_state)):
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), f"{state}\n{job.log()[-6000:]}"
    log = requeued.log()
    assert (straight_state["Restarts"], requeued_state["Restarts"]) == ("0", "1"), log[-6000:]
    # the template's banner, once per start of the batch script (--open-mode=append keeps both runs' output)
    starts = re.findall(r"prolong_lit: job \d+ restart (\d+) on n\[1-2\] \(2 nodes x 1 tasks\)", log)
    assert starts == ["0", "1"], log[-6000:]
    first_run = log[: log.index("restart 1 on")]
    assert "SLURM auto-requeueing enabled" in first_run
    # Slurm signals every process of the step; a dataloader worker forked with the handler would act as well:
    # only the training processes may (each records it; rank 0 logs the agreed checkpoint once).
    assert first_run.count("Slurm requeue signal: checkpointing at step") == 1, first_run[-6000:]
    # Lightning's own handler (a checkpoint inside the signal handler) must not have run
    assert "Handling auto-requeue signal" not in first_run, first_run[-6000:]
    assert f"requeueing Slurm job {requeued.id}" in first_run, first_run[-6000:]
    hpc = requeued.dir / "hpc_ckpt_1.ckpt"
    assert f"Restoring states from the checkpoint path at {hpc}" in log, log[-6000:]
    # FSDP2: a distributed checkpoint, one file of shards written by each rank
    assert len(list(hpc.glob("*.distcp"))) == NODES and (hpc / "meta.pt").is_file()
    assert requeued.checkpoint(hpc)["global_step"] == STOP

    # Both ranks trained on disjoint samples that together are the stream's first STEPS * MICRO_BATCH * NODES,
    # and the requeued job (its sample log appended to across the restart) read exactly the same ones.
    for job in (straight, requeued):
        per_rank = [job.samples(rank) for rank in range(NODES)]
        assert [len(batches) for batches in per_rank] == [STEPS] * NODES, job.name
        flat = [sorted(i for batch in batches for i in batch) for batches in per_rank]
        assert not set(flat[0]) & set(flat[1]), job.name
        assert sorted(flat[0] + flat[1]) == list(range(STEPS * MICRO_BATCH * NODES)), job.name
    assert [requeued.samples(r) for r in range(NODES)] == [straight.samples(r) for r in range(NODES)]

    # The same final state: weights, AdamW moments and steps, LR schedule, data stream position.
    want = straight.checkpoint(straight.dir / CHECKPOINTS / "last.ckpt")
    got = requeued.checkpoint(requeued.dir / CHECKPOINTS / "last.ckpt")
    assert got["global_step"] == want["global_step"] == STEPS
    want_state, got_state = _trained_state(want), _trained_state(got)
    assert want_state.keys() == got_state.keys() and any("exp_avg" in key for key in want_state)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=0, atol=1e-6, msg=key)
    assert got["lr_schedulers"] == want["lr_schedulers"]
    assert got["MixtureDataModule"] == want["MixtureDataModule"]

    # ~200 MB per checkpoint: keep only what a failed run leaves to inspect
    for path in [*tmp_path.rglob("*.ckpt"), tmp_path / "gathered"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
