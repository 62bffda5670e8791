"""MixtureDataModule on real litdata shards: contents, shares, sharding, exact resume, validation, errors."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from prolong_lit.data.datamodule import DomainReader, MixtureDataModule
from prolong_lit.data.format import Manifest
from tests.helpers.data_factory import domain_code, make_sample

WEIGHTS = {"a": 0.3, "b": 0.3, "c": 0.03, "d": 0.37}


def make_dm(data_dir, **kwargs) -> MixtureDataModule:
    args = {"weights": WEIGHTS, "seq_len": 64, "micro_batch_size": 2, "val_samples_per_domain": 3, "num_workers": 0}
    return MixtureDataModule(str(data_dir), **{**args, **kwargs})


def take(loader_or_stream, n: int) -> list:
    it = iter(loader_or_stream)
    return [next(it) for _ in range(n)]


def rows(batches) -> list[tuple[int, int]]:
    """(global index, input_ids fingerprint) of every row, in order."""
    return [(int(k), int(ids.sum())) for b in batches for k, ids in zip(b.sample_index, b.input_ids)]


def test_rows_are_the_planned_samples(mixture_dir):
    dm = make_dm(mixture_dir)
    dm.setup("fit")
    assert dm.domains == ["a", "b", "c", "d"] and dm.manifest.seq_len == 64
    for batch in take(dm.train_stream(rank=0, world_size=1), 30):
        for row, (k, d) in enumerate(zip(batch.sample_index.tolist(), batch.domain_ids.tolist())):
            plan_d, item = dm.plan[k]
            expected = make_sample(item, dm.domains[d], 64, with_loss_mask=dm.domains[d] == "c")
            assert plan_d == d and batch.input_ids[row, 0] == domain_code(dm.domains[d])
            assert np.array_equal(batch.input_ids[row].numpy(), expected["input_ids"])


def test_token_shares_within_one_point_over_10000_samples(mixture_dir):
    dm = make_dm(mixture_dir, micro_batch_size=200)
    dm.setup("fit")
    counts = np.zeros(4)
    for batch in take(dm.train_stream(rank=0, world_size=1), 50):
        counts += np.bincount(batch.domain_ids.numpy(), minlength=4) * batch.input_ids.shape[1]
    shares = counts / counts.sum()
    assert np.abs(shares - np.array(list(WEIGHTS.values()))).max() < 0.01, shares


def test_reads_the_whole_domain_whatever_litdata_detects(mixture_dir, monkeypatch):
    # litdata reads WORLD_SIZE/GLOBAL_RANK from the environment; its len() then halves, ds[i] must not change
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GLOBAL_RANK", "1")
    reader = DomainReader(mixture_dir, ["d"])
    assert len(reader.datasets[0]) == 25  # litdata's per-rank length
    for item in (0, 26, 49):
        assert np.array_equal(reader.read(0, item)["input_ids"], make_sample(item, "d", 64)["input_ids"])


def test_workers_give_the_same_micro_batches(mixture_dir):
    single = take(make_dm(mixture_dir, num_workers=0).train_dataloader(), 7)
    multi = take(make_dm(mixture_dir, num_workers=2).train_dataloader(), 7)
    assert rows(single) == rows(multi)
    assert [int(b.sample_index[0]) for b in multi] == list(range(0, 14, 2))


def test_ranks_together_give_the_single_process_stream(mixture_dir):
    dm = make_dm(mixture_dir, micro_batch_size=3)
    dm.setup("fit")
    single = rows(take(dm.train_stream(0, 1), 8))
    per_rank = [take(dm.train_stream(r, 2), 4) for r in range(2)]
    interleaved = [b for m in range(4) for b in (per_rank[0][m], per_rank[1][m])]
    assert rows(interleaved) == single


def test_step_loss_tokens_is_the_sum_over_the_step_on_all_ranks(mixture_dir):
    dm = make_dm(mixture_dir, micro_batch_size=2)
    dm.setup("fit")
    for phase in (0, 1):
        streams = [dm.train_stream(r, world_size=2, accumulate=3, phase=phase) for r in range(2)]
        batches = [take(s, 8) for s in streams]  # micro-batches 0..7: steps 0, 1 and part of 2
        for step in range(2):
            ms = [m for m in range(8) if streams[0].layout.step_of(m) == step]
            group = [batches[r][m] for r in range(2) for m in ms]
            assert len(group) == 2 * (3 - phase if step == 0 else 3)
            assert {int(b.step_loss_tokens) for b in group} == {sum(int(b.loss_tokens) for b in group)}


def test_resume_on_another_world_size_continues_the_stream(mixture_dir):
    first = make_dm(mixture_dir, micro_batch_size=2)
    first.setup("fit")
    uninterrupted = rows(take(first.train_stream(0, 1), 10))
    state = {**first.state_dict(), "consumed_samples": 8}  # 2 steps of 2 ranks x 2 rows, saved by a 2-rank run
    resumed = make_dm(mixture_dir, micro_batch_size=2)
    resumed.load_state_dict(state)
    assert rows(take(resumed.train_stream(0, 1), 6)) == uninterrupted[8:]


def test_validation_is_held_out_and_sharded(mixture_dir):
    dm = make_dm(mixture_dir, val_batch_size=4)
    dm.setup("fit")
    items = dm.val_items()
    manifest = Manifest.read(mixture_dir)
    assert items == [
        (d, n - 3 + j) for d, name in enumerate(dm.domains) for n in [manifest.domains[name].samples] for j in range(3)
    ]
    # training never reads a held-out item, over more than two passes of every domain
    train_domains, train_items = dm.plan.lookup(np.arange(20_000))
    train = set(zip(train_domains.tolist(), train_items.tolist()))
    assert not train & set(items)
    assert len(train) == sum(s.samples - 3 for s in manifest.domains.values())
    # 12 items over 5 ranks: 3 rows each (3 padding rows), in order, same batch count everywhere
    shards = [list(dm.val_stream(r, 5)) for r in range(5)]
    assert [len(s) for s in shards] == [1] * 5
    seen = sorted(i for s in shards for b in s for i in b.sample_index.tolist() if i >= 0)
    assert seen == list(range(12))
    for s in shards:
        for b in s:
            padding = b.sample_index < 0
            assert torch.all(b.labels[padding] == -100)
            for row in torch.nonzero(~padding).flatten().tolist():
                d, item = items[int(b.sample_index[row])]
                assert np.array_equal(b.input_ids[row].numpy(), make_sample(item, dm.domains[d], 64)["input_ids"])


def test_incompatible_checkpoint_is_refused(mixture_dir):
    dm = make_dm(mixture_dir)
    dm.setup("fit")
    state = dm.state_dict()
    assert state["consumed_samples"] == 0
    for kwargs, setting in [
        ({"seed": 1}, "data.seed"),
        ({"weights": {**WEIGHTS, "a": 0.5}}, "data.weights"),
        ({"val_samples_per_domain": 2}, "data.val_samples_per_domain"),
    ]:
        other = make_dm(mixture_dir, **kwargs)
        with pytest.raises(ValueError, match=setting):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="data.seq_len: this run's seq_len 64 differs from the checkpoint's 32"):
        make_dm(mixture_dir).load_state_dict({**state, "seq_len": 32})
    with pytest.raises(ValueError, match="data.weights"):
        make_dm(mixture_dir).load_state_dict({**state, "domains": ["a", "b", "c", "e"]})
    # same stream with more workers, a bigger micro-batch and scaled weights: accepted
    make_dm(
        mixture_dir, num_workers=2, micro_batch_size=4, weights={k: 10 * v for k, v in WEIGHTS.items()}
    ).load_state_dict({**state, "consumed_samples": 12})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": {**WEIGHTS, "a": 0.0}}, "data.weights: the weight of domain 'a' must be a positive"),
        ({"weights": {**WEIGHTS, "b": -1.0}}, "data.weights: the weight of domain 'b'"),
        ({"weights": {}}, "data.weights"),
        ({"micro_batch_size": 0}, "data.micro_batch_size"),
        ({"seed": -1}, "data.seed"),
    ],
)
def test_bad_arguments_are_named(mixture_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(mixture_dir, **kwargs)


def test_bad_data_is_named_before_loading(mixture_dir, prepared_data, tmp_path):
    cases = [
        (make_dm(tmp_path / "nowhere"), FileNotFoundError, "data.data_dir: .* is not a directory"),
        (make_dm(tmp_path), FileNotFoundError, "data.data_dir: .* holds no manifest.json"),
        (
            make_dm(mixture_dir, weights={"a": 1, "b": 1, "c": 1}),
            ValueError,
            # both lists named, whichever side lacks a domain
            r"data.weights: domain 'd' .* has no weight \(data.weights names \['a', 'b', 'c'\]; .* holds "
            r"\['a', 'b', 'c', 'd'\]\)",
        ),
        (
            make_dm(mixture_dir, weights={**WEIGHTS, "e": 1}),
            ValueError,
            r"data.weights: domain 'e' is not in .* \(data.weights names \['a', 'b', 'c', 'd', 'e'\]; .* holds "
            r"\['a', 'b', 'c', 'd'\]\)",
        ),
        (make_dm(mixture_dir, seq_len=128), ValueError, r"data.seq_len \(128\) must equal .* \(64"),
        (make_dm(mixture_dir, val_samples_per_domain=16), ValueError, "data.val_samples_per_domain .* domain 'c'"),
        (make_dm(mixture_dir, weights={**WEIGHTS, "c": 0.0003}), ValueError, "data.weights: domain 'c' .* no sample"),
    ]
    for dm, error, match in cases:
        with pytest.raises(error, match=match):
            dm.setup("fit")
        assert dm.plan is None and dm.reader is None
    # a manifest that disagrees with the litdata index
    small = prepared_data({"x": 5}, 16)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["domains"]["x"]["samples"] = 6
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x").symlink_to(small / "x")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="data.data_dir: manifest.json says domain 'x' has 6 samples"):
        MixtureDataModule(str(broken), {"x": 1.0}, seq_len=16, val_samples_per_domain=1).setup("fit")


# ---- with a real Trainer ---------------------------------------------------------------------------------


class Recorder(L.LightningModule):
    """Records what the trainer fed it; one scalar parameter so optimizer steps happen."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_seen: list[tuple] = []
        self.val_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.train_seen.append(
            (self.trainer.global_step, *rows([batch]), int(batch.loss_tokens), int(batch.step_loss_tokens))
        )
        return self.w * batch.loss_tokens.float() / batch.step_loss_tokens

    def validation_step(self, batch, batch_idx):
        self.val_seen.extend(batch.sample_index.tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, max_steps, accumulate, ckpt_dir=None, ckpt_path=None, **trainer_kwargs) -> Recorder:
    callbacks = []
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        **{"limit_val_batches": 0, **trainer_kwargs},
    )
    model = Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def steps_of(model: Recorder) -> dict[int, list[tuple]]:
    groups: dict[int, list[tuple]] = {}
    for entry in model.train_seen:
        groups.setdefault(entry[0], []).append(entry)
    return groups


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_resume_is_exact(mixture_dir, tmp_path, num_workers):
    whole = fit(make_dm(mixture_dir, num_workers=num_workers), max_steps=5, accumulate=2)
    fit(make_dm(mixture_dir, num_workers=num_workers), max_steps=2, accumulate=2, ckpt_dir=tmp_path)
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    assert torch.load(ckpt, weights_only=False)["MixtureDataModule"]["consumed_samples"] == 2 * 2 * 2
    resumed = fit(make_dm(mixture_dir, num_workers=num_workers), max_steps=5, accumulate=2, ckpt_path=ckpt)
    assert resumed.train_seen == whole.train_seen[4:]
    assert [e[1][0] for e in whole.train_seen] == list(range(0, 20, 2))
    for group in steps_of(whole).values():
        assert {e[-1] for e in group} == {sum(e[-2] for e in group)}


def test_trainer_resume_with_another_accumulation(mixture_dir, tmp_path):
    fit(make_dm(mixture_dir), max_steps=3, accumulate=2, ckpt_dir=tmp_path)  # 6 micro-batches, 12 samples
    resumed = fit(
        make_dm(mixture_dir),
        max_steps=5,
        accumulate=4,
        ckpt_dir=tmp_path / "again",
        ckpt_path=tmp_path / "epoch=0-step=3.ckpt",
    )
    groups = steps_of(resumed)
    # Lightning counts 6 batches already, so its first step after the resume takes 2 micro-batches, then 4
    assert [len(g) for g in groups.values()] == [2, 4]
    assert [e[1][0] for e in resumed.train_seen] == list(range(12, 24, 2))
    for group in groups.values():
        assert {e[-1] for e in group} == {sum(e[-2] for e in group)}
    # saved at step 5: 12 restored + (2 + 4) micro-batches of 2 rows
    saved = torch.load(tmp_path / "again" / "epoch=0-step=5.ckpt", weights_only=False)["MixtureDataModule"]
    assert saved["consumed_samples"] == 24


def test_trainer_runs_validation_on_held_out_items(mixture_dir):
    model = fit(
        make_dm(mixture_dir, val_batch_size=5),
        max_steps=2,
        accumulate=1,
        limit_val_batches=None,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    assert model.val_seen == list(range(12))
