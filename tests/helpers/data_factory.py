"""Write small prepared datasets (the contract of `prolong_lit.data.format`) for tests.

Independent of `prepare`: samples come from `make_sample`, a pure function of (domain, item), written with
`litdata.optimize`, plus a `manifest.json`. Tests can rebuild any expected sample with `make_sample` and compare
it with what a DataModule read back. The first two tokens of every sample identify it:
input_ids[0] = domain_code(domain), input_ids[1] = item, so a batch row tells which sample it holds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK, DomainStats, Manifest

VOCAB_SIZE = 50_000


def domain_code(domain: str) -> int:
    """A stable small token id naming the domain (fits any test vocabulary of VOCAB_SIZE)."""
    return zlib.crc32(domain.encode()) % 1000


def make_sample(item: int, domain: str, seq_len: int, with_loss_mask: bool = False) -> dict[str, np.ndarray]:
    """The item-th sample of `domain`: random tokens, 1-4 documents, optional random loss mask."""
    rng = np.random.default_rng([zlib.crc32(domain.encode()), item])
    input_ids = rng.integers(0, VOCAB_SIZE, size=seq_len, dtype=np.int32)
    input_ids[0] = domain_code(domain)
    input_ids[1] = item
    num_docs = int(rng.integers(1, min(4, seq_len) + 1))
    # document boundaries at distinct positions inside the row; every document has at least one token
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=num_docs - 1, replace=False))
    doc_lengths = np.diff(np.concatenate([[0], cuts, [seq_len]])).astype(np.int32)
    sample = {INPUT_IDS: input_ids, DOC_LENGTHS: doc_lengths}
    if with_loss_mask:
        sample[LOSS_MASK] = (rng.random(seq_len) < 0.6).astype(np.uint8)
    return sample


def write_prepared(
    data_dir: str | Path,
    samples: dict[str, int],
    seq_len: int,
    loss_mask_domains: tuple[str, ...] = (),
    tokenizer: str = "test",
) -> Manifest:
    """Write `<data_dir>/<domain>/` (litdata) for each domain with samples[domain] samples, then the manifest."""
    domains = {
        domain: (
            partial(make_sample, domain=domain, seq_len=seq_len, with_loss_mask=domain in loss_mask_domains),
            count,
            domain in loss_mask_domains,
        )
        for domain, count in samples.items()
    }
    # small chunks: several even for tiny data, so reads cross chunk boundaries
    return write_domains(data_dir, domains, seq_len, VOCAB_SIZE, tokenizer, chunk_bytes="4KB")


def write_domains(
    data_dir: str | Path,
    domains: dict[str, tuple[Callable[[int], dict[str, np.ndarray]], int, bool]],
    seq_len: int,
    vocab_size: int,
    tokenizer: str,
    chunk_bytes: str,
) -> Manifest:
    """Write `<data_dir>/<domain>/` (litdata) from {domain: (sample of item i, sample count, has loss mask)},
    then the manifest."""
    import litdata

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for domain, (make, count, with_mask) in domains.items():
        litdata.optimize(
            fn=make,
            inputs=list(range(count)),
            output_dir=str(data_dir / domain),
            chunk_bytes=chunk_bytes,
            num_workers=1,
            mode="overwrite",
            verbose=False,
            start_method="fork",
        )
        stats[domain] = DomainStats(
            samples=count,
            tokens=count * seq_len,
            max_token_id=vocab_size - 1,
            has_loss_mask=with_mask,
            documents={"read": count, "kept": count},
        )
    manifest = Manifest(tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq_len, domains=stats)
    manifest.write(data_dir)
    return manifest
