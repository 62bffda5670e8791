"""Loss by position: the mean next-token NLL per bucket of positions on held-out long documents.

Position p is the index of the predicted token in its document (p = 1 is the second token, predicted from the
first), so a bucket [lo, hi) averages -log P(x_p | x_<p) over lo <= p < hi. Buckets are powers of two
([1, 2), [2, 4), ..., up to the longest document) or equal-width ranges; empty buckets are left out of the result.

The LM head and cross-entropy run over chunks of positions, so a 512K-token document never materialises its
`[L, vocab]` logits. Sums and counts live in a torchmetrics `Metric` (reduced with "sum"), so under several ranks
each rank scores its own documents and `compute()` gives the global means; with `lockstep` the ranks also run the
same number of forward passes (needed when parameters are sharded).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from prolong_lit.evals import distributed as ev_dist


def bucket_edges(max_position: int, scheme: str = "pow2", num_buckets: int = 8) -> list[int]:
    """Bucket boundaries covering positions 1 .. max_position - 1: `pow2` or `linear` (`num_buckets` equal ranges)."""
    if max_position < 2:
        raise ValueError(f"documents need at least 2 tokens for a next-token loss, got max length {max_position}")
    if scheme == "pow2":
        edges = [1]
        while edges[-1] < max_position:
            edges.append(edges[-1] * 2)
        return edges
    if scheme == "linear":
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        width = -(-(max_position - 1) // num_buckets)  # ceil
        return [1 + i * width for i in range(num_buckets)] + [max_position]
    raise ValueError(f"unknown bucket scheme {scheme!r}; use 'pow2' or 'linear'")


class PositionNLL(Metric):
    """Sum and count of next-token NLL per position bucket; `compute()` returns the per-bucket means."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, edges: Sequence[int], **kwargs):
        """
        Args:
            edges: increasing bucket boundaries; bucket i holds positions edges[i] <= p < edges[i + 1].
            kwargs: passed to `torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket edges must be increasing and at least two, got {list(edges)}")
        self.edges = list(edges)
        self.add_state("nll_sum", torch.zeros(len(edges) - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(edges) - 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, positions: torch.Tensor) -> None:
        """`nll` (N,) of the tokens at `positions` (N,)."""
        boundaries = torch.tensor(self.edges, device=positions.device)
        bucket = torch.bucketize(positions, boundaries, right=True) - 1  # (N,), -1 or len-1 when outside
        inside = (bucket >= 0) & (bucket < len(self.edges) - 1)
        self.nll_sum.index_add_(0, bucket[inside], nll[inside].to(torch.float64))
        self.count.index_add_(0, bucket[inside], torch.ones_like(bucket[inside]))

    def compute(self) -> torch.Tensor:
        """Mean NLL per bucket, NaN where a bucket saw no token."""
        means = self.nll_sum / self.count.clamp(min=1)
        return torch.where(self.count > 0, means, torch.full_like(means, float("nan")))

    def labels(self) -> list[str]:
        return [f"{lo}-{hi}" for lo, hi in zip(self.edges, self.edges[1:])]


@torch.no_grad()
def token_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = 4096, varlen: bool = False
) -> torch.Tensor:
    """-log P(x_p | x_<p) for p = 1 .. L-1 of one document `input_ids` (L,), returned as (L-1,) float32.

    `varlen` also passes the document as one varlen sequence (`cu_seq_lens_q/k`, `max_length_q/k`), so an
    attention function registered for packed batches (FlashAttention varlen) handles it instead of a dense mask.
    """
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    ids = input_ids.to(head.weight.device).view(1, -1)  # (1, L)
    length = ids.shape[1]
    positions = torch.arange(length, device=ids.device).view(1, -1)  # (1, L)
    kwargs = {}
    if varlen:
        cu_seq_lens = torch.tensor([0, length], dtype=torch.int32, device=ids.device)
        kwargs = dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=length, max_length_k=length)
    hidden = base(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).last_hidden_state[0]  # (L, D)
    out = []
    for start in range(0, ids.shape[1] - 1, chunk_size):
        end = min(start + chunk_size, ids.shape[1] - 1)
        logits = head(hidden[start:end]).float()  # (C, V)
        out.append(F.cross_entropy(logits, ids[0, start + 1 : end + 1], reduction="none"))
    return torch.cat(out)


def loss_by_position(
    model: torch.nn.Module,
    documents: Sequence[torch.Tensor],
    scheme: str = "pow2",
    num_buckets: int = 8,
    chunk_size: int = 4096,
    varlen: bool = False,
    distributed: bool | None = None,
) -> dict[str, float]:
    """Mean NLL per position bucket over `documents` (1-D token id tensors): `{"lo-hi": mean_nll}`.

    Under several ranks (`distributed` None = auto) each rank scores documents rank, rank + W, ... and the sums
    are reduced; every rank gets the same dict. `chunk_size` positions go through the LM head at a time; `varlen`
    see `token_nll`.
    """
    if not documents:
        raise ValueError("loss_by_position needs at least one document")
    enabled = ev_dist.resolve(distributed)
    device = next(model.parameters()).device
    edges = bucket_edges(max(int(d.numel()) for d in documents), scheme, num_buckets)
    metric = PositionNLL(edges, sync_on_compute=enabled).to(device)
    local = ev_dist.shard(list(documents), enabled)
    rounds = ev_dist.max_int(len(local), device, enabled)
    was_training = model.training
    model.eval()
    try:
        for i in range(rounds):
            doc = local[i] if i < len(local) else documents[0][:2]  # a rank out of documents still steps along
            nll = token_nll(model, doc, chunk_size, varlen)
            if i < len(local):
                metric.update(nll, torch.arange(1, doc.numel(), device=nll.device))
    finally:
        model.train(was_training)
    means = metric.compute().tolist()
    return {label: m for label, m in zip(metric.labels(), means) if m == m}  # m != m: NaN, an empty bucket
