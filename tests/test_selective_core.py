"""The chunked Mamba-1 assembly against its readable twin (one exponential per entry and state), and
the twin against a per-step float64 recurrence."""

import pytest
import torch

from implicit_hooks.families.mamba import SelectiveCore


def random_core(B=2, C=5, L=37, N=4, dtype=torch.float32, seed=0, chunk=64):
    g = torch.Generator().manual_seed(seed)
    delta = torch.nn.functional.softplus(torch.randn(B, C, L, generator=g)).to(dtype)
    A = -torch.exp(torch.randn(C, N, generator=g)).to(dtype)
    Bm, Cm = torch.randn(B, L, N, generator=g).to(dtype), torch.randn(B, L, N, generator=g).to(dtype)
    return SelectiveCore(delta, A, Bm, Cm, torch.randn(C, generator=g).to(dtype), chunk=chunk)


def per_step(core, b, c):
    """R[b, c] from the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t·h_t, fed impulses."""
    delta, A = core.delta[b, c].double(), core.A[c].double()
    B, C = core.B[b].double(), core.C[b].double()
    L = len(delta)
    R = torch.zeros(L, L, dtype=torch.float64)
    for j in range(L):
        h = torch.zeros_like(A)
        for t in range(j, L):
            h = torch.exp(delta[t] * A) * h + (delta[t] * B[t] if t == j else 0)
            R[t, j] = (C[t] * h).sum()
    return R


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 64])
def test_chunked_equals_direct(chunk):
    core = random_core(chunk=chunk)
    chans = torch.tensor([4, 0, 2])
    for rows, (c0, c1) in [
        (torch.arange(37), (0, 37)),
        (torch.tensor([36, 0, 17, 9, 5]), (3, 29)),
        (torch.tensor([36]), (0, 37)),
        (torch.arange(10, 20), (11, 13)),
    ]:
        cols = torch.arange(c0, c1)
        fast = core.chunked(1, chans, rows, c0, c1)
        slow = core.direct(1, chans, rows, cols)
        torch.testing.assert_close(fast, slow, rtol=2e-5, atol=1e-6)


def test_direct_equals_the_recurrence():
    core = random_core(L=11, dtype=torch.float64)
    R = core.direct(0, torch.tensor([3]), torch.arange(11), torch.arange(11))[0]
    torch.testing.assert_close(R, per_step(core, 0, 3))


def test_long_sequences_keep_float32_precision():
    """Segment sums from a float64 cumulative sum: at L = 4000 the float32 chunked rows agree with a
    float64 assembly to float32 precision, where a float32 cumsum would lose digits."""
    core32 = random_core(B=1, C=3, L=4000, N=4, seed=3)
    core64 = SelectiveCore(*(t.double() for t in (core32.delta, core32.A, core32.B, core32.C, core32.D)))
    rows = torch.tensor([3999, 2500])
    fast = core32.block(0, torch.arange(3), rows, torch.arange(4000), ssm=True, skip=True)
    exact = core64.direct(0, torch.arange(3), rows, torch.arange(4000))
    exact = exact + core64.D[:, None, None] * (rows[:, None] == torch.arange(4000)[None, :])
    assert float((fast.double() - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_scan_matvec_equals_the_matrix(chunk):
    core = random_core(chunk=chunk)
    v = torch.randn(5, 37)
    chans, everything = torch.arange(5), torch.arange(37)
    R = core.block(1, chans, everything, everything, ssm=True, skip=True)
    torch.testing.assert_close(core.matvec(1, v, ssm=True, skip=True), torch.einsum("ctj,cj->ct", R, v))
    torch.testing.assert_close(core.matvec(1, v, ssm=False, skip=True), core.D[:, None] * v)
