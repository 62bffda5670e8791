"""`loss_implementation: liger` (Liger-Kernel's fused linear cross-entropy) against the exact `chunked` loss on
CUDA, in fp32 and in the recipe's bf16 compute: the same sum, count and gradients within the stated tolerances."""

from __future__ import annotations

import pytest
import torch

from prolong_lit.model.liger_loss import liger_cross_entropy_sum, liger_loss_class
from prolong_lit.model.loss import IGNORE_INDEX, chunked_cross_entropy_sum

pytestmark = pytest.mark.gpu

B, L, D, V = 2, 300, 64, 1000


def run(loss, dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(D, V, bias=False, device="cuda", dtype=dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, L, D, generator=gen, device="cuda", dtype=dtype, requires_grad=True)  # (B, L, d)
    labels = torch.randint(0, V, (B, L), generator=gen, device="cuda")  # (B, L)
    labels[torch.rand(B, L, generator=gen, device="cuda") < 0.3] = IGNORE_INDEX
    total, count = loss(hidden, labels, head)
    total.backward()
    return total.detach().double(), int(count), hidden.grad.double(), head.weight.grad.double()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_liger_matches_the_chunked_loss(dtype, tolerance):
    if liger_loss_class() is None:
        pytest.fail("liger-kernel is not installed (pip install -e '.[gpu]')")
    ours = run(lambda h, y, m: liger_cross_entropy_sum(h, y, m), dtype)
    ref = run(lambda h, y, m: chunked_cross_entropy_sum(h, y, m, 128, implementation="chunked"), dtype)
    assert ours[1] == ref[1]
    for name, a, b in (("sum", ours[0], ref[0]), ("d hidden", ours[2], ref[2]), ("d weight", ours[3], ref[3])):
        diff = ((a - b).abs().max() / b.abs().max()).item()
        assert diff <= tolerance, f"{name}: {diff}"
