"""Fixtures for unit tests: small prepared datasets written with litdata into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.data_factory import write_prepared

# a 4-domain mixture shared by the data tests: 'c' is chat-like (has a loss mask)
MIXTURE_SAMPLES = {"a": 40, "b": 30, "c": 16, "d": 50}
MIXTURE_SEQ_LEN = 64


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """write_prepared(samples, seq_len, loss_mask_domains=()) -> data_dir, cached per session by its arguments."""
    cache: dict[tuple, Path] = {}

    def build(samples: dict[str, int], seq_len: int, loss_mask_domains: tuple[str, ...] = ()) -> Path:
        key = (tuple(sorted(samples.items())), seq_len, tuple(sorted(loss_mask_domains)))
        if key not in cache:
            data_dir = tmp_path_factory.mktemp("prepared")
            write_prepared(data_dir, samples, seq_len, loss_mask_domains=loss_mask_domains)
            cache[key] = data_dir
        return cache[key]

    return build


@pytest.fixture(scope="session")
def mixture_dir(prepared_data) -> Path:
    """The shared 4-domain dataset (MIXTURE_SAMPLES at MIXTURE_SEQ_LEN tokens)."""
    return prepared_data(MIXTURE_SAMPLES, MIXTURE_SEQ_LEN, loss_mask_domains=("c",))
