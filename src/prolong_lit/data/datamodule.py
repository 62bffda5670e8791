"""MixtureDataModule: streams prepared domains in a weighted mixture whose order is a pure function of the seed.

One litdata `StreamingDataset` per domain gives random access to its items; `MixturePlan` says which (domain,
item) the k-th sample of the run is; `StreamLayout` says which samples rank r's micro-batch m holds. The
DataModule's checkpointed state is one number (samples consumed) plus the settings that define the stream, so a
resume is exact with any number of dataloader workers, and a resume on a different number of ranks continues
the same global stream. The last `val_samples_per_domain` items of every domain are held out for validation.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prolong_lit.data.balance import assign_step, identity_assignment, row_cost
from prolong_lit.data.collate import collate_samples, sample_loss_tokens
from prolong_lit.data.format import DOC_LENGTHS, LOSS_MASK, Manifest, PackedBatch
from prolong_lit.data.mixture import BLOCK_SIZE, MixturePlan, StreamLayout, block_counts
from prolong_lit.data.verify import check_prepared_dir, verify_domain
from prolong_lit.errors import CheckpointError, ConfigError, MissingPathError

logger = logging.getLogger(__name__)


def _worker_rank_and_count() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def count_items(domain_dir: Path) -> int:
    """Samples in a litdata-optimized directory, from its index.json (the whole domain, whatever the world
    size: litdata's `len()` divides by the ranks it detects, its `ds[i]` does not)."""
    index = domain_dir / "index.json"
    if not index.is_file():
        raise MissingPathError(f"data.data_dir: {str(domain_dir)!r} holds no index.json; run `prepare` again")
    return sum(int(chunk["chunk_size"]) for chunk in json.loads(index.read_text())["chunks"])


class DomainReader:
    """Random access to every domain's items: one litdata `StreamingDataset` per domain.

    `ds[i]` maps i to (chunk, offset) over the whole dataset, independent of the distributed environment
    litdata detects, so every rank sees every item and the mixture does its own sharding.
    """

    def __init__(self, data_dir: str | Path, domains: list[str]) -> None:
        from litdata import StreamingDataset

        self.datasets = [StreamingDataset(input_dir=str(Path(data_dir) / name)) for name in domains]

    def read(self, domain: int, item: int) -> dict[str, np.ndarray]:
        return self.datasets[domain][int(item)]


class MixtureTrainStream(IterableDataset):
    """Rank `rank`'s infinite stream of collated training micro-batches.

    With a DataLoader of `num_workers` = nw and batch_size=None, worker w builds micro-batches m = w, w+nw, ...;
    the DataLoader hands them out round-robin in order, so the sequence is the same as with no workers.
    Rank and world size are plain arguments: any rank's stream can be built in any process. With `balance`,
    the rows of each optimizer step are dealt to (micro-batch, rank) by their attention cost (data/balance.py).
    """

    def __init__(
        self, plan: MixturePlan, reader: DomainReader, layout: StreamLayout, rank: int, balance: bool = False
    ) -> None:
        super().__init__()
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside the data-parallel world of {layout.world_size}")
        self.plan, self.reader, self.layout, self.rank, self.balance = plan, reader, layout, rank, balance
        # (step, its loss tokens, its global indices as (slot, rank, row)), per worker
        self._step_cache: tuple[int, int, np.ndarray] | None = None

    def _step(self, step: int) -> tuple[int, np.ndarray]:
        """(loss tokens of every sample of the step on all ranks, the step's indices dealt to (slot, rank, row)),
        from one read of the step's samples in the pure stream."""
        if self._step_cache is None or self._step_cache[0] != step:
            indices = self.layout.step_indices(step)
            domains, items = self.plan.lookup(indices)
            samples = [self.reader.read(d, i) for d, i in zip(domains, items)]
            total = sum(sample_loss_tokens(sample) for sample in samples)
            grid = (self.layout.step_slots(step), self.layout.world_size, self.layout.micro_batch_size)
            if self.balance:
                positions = assign_step([row_cost(sample[DOC_LENGTHS]) for sample in samples], *grid)
            else:
                positions = identity_assignment(*grid)
            self._step_cache = (step, total, indices[positions])
        return self._step_cache[1], self._step_cache[2]

    def step_loss_tokens(self, step: int) -> int:
        """Loss tokens of every sample of an optimizer step on all ranks, read from the pure stream."""
        return self._step(step)[0]

    def step_rows(self, step: int) -> np.ndarray:
        """Global indices of the rows of optimizer step `step` on all ranks, as (micro-batch slot, rank, row)."""
        return self._step(step)[1]  # (slots, W, mb)

    def micro_batch_indices(self, m: int) -> np.ndarray:
        """Global indices of this rank's m-th micro-batch (the layout's, or the balanced deal of its step)."""
        return self.step_rows(self.layout.step_of(m))[self.layout.slot_of(m), self.rank]  # (mb,)

    def micro_batch(self, m: int) -> PackedBatch:
        """This rank's m-th micro-batch since the run (re)started."""
        indices = self.micro_batch_indices(m)
        domains, items = self.plan.lookup(indices)
        samples = [self.reader.read(d, i) for d, i in zip(domains, items)]
        step_tokens = self.step_loss_tokens(self.layout.step_of(m))
        return collate_samples(samples, domains, indices, step_loss_tokens=step_tokens)

    def __iter__(self):
        worker, num_workers = _worker_rank_and_count()
        m = worker
        while True:
            yield self.micro_batch(m)
            m += num_workers


class ValidationStream(IterableDataset):
    """Rank `rank`'s share of the held-out items, in order, as collated batches.

    The items are dealt to ranks round-robin and padded so every rank runs the same number of batches (ranks
    that stop early would hang collectives). Padding rows repeat the first item with no loss tokens and carry
    sample_index -1. Real rows carry their position in the validation list as sample_index.
    """

    def __init__(
        self, reader: DomainReader, items: list[tuple[int, int]], batch_size: int, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.reader, self.items, self.batch_size = reader, items, batch_size
        per_rank = math.ceil(len(items) / world_size)
        self.positions = list(range(rank, per_rank * world_size, world_size))  # >= len(items): padding

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def batch(self, m: int) -> PackedBatch:
        positions = self.positions[m * self.batch_size : (m + 1) * self.batch_size]
        samples, domains, index = [], [], []
        for p in positions:
            d, item = self.items[p if p < len(self.items) else 0]
            sample = dict(self.reader.read(d, item))
            if p >= len(self.items):
                sample[LOSS_MASK] = np.zeros(len(sample["input_ids"]), dtype=np.uint8)
            samples.append(sample)
            domains.append(d)
            index.append(p if p < len(self.items) else -1)
        return collate_samples(samples, domains, index)

    def __iter__(self):
        worker, num_workers = _worker_rank_and_count()
        for m in range(worker, len(self), num_workers):
            yield self.batch(m)


class MixtureDataModule(L.LightningDataModule):
    """Weighted mixture of prepared domains with exact, world-size-independent resume.

    Args:
        data_dir: directory written by `prepare` (manifest.json plus one litdata directory per domain).
        weights: domain -> weight, the share of training tokens of each domain; normalised to sum to 1.
        seq_len: tokens per sample; must equal the seq_len the data was prepared with.
        micro_batch_size: rows per micro-batch on each rank.
        val_samples_per_domain: last items of every domain held out for validation (never trained on).
        seed: seed of the sample order (the order is a pure function of seed and global sample index).
        num_workers: dataloader worker processes per rank (0 reads in the training process).
        val_batch_size: rows per validation batch; defaults to micro_batch_size.
        balance_micro_batches: deal the rows of every optimizer step to (micro-batch, rank) so that the ranks'
            attention costs (Σ doc_len² per row) are even in each micro-batch (data/balance.py); the rows of each
            step, hence its loss and gradients, are the same. A no-op with one rank and one row per micro-batch.
    """

    def __init__(
        self,
        data_dir: str,
        weights: dict[str, float],
        seq_len: int,
        micro_batch_size: int = 1,
        val_samples_per_domain: int = 8,
        seed: int = 42,
        num_workers: int = 1,
        val_batch_size: int | None = None,
        balance_micro_batches: bool = False,
    ) -> None:
        super().__init__()
        if not weights:
            raise ConfigError("data.weights: give at least one domain and its weight")
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(
                    f"data.weights: the weight of domain {name!r} must be a positive number, got {weight!r}"
                )
        for setting, value, low in [
            ("data.seq_len", seq_len, 2),
            ("data.micro_batch_size", micro_batch_size, 1),
            ("data.val_samples_per_domain", val_samples_per_domain, 0),
            ("data.num_workers", num_workers, 0),
            ("data.val_batch_size", 1 if val_batch_size is None else val_batch_size, 1),
        ]:
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{setting} must be an integer >= {low}, got {value!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"data.seed must be an integer in [0, 2**32), got {seed!r}")
        self.data_dir = data_dir
        self.domains = sorted(weights)
        total = float(sum(weights.values()))
        self.weights = {name: weights[name] / total for name in self.domains}
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.val_samples_per_domain = val_samples_per_domain
        self.seed = seed
        self.num_workers = num_workers
        self.val_batch_size = val_batch_size or micro_batch_size
        if not isinstance(balance_micro_batches, bool):
            raise ConfigError(f"data.balance_micro_batches must be true or false, got {balance_micro_batches!r}")
        self.balance_micro_batches = balance_micro_batches
        self.manifest: Manifest | None = None
        self.plan: MixturePlan | None = None
        self.reader: DomainReader | None = None
        self._start_sample = 0  # consumed samples restored from a checkpoint
        self._start_step = 0  # trainer.global_step when the train stream was built
        self._layout: StreamLayout | None = None

    # ---- set-up -------------------------------------------------------------------------------------------

    def _train_items(self) -> dict[str, int]:
        assert self.manifest is not None
        return {d: self.manifest.domains[d].samples - self.val_samples_per_domain for d in self.domains}

    def _validate(self, manifest: Manifest) -> None:
        # A mismatch either way is an error naming both lists: a typo or a data directory of the wrong stage is
        # then visible at a glance.
        both = f"(data.weights names {sorted(self.weights)}; {self.data_dir!r} holds {sorted(manifest.domains)})"
        for name in self.domains:
            if name not in manifest.domains:
                raise ConfigError(f"data.weights: domain {name!r} is not in {self.data_dir!r} {both}")
        for name in sorted(manifest.domains):
            if name not in self.weights:
                raise ConfigError(f"data.weights: domain {name!r} of {self.data_dir!r} has no weight {both}")
        if manifest.seq_len != self.seq_len:
            raise ConfigError(
                f"data.seq_len ({self.seq_len}) must equal the seq_len the data was prepared with "
                f"({manifest.seq_len}, data.data_dir {self.data_dir!r})"
            )
        for name in self.domains:
            samples = manifest.domains[name].samples
            if samples < self.val_samples_per_domain + 1:
                raise ConfigError(
                    f"data.val_samples_per_domain ({self.val_samples_per_domain}) leaves no training item in "
                    f"domain {name!r}, which has {samples} samples"
                )
            # every chunk file's size and header, before litdata opens one (a truncated chunk hangs its reader)
            on_disk = verify_domain(Path(self.data_dir) / name)
            if on_disk != samples:
                raise ConfigError(
                    f"data.data_dir: manifest.json says domain {name!r} has {samples} samples but its index.json "
                    f"holds {on_disk}; run `prepare` again"
                )
        for name, count in zip(self.domains, block_counts(list(self.weights.values()))):
            if count == 0:
                raise ConfigError(
                    f"data.weights: domain {name!r} (weight {self.weights[name]:.2g}) gets no sample in a block of "
                    f"{BLOCK_SIZE}; raise its weight to at least {1 / BLOCK_SIZE} or drop the domain"
                )

    def setup(self, stage: str | None = None) -> None:
        """Check the settings against the prepared data, then open one StreamingDataset per domain.

        Runs on every rank after the process group exists (Lightning calls it from the Trainer)."""
        if self.plan is not None:
            return
        check_prepared_dir(self.data_dir)  # a directory, a finished prepare's (not a killed one's), a manifest
        manifest = Manifest.read(self.data_dir, setting="data.data_dir")
        self._validate(manifest)
        self.manifest = manifest
        train_items = self._train_items()
        self.plan = MixturePlan(self.domains, list(self.weights.values()), list(train_items.values()), self.seed)
        self.reader = DomainReader(self.data_dir, self.domains)
        if self._data_parallel_rank_and_size()[0] == 0:
            shares = ", ".join(f"{d} {w:.3f} ({train_items[d]} train items)" for d, w in self.weights.items())
            logger.info("Mixture of %d domains at seq_len %d: %s", len(self.domains), self.seq_len, shares)
            for name in (d for d in self.domains if train_items[d] < self.micro_batch_size):
                logger.warning("data.micro_batch_size (%d) is larger than domain %r's %d training rows: a "
                               "micro-batch can hold the same row more than once (prepare more data for it, or lower "
                               "data.micro_batch_size)", self.micro_batch_size, name, train_items[name])

    # ---- what the trainer says ----------------------------------------------------------------------------

    def _data_parallel_rank_and_size(self) -> tuple[int, int]:
        """This process's rank among the ranks that read different data, and their number: the trainer's
        strategy says, through its parallel plan (prolong_lit.parallel.plan: the ranks of a sequence-parallel
        group read the same samples); under a strategy without one, every rank reads its own."""
        if self.trainer is None:
            return 0, 1
        plan = getattr(self.trainer.strategy, "parallel_plan", None)
        if plan is None:
            return self.trainer.global_rank, self.trainer.world_size
        return plan.data_parallel_rank, plan.data_parallel_size

    def _accumulate_and_phase(self) -> tuple[int, int]:
        """Trainer.accumulate_grad_batches, and how many micro-batches of its current optimizer step the
        trainer counts as already done (non-zero only after a resume that changed the accumulation)."""
        if self.trainer is None:
            return 1, 0
        accumulate = self.trainer.accumulate_grad_batches
        ready = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return accumulate, ready % accumulate

    # ---- dataloaders --------------------------------------------------------------------------------------

    def train_stream(self, rank: int, world_size: int, accumulate: int = 1, phase: int = 0) -> MixtureTrainStream:
        """The training stream of one rank, continuing from the consumed samples (restored or 0)."""
        if self.plan is None:
            self.setup("fit")
        layout = StreamLayout(self._start_sample, self.micro_batch_size, accumulate, world_size, phase)
        return MixtureTrainStream(self.plan, self.reader, layout, rank, balance=self.balance_micro_batches)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._data_parallel_rank_and_size()
        accumulate, phase = self._accumulate_and_phase()
        stream = self.train_stream(rank, world_size, accumulate, phase)
        self._layout = stream.layout
        self._start_step = self.trainer.global_step if self.trainer is not None else 0
        if rank == 0:
            logger.info(
                "Training stream starts at sample %d: %d samples per optimizer step (%d x %d accumulation x %d "
                "ranks)%s",
                self._start_sample,
                stream.layout.samples_per_step,
                self.micro_batch_size,
                accumulate,
                world_size,
                ", micro-batches balanced by attention cost" if self.balance_micro_batches else "",
            )
        return self._loader(stream)

    def val_items(self) -> list[tuple[int, int]]:
        """The held-out (domain index, item) pairs: the last val_samples_per_domain items of each domain."""
        if self.plan is None:
            self.setup("validate")
        train_items = self._train_items()
        return [
            (d, item)
            for d, name in enumerate(self.domains)
            for item in range(train_items[name], train_items[name] + self.val_samples_per_domain)
        ]

    def val_stream(self, rank: int, world_size: int) -> ValidationStream:
        return ValidationStream(self.reader, self.val_items(), self.val_batch_size, rank, world_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_samples_per_domain == 0:
            return []
        return self._loader(self.val_stream(*self._data_parallel_rank_and_size()))

    def _loader(self, stream: IterableDataset) -> DataLoader:
        # batch_size=None: the streams yield collated micro-batches. An IterableDataset also keeps Lightning
        # from injecting a DistributedSampler (the streams shard themselves).
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_leave_job_signals_to_trainer if self.num_workers > 0 else None,
        )

    # ---- checkpointed state -------------------------------------------------------------------------------

    def consumed_samples(self) -> int:
        """Global samples of the stream consumed by finished optimizer steps."""
        if self._layout is None or self.trainer is None:
            return self._start_sample
        return self._layout.consumed(self.trainer.global_step - self._start_step)

    def _stream_settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "domains": list(self.domains),
            "weights": dict(self.weights),
            "seq_len": self.seq_len,
            "block_size": BLOCK_SIZE,
            "train_items": self._train_items() if self.manifest is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples(), **self._stream_settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's stream; refuse a checkpoint whose stream differs from this run's.

        Lightning calls it after `setup` and before `train_dataloader`, which then starts at the restored
        sample. A different world size, worker count, micro-batch size or accumulation is fine."""
        if self.plan is None:
            self.setup("fit")
        mine = self._stream_settings()
        checks = [
            ("data.seed", "seed"),
            ("data.weights", "domains"),
            ("data.seq_len", "seq_len"),
            ("data.weights", "block_size"),
            ("data.data_dir or data.val_samples_per_domain", "train_items"),
        ]
        for setting, key in checks:
            if state_dict.get(key) != mine[key]:
                raise CheckpointError(
                    f"{setting}: this run's {key} {mine[key]!r} differs from the checkpoint's {state_dict.get(key)!r}; "
                    f"a resumed run must read the same data stream (restore the setting, or start a new run)"
                )
        theirs = state_dict["weights"]
        if any(not math.isclose(theirs[d], mine["weights"][d], rel_tol=1e-9) for d in self.domains):
            raise CheckpointError(
                f"data.weights: this run's normalised weights {mine['weights']} differ from the checkpoint's {theirs}; "
                f"a resumed run must read the same data stream (restore the weights, or start a new run)"
            )
        self._start_sample = int(state_dict["consumed_samples"])
        self._layout = None
        if self._data_parallel_rank_and_size()[0] == 0:
            logger.info("Restored the data stream at sample %d", self._start_sample)


def _leave_job_signals_to_trainer(worker_id: int) -> None:
    """Slurm signals every process of a job step, and a forked worker inherits Lightning's SIGUSR1/SIGTERM
    handlers: it would write the requeue checkpoint and requeue the job too. Only the training process acts;
    a worker ends when its parent does."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
