"""Shared fixtures. Tests run offline, on CPU, with tiny models and data written into tmp_path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """The real Llama-3 tokenizer, built offline once (see prolong_lit.tokenizer)."""
    from prolong_lit.tokenizer import build_llama3_tokenizer, default_llama3_tokenizer_dir

    return build_llama3_tokenizer(default_llama3_tokenizer_dir())


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from prolong_lit.tokenizer import load_tokenizer

    return load_tokenizer(llama3_tokenizer_dir)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
