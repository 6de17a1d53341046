"""LoKr's fused Kronecker path (`methods.lokr._KronLinear`): exact in float64, and a fixed number of
operators per call whatever the factorization (a loop over the Kronecker factor's rows would issue c + a
small GEMMs per layer and step, which leaves a GPU launch-bound)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from methods.lokr import _KronLinear

# (a, c, b, d, k, W2 low-rank?)
SHAPES = [(4, 3, 5, 6, 2, True), (4, 3, 5, 6, 5, False), (8, 8, 16, 12, 3, True), (2, 6, 7, 5, 7, False)]


def _inputs(a: int, c: int, b: int, d: int, k: int, low_rank: bool, dtype=torch.float64):
    gen = torch.Generator().manual_seed(a * 100 + c)
    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True)
    return (rand(2, 7, c * d), rand(a * b, c * d), rand(a * b), rand(a, c), rand(k, d),
            rand(b, k) if low_rank else None)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kron_matches_the_dense_update_in_float64(shape) -> None:
    x, weight, bias, w1, right, left = _inputs(*shape)
    w2 = right if left is None else left @ right
    ours = _KronLinear.apply(x, weight, bias, w1, right, left)
    dense = x @ (weight + torch.kron(w1, w2)).T + bias
    grad = torch.randn_like(dense)
    leaves = [t for t in (x, weight, bias, w1, right, left) if t is not None]
    torch.testing.assert_close(ours, dense, rtol=0, atol=1e-12)
    for g_ours, g_dense in zip(torch.autograd.grad(ours, leaves, grad),
                               torch.autograd.grad(dense, leaves, grad), strict=True):
        torch.testing.assert_close(g_ours, g_dense, rtol=0, atol=1e-11)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _op_count(a: int, c: int) -> int:
    x, weight, bias, w1, right, left = _inputs(a, c, 4, 4, 2, True, torch.float32)
    with _CountOps() as counter:
        _KronLinear.apply(x, weight, bias, w1, right, left).sum().backward()
    return counter.calls


def test_operator_count_does_not_grow_with_the_factorization() -> None:
    assert _op_count(2, 2) == _op_count(32, 32)
