"""The LM head under FSDP2 (2 CPU processes, gloo): gathered once per micro-batch with the `chunked` loss.

Every all-gather and reduce-scatter FSDP2 issues is counted (torch.distributed's `all_gather_single` and
`reduce_scatter_single`, which FSDP2's default collectives call) during one micro-batch's forward and backward,
with the loss cut into 8 chunks. The `checkpointed` loss (each chunk a checkpointed call of the head module)
gathers the head again for 7 of the 8 chunks in backward; the `chunked` one (one autograd function, an FSDP
forward method of the head) gathers it once, in forward, and reduce-scatters its gradient once. Both give the
same loss and the same gathered gradients (fp32: they differ only in summation order).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.ports import free_port

pytestmark = pytest.mark.distributed

VOCAB = 320  # the head's 320 x 64 weight: a size no other FSDP group has
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
ROWS = [[10, 30, 24], [64]]  # 63 + 62 = 125 loss tokens: 8 chunks of 16
CHUNK = 16
TOLERANCE = 1e-5


class CollectiveCounter:
    """Counts the FSDP2 collectives whose output has `numel` elements, by kind, while patched in."""

    def __init__(self, gathered_numel: int, shard_numel: int) -> None:
        self.sizes = {"all_gather": gathered_numel, "reduce_scatter": shard_numel}
        self.counts: Counter = Counter()
        self._originals = {}

    def _wrap(self, kind: str, original):
        def counted(*args, **kwargs):
            output = args[0] if args else kwargs["output"]
            if output.numel() == self.sizes[kind]:
                self.counts[kind] += 1
            return original(*args, **kwargs)
        return counted

    def __enter__(self) -> CollectiveCounter:
        for kind, name in (("all_gather", "all_gather_single"), ("reduce_scatter", "reduce_scatter_single")):
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(kind, self._originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings
    from prolong_lit.parallel.fsdp import ShardingConfig
    from prolong_lit.parallel.plan import build_plan
    from tests.helpers.model_batches import make_packed_batch

    results = {}
    for implementation in ("checkpointed", "chunked"):
        plan = build_plan("cpu", rank, world, sharding=ShardingConfig())
        torch.manual_seed(0)
        module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=64,
                               kernels=KernelSettings(docmask_block_size=16, loss_chunk_size=CHUNK,
                                                      loss_implementation=implementation))
        module.set_parallel_plan(plan)
        module.configure_model()
        head = module.model.lm_head.weight
        batch = make_packed_batch(ROWS, vocab=VOCAB, seed=rank)
        record = {}
        for step in range(2):  # the second micro-batch shows the steady state (lazy init done)
            with CollectiveCounter(head.numel(), head.to_local().numel()) as forward:
                loss_sum, count = module.compute_loss_sum(batch)
            with CollectiveCounter(head.numel(), head.to_local().numel()) as backward:
                loss_sum.backward()
            record[step] = {"forward": dict(forward.counts), "backward": dict(backward.counts)}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss_sum.detach())
        grads = {name: p.grad.full_tensor() for name, p in module.model.named_parameters()}
        results[implementation] = {"counts": record, "loss": torch.stack(losses), "grads": grads,
                                   "chunks": -(-int(count) // CHUNK)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_head")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    return torch.load(out / "results.pt")


def test_chunked_loss_gathers_the_head_once_per_micro_batch(results):
    chunks = results["chunked"]["chunks"]
    assert chunks == 8
    for step in (0, 1):
        assert results["chunked"]["counts"][step] == {"forward": {"all_gather": 1},
                                                      "backward": {"reduce_scatter": 1}}
        # the checkpointed loss: the head stays gathered from forward into the first chunk's backward, then is
        # gathered again for each of the other chunks
        assert results["checkpointed"]["counts"][step] == {"forward": {"all_gather": 1},
                                                           "backward": {"all_gather": chunks - 1,
                                                                        "reduce_scatter": 1}}


def test_chunked_loss_gives_the_same_loss_and_gradients(results):
    ours, ref = results["chunked"], results["checkpointed"]
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=TOLERANCE, atol=0)
    for name, grad in ref["grads"].items():
        diff = (ours["grads"][name] - grad).abs().max() / grad.abs().max()
        assert diff <= TOLERANCE, f"{name}: {diff}"
