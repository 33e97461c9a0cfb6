"""Grouped (mixed-shape, one launch) products and Newton–Schulz vs torch (Triton interpreter).

Tolerances: float32 products accumulate in float32 in a different order than torch's
(rtol 1e-5 at K ≤ 60); fp16 outputs are rounded once to fp16 (2⁻¹¹ relative, rtol 2e-3).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from matfn.coefficients import schedule  # noqa: E402
from matfn.msign import grouped, path  # noqa: E402
from matfn.msign.grouped import grouped_matmul, newton_schulz_grouped_launch  # noqa: E402
from matfn.msign.path import normalize  # noqa: E402
from matfn.msign.reference import newton_schulz_torch  # noqa: E402

ON_GPU = bool(os.environ.get("MATFN_TEST_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _operand(shape, transposed, gen, dtype):
    x = torch.randn(shape[::-1] if transposed else shape, generator=gen)
    x = x.mT if transposed else x  # a strided view, read in place
    return x.to(DEVICE, dtype)


@settings(deadline=None, max_examples=15)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60)),
        min_size=1,
        max_size=4,
    ),
    transposed=st.booleans(),
    with_d=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_grouped_matmul_matches_torch(shapes, transposed, with_d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    As = [_operand((M, K), transposed, gen, dtype) for M, N, K in shapes]
    Bs = [_operand((K, N), not transposed, gen, dtype) for M, N, K in shapes]
    Ds = [_operand((M, N), False, gen, dtype) for M, N, K in shapes] if with_d else None
    alpha, beta, gamma = 0.7, (-1.3 if with_d else 0.0), 2.5
    before = [a.clone() for a in As]
    outs = grouped_matmul(As, Bs, Ds, alpha=alpha, beta=beta, gamma=gamma)
    for i, (A, B, C) in enumerate(zip(As, Bs, outs, strict=True)):
        ref = alpha * (A.double() @ B.double())
        ref += gamma * torch.eye(*C.shape, dtype=torch.float64, device=A.device)
        if with_d:
            ref += beta * Ds[i].double()
        assert C.dtype == dtype and C.is_contiguous()
        torch.testing.assert_close(C.double(), ref.to(C.device), **TOL[dtype])
        assert torch.equal(A, before[i])


def test_grouped_matmul_rejects_bad_groups():
    A = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="do not multiply"):
        grouped_matmul([A], [torch.zeros(5, 2, device=DEVICE)])
    with pytest.raises(ValueError, match="same length"):
        grouped_matmul([A], [])
    with pytest.raises(ValueError, match="2-D"):
        grouped_matmul([A[None]], [A.mT])
    assert grouped_matmul([], []) == []


@pytest.mark.parametrize("method,steps", [("polar_express", 5), ("cubic", 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_newton_schulz_grouped_launch_matches_torch(method, steps, dtype):
    """Mixed shapes (square, wide, a row) in one launch per product = torch per matrix."""
    coeffs, factor = schedule(method, steps)
    gen = torch.Generator().manual_seed(3)
    Xs = [
        normalize(torch.randn(1, s, L, generator=gen), factor, 1e-7, torch.float32)[0]
        for s, L in [(12, 12), (9, 40), (12, 12), (1, 17), (20, 33)]
    ]
    outs = newton_schulz_grouped_launch([X.to(DEVICE, dtype) for X in Xs], coeffs)
    for X, out in zip(Xs, outs, strict=True):
        ref = newton_schulz_torch(X[None].double(), coeffs)[0]
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
        torch.testing.assert_close(out.double().cpu(), ref, **tol)


def test_path_grouped_launch(monkeypatch, ns_config):
    """``newton_schulz_grouped`` takes the grouped kernel from ``grouped_min_shapes`` distinct
    shapes on (lowered to 2 here); same results. One shape: the stacked path."""
    coeffs, factor = schedule("polar_express", 5)
    gen = torch.Generator().manual_seed(4)
    Xs = [
        normalize(torch.randn(1, s, L, generator=gen), factor, 1e-7, torch.float32)[0]
        for s, L in [(6, 20), (8, 8), (6, 20)]
    ]
    calls = {"n": 0}
    real = grouped.newton_schulz_grouped_launch

    def spy(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(grouped, "newton_schulz_grouped_launch", spy)
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    monkeypatch.setattr(path, "_KERNEL_DTYPES", (torch.float32,))
    ns_config(grouped_launch=True, grouped_min_shapes=2)
    outs = path.newton_schulz_grouped([X.to(DEVICE) for X in Xs], coeffs, "standard")
    assert calls["n"] == 1
    path.newton_schulz_grouped([X.to(DEVICE) for X in Xs[:1]], coeffs, "standard")
    assert calls["n"] == 1
    for X, out in zip(Xs, outs, strict=True):
        ref = newton_schulz_torch(X[None], coeffs)[0]
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", ["row-col", "col-row", "mixed"])
def test_grouped_matmul_layout_and_alignment_paths(layout):
    """Dims that are multiples of 8 take the aligned (hinted) path; a group list that mixes
    layouts takes the general-stride path. Same result either way."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(16, 24, 32), (8, 40, 16), (24, 8, 8)]
    a_t = {"row-col": [False] * 3, "col-row": [True] * 3, "mixed": [False, True, False]}[layout]
    As = [_operand((M, K), t, gen, torch.float32) for (M, N, K), t in zip(shapes, a_t, strict=True)]
    Bs = [
        _operand((K, N), not t, gen, torch.float32)
        for (M, N, K), t in zip(shapes, a_t, strict=True)
    ]
    expected = {"row-col": ("row", "col"), "col-row": ("col", "row"), "mixed": ("any", "any")}
    (_, _, a_layout, a_aligned), (_, _, b_layout, _) = map(grouped._describe, (As, Bs))
    assert (a_layout, b_layout) == expected[layout]
    assert a_aligned == (layout != "mixed")
    for A, B, C in zip(As, Bs, grouped_matmul(As, Bs, alpha=2.0), strict=True):
        torch.testing.assert_close(C.double(), 2 * A.double() @ B.double(), **TOL[torch.float32])


def test_grouped_matmul_many_groups_find_their_tiles():
    """Nine groups of 1 to 6 tiles each (16×16 tiles under the interpreter): every program finds
    its group by binary search over the tile prefix sums."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(17, 33, 5), (1, 1, 1), (40, 16, 9), (16, 16, 16), (3, 50, 2), (33, 17, 8),
              (8, 8, 8), (48, 20, 3), (20, 48, 4)]  # fmt: skip
    As = [_operand((M, K), False, gen, torch.float32) for M, N, K in shapes]
    Bs = [_operand((K, N), False, gen, torch.float32) for M, N, K in shapes]
    for A, B, C in zip(As, Bs, grouped_matmul(As, Bs), strict=True):
        torch.testing.assert_close(C.double(), A.double() @ B.double(), **TOL[torch.float32])


def test_path_grouped_launch_bf16_iterates_in_fp16(monkeypatch, ns_config):
    """bf16 lists on the grouped path iterate in ``folded_half_dtype`` (fp16) and come back bf16,
    as the stacked folded step does; the error vs the float64 iteration is fp16's, not bf16's
    (fp16 rounding is 2⁻¹¹, bf16's 2⁻⁸: ≈ 1e-3 vs ≈ 1e-2)."""
    coeffs, factor = schedule("polar_express", 5)
    gen = torch.Generator().manual_seed(5)
    Xs = [
        normalize(torch.randn(1, s, L, generator=gen), factor, 1e-7, torch.float32)[0]
        for s, L in [(16, 32), (8, 24), (16, 32)]
    ]
    seen = []
    real = grouped.newton_schulz_grouped_launch

    def spy(Ys, cs):
        seen.append({Y.dtype for Y in Ys})
        return real(Ys, cs)

    monkeypatch.setattr(grouped, "newton_schulz_grouped_launch", spy)
    monkeypatch.setattr(path, "use_triton", lambda *t: True)
    ns_config(grouped_min_shapes=2)
    outs = path.newton_schulz_grouped([X.to(DEVICE, torch.bfloat16) for X in Xs], coeffs)
    assert seen == [{torch.float16}]
    for X, out in zip(Xs, outs, strict=True):
        assert out.dtype == torch.bfloat16 and out.shape == X.shape
        ref = newton_schulz_torch(X.double()[None], coeffs)[0]
        assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-2
