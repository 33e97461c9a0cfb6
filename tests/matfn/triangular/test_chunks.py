"""``tri_inv_chunks``: torch form and Triton kernel vs float64, input checks and the custom op.

Oracle: per chunk, the dense ``T_c`` built from its definition with the *global* cumulative
decay ``G`` in float64 (``exp(G_i − G_j)``, i > j) and inverted by
``torch.linalg.solve_triangular``. Tolerances: float64 ≤ 1e-12 relative (Frobenius) — the
inverses of these unit-key, β ∈ (0, 1) chunks have entries in [−1, 1]; float32 ≤ 1e-6 (the
forward substitution lands near 3e-8; a wrong block or a wrong decay factor is O(1e-2) or more).

The kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by the root
conftest; skipped on a GPU run of the suite, where ``test_cuda_matches_float64`` runs it) against
the float64 torch form, ≤ 8e-8 relative (``KERNEL_RTOL``): its ``A`` is exact to one rounding and
the substitution is fp32, which lands at 0.1–3.6e-8 here (the most for d = 16, whose larger
``|k_i·k_j|`` condition ``T`` worse); a wrong block, row or decay factor is 1e-4 or more. The
property test bounds it by the fp32 torch form's own error instead (see there).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matfn.triangular import chunks
from matfn.triangular.chunks import tri_inv_chunks, tri_inv_chunks_torch


def make(batch, n, d, *, decay=None, strength=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    K = torch.nn.functional.normalize(torch.randn(*batch, n, d, generator=g), dim=-1)
    beta = torch.rand(*batch, n, generator=g)
    L = None
    if decay == "row":
        L = -strength * torch.rand(*batch, n, generator=g)
    elif decay == "channel":
        L = -strength * torch.rand(*batch, n, d, generator=g)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(K), cast(beta), cast(L)


def oracle(K, beta, L, C):
    """Dense per-chunk inverses in float64 from the definition (global cumulative decay)."""
    K, beta = K.double(), beta.double()
    *batch, n, d = K.shape
    if L is None:
        G = torch.zeros(*batch, n, 1, dtype=torch.float64)
    else:
        L = L.double()
        G = (L[..., None] if L.ndim == K.ndim - 1 else L).cumsum(-2)
    out = torch.zeros(*batch, n, C, dtype=torch.float64)
    for l in range(0, n, C):
        e = min(l + C, n)
        k, gg = K[..., l:e, :], G[..., l:e, :]
        E = torch.exp(gg[..., :, None, :] - gg[..., None, :, :])  # (.., m, m, g); i > j used
        A = torch.einsum("...ic,...jc,...ijc->...ij", k, k, E.expand(*E.shape[:-1], d))
        T = torch.eye(e - l, dtype=torch.float64) + torch.tril(beta[..., l:e, None] * A, -1)
        eye = torch.eye(e - l, dtype=torch.float64).expand_as(T)
        out[..., l:e, : e - l] = torch.linalg.solve_triangular(T, eye, upper=False)
    return out


def rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# torch form and public function (CPU)
# ---------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(1, 90),
    d=st.integers(1, 12),
    C=st.sampled_from([1, 4, 16, 32, 64]),
    decay=st.sampled_from([None, "row", "channel"]),
    strength=st.sampled_from([0.01, 1.0, 8.0, 60.0]),
    seed=st.integers(0, 2**16),
)
def test_torch_form_matches_dense_oracle(n, d, C, decay, strength, seed):
    K, beta, L = make((2,), n, d, decay=decay, strength=strength, seed=seed)
    Y = tri_inv_chunks(K, beta, log_decay=L, chunk_size=C)
    assert Y.shape == (2, n, C) and Y.dtype == torch.float64
    assert rel(Y, oracle(K, beta, L, C)) <= 1e-12


@pytest.mark.parametrize("decay", [None, "row", "channel"])
def test_float32_strong_decay_long_sequence(decay):
    """Chunk-relative exponents: no overflow where exp(±G) alone would (|G| ≫ 88)."""
    K, beta, L = make((3,), 512, 16, decay=decay, strength=5.0, seed=1, dtype=torch.float32)
    Y = tri_inv_chunks(K, beta, log_decay=L)
    assert rel(Y, oracle(K, beta, L, 64)) <= 1e-6


def test_structure_and_dtypes():
    K, beta, L = make((2, 3), 70, 8, decay="row", seed=2, dtype=torch.float32)
    Y = tri_inv_chunks(K, beta, log_decay=L, chunk_size=32)
    assert Y.shape == (2, 3, 70, 32) and Y.dtype == torch.float32
    blocks = torch.nn.functional.pad(Y, (0, 0, 0, 26)).reshape(2, 3, 3, 32, 32)
    assert torch.equal(blocks.triu(1), torch.zeros_like(blocks))
    assert torch.equal(
        torch.diagonal(blocks, dim1=-2, dim2=-1)[..., :, :6].flatten()[:6], torch.ones(6)
    )
    Yh = tri_inv_chunks(K.bfloat16(), beta.bfloat16(), chunk_size=32)
    assert Yh.dtype == torch.bfloat16
    # batch dims of beta and log_decay broadcast
    Yb = tri_inv_chunks(K, beta[:1, :1].expand(2, 3, 70), log_decay=L[0, 0], chunk_size=32)
    Yr = tri_inv_chunks(K, beta[:1, :1], log_decay=L[0, 0], chunk_size=32)
    assert torch.equal(Yb, Yr)


def test_matches_tri_inv_diagonal_blocks():
    """Each chunk inverse is the diagonal block of T⁻¹ for Q = diag(β) K (docs/math.md §5.3)."""
    import matfn

    K, beta, L = make((), 96, 6, decay="channel", seed=3)
    Tinv = matfn.tri_inv(beta[:, None] * K, K, log_decay=L)
    Y = tri_inv_chunks(K, beta, log_decay=L, chunk_size=32)
    for l in range(0, 96, 32):
        torch.testing.assert_close(Y[l : l + 32], Tinv[l : l + 32, l : l + 32], rtol=0, atol=1e-13)


def test_empty_inputs():
    assert tri_inv_chunks(torch.zeros(2, 0, 4), torch.zeros(2, 0)).shape == (2, 0, 64)
    assert tri_inv_chunks(torch.zeros(0, 5, 4), torch.zeros(0, 5), chunk_size=8).shape == (0, 5, 8)
    Y = tri_inv_chunks(torch.zeros(5, 0), torch.rand(5), chunk_size=4)
    assert torch.equal(Y[:4], torch.eye(4)) and torch.equal(Y[4], torch.eye(4)[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"K": [[1.0]]}, TypeError, "`K`"),
        ({"K": torch.ones(4, 2, dtype=torch.int64)}, TypeError, "`K`"),
        ({"K": torch.ones(4)}, ValueError, "`K`"),
        ({"beta": torch.ones(5)}, ValueError, "`beta`"),
        ({"beta": torch.ones(4, dtype=torch.complex64)}, TypeError, "`beta`"),
        ({"beta": 0.5}, TypeError, "`beta`"),
        ({"log_decay": torch.ones(4, 3)}, ValueError, "`log_decay`"),
        ({"log_decay": torch.ones(5)}, ValueError, "`log_decay`"),
        ({"log_decay": torch.ones(4, dtype=torch.bool)}, TypeError, "`log_decay`"),
        ({"chunk_size": 0}, ValueError, "`chunk_size`"),
        ({"chunk_size": 16.0}, ValueError, "`chunk_size`"),
        ({"beta": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, ValueError, "`beta`"),
        ({"log_decay": torch.tensor([0.0, -float("inf"), 0.0, 0.0])}, ValueError, "`log_decay`"),
        ({"beta": torch.ones(4, device="meta")}, ValueError, "device"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = {"K": torch.ones(4, 2), "beta": torch.ones(4)} | kwargs
    K, beta = args.pop("K"), args.pop("beta")
    with pytest.raises(error, match=match):
        tri_inv_chunks(K, beta, **args)


def test_check_finite_off_skips_the_test():
    K = torch.ones(4, 2)
    Y = tri_inv_chunks(K, torch.tensor([1.0, float("nan"), 1.0, 1.0]), check_finite=False)
    assert Y.shape == (4, 64)


# ---------------------------------------------------------------------------------------------
# the Triton kernel, in the interpreter
# ---------------------------------------------------------------------------------------------

try:  # the kernel module imports Triton; without it the kernel tests are skipped
    import triton
    import triton.language as tl

    from matfn.triangular import chunks_kernel
except ImportError:
    chunks_kernel = None

KERNEL_RTOL = 8e-8
interpreted = pytest.mark.skipif(
    chunks_kernel is None or bool(os.environ.get("MATFN_TEST_ON_GPU")),
    reason="needs Triton and TRITON_INTERPRET=1 (CPU tensors)",
)


def torch_form(K, beta, L, C):
    """The float64 torch form of flattened ``(B, n, d)`` / ``(B, n)`` operands."""
    L = None if L is None else L.double()[..., None]
    return tri_inv_chunks_torch(K.double(), beta.double(), L, C)


if chunks_kernel is not None:

    @triton.jit
    def gram_kernel(k_ptr, sigma_ptr, parts_ptr, h_ptr, s_ptr, d, BK: tl.constexpr):
        """``σ``, the fp16 operands ``h, 2¹¹l₁, 2¹¹l₂, m`` (4×64×d), ``H`` and ``S`` of 64 rows."""
        r = tl.arange(0, 64)
        ss = tl.zeros((64,), dtype=tl.float32)
        for k0 in range(0, d, BK):
            k = chunks_kernel._load_keys(k_ptr, 0, 64, d, k0 + tl.arange(0, BK), 64)
            ss += tl.sum(k * k, 1)
        sigma, inv_sigma = chunks_kernel._row_scales(ss)
        tl.store(sigma_ptr + r, sigma)
        H = tl.zeros((64, 64), dtype=tl.float32)
        S = tl.zeros((64, 64), dtype=tl.float32)
        for k0 in range(0, d, BK):
            cols = k0 + tl.arange(0, BK)
            k = chunks_kernel._load_keys(k_ptr, 0, 64, d, cols, 64)
            h, l1, l2, m = chunks_kernel._split(k, inv_sigma)
            at = r[:, None] * d + cols[None, :]
            tl.store(parts_ptr + at, h.to(tl.float32))
            tl.store(parts_ptr + 64 * d + at, l1.to(tl.float32))
            tl.store(parts_ptr + 128 * d + at, l2.to(tl.float32))
            tl.store(parts_ptr + 192 * d + at, m.to(tl.float32))
            H, S = chunks_kernel._gram_slab(H, S, h, l1, l2, m)
        tl.store(h_ptr + r[:, None] * 64 + r[None, :], H)
        tl.store(s_ptr + r[:, None] * 64 + r[None, :], S)


@interpreted
@pytest.mark.parametrize(
    ("n", "d", "decay", "strength", "slab"),
    [
        (200, 128, None, 1.0, 32),
        (200, 128, "row", 5.0, 64),
        (150, 48, "row", 1.0, 32),  # a full and a half-masked 32-channel slab
        (77, 48, "row", 5.0, 64),
        (100, 16, None, 1.0, 16),
        (37, 16, None, 1.0, 32),  # one short chunk
    ],
)
def test_kernel_matches_float64(n, d, decay, strength, slab):
    K, beta, L = make((2,), n, d, decay=decay, strength=strength, seed=n + d, dtype=torch.float32)
    out = torch.full((2, n, 64), float("nan"))  # an unwritten entry fails
    Y = chunks_kernel.tri_inv_chunks_triton(K, beta, L, out=out, slab=slab)
    assert Y is out
    assert rel(Y, torch_form(K, beta, L, 64)) <= KERNEL_RTOL


@interpreted
@settings(deadline=None, max_examples=8)
@given(
    n=st.integers(1, 160),
    d=st.integers(1, 130),
    decay=st.sampled_from([None, "row"]),
    strength=st.sampled_from([0.01, 1.0, 8.0]),
    spread=st.sampled_from([0.0, 4.0, 20.0]),
    zero_rows=st.booleans(),
    slab=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_kernel_property(n, d, decay, strength, spread, zero_rows, slab, seed):
    """Any length and width, keys of norms ``2^{−U(0, spread)}`` (``β‖k‖² ≤ 1``, entries of
    ``Y`` in [−1, 1]), some zero, weak to strong decay.

    The standard is the fp32 torch form (the exact ``A`` rounded once, LAPACK's substitution),
    whose own error reaches 1.2e-7 on narrow keys (d ≤ 2, weak decay: long products of
    ``1 − β``): the kernel rounds once more (the decay factor, the fp16 parts) and sums in
    another order; over 150 random cases it used at most 0.53 of the bound below. A wrong
    block is off by 1e-4 or more.
    """
    K, beta, L = make((2,), n, d, decay=decay, strength=strength, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    K = K * 2.0 ** (-spread * torch.rand(2, n, 1, generator=g))
    if zero_rows:
        K[:, ::3] = 0.0
    Y = chunks_kernel.tri_inv_chunks_triton(K, beta, L, slab=slab)
    ref = torch_form(K, beta, L, 64)
    fp32 = tri_inv_chunks_torch(K, beta, None if L is None else L[..., None], 64)
    assert rel(Y, ref) <= 2 * rel(fp32, ref) + 2e-8


@interpreted
def test_kernel_zero_keys_and_three_batch_entries():
    """Zero, tiny and long keys (other grids), three batch entries, ℓ of shape (B, n, 1)."""
    K, beta, L = make((3,), 64, 16, decay="row", seed=11, dtype=torch.float32)
    K[0, 5] = 0.0
    K[1, 40] *= 1e-6
    K[2, 7] *= 5.0
    Y = chunks_kernel.tri_inv_chunks_triton(K, beta, L[..., None])
    assert rel(Y, torch_form(K, beta, L, 64)) <= KERNEL_RTOL


@pytest.mark.skipif(chunks_kernel is None, reason="needs Triton")
def test_kernel_gram_is_exact():
    """``σ ≥ ‖k‖`` is a power of two below ``2‖k‖``; ``h`` and ``2¹¹l₁`` are the exact split of
    ``k/σ`` on the grids ``2⁻¹⁰`` and ``2⁻²¹``, the fp16 ``2¹¹l₂`` and ``m = ½l₁ + l₂`` within
    ``2⁻³⁴`` and ``2⁻²³`` of theirs; ``H = h hᵀ`` has no rounding at all, and
    ``σ_iσ_j (H + 2⁻¹¹(S + Sᵀ))`` is ``K Kᵀ`` but for the roundings of ``X``.

    ``X ≲ 2⁻¹⁰‖k_i‖‖k_j‖``: rounded to nearest in fp32 (the interpreter) its accumulation errs
    by below ``2⁻³⁰‖k_i‖‖k_j‖``; the H100's tensor cores, which truncate as they accumulate,
    reach about ``2⁻²⁷``. On top comes the rounding of ``m`` in ``l₁mᵀ`` and ``m l₁ᵀ``, bounded
    entry by entry from the parts. On a GPU run this checks the tensor cores (the interpreter
    otherwise).
    """
    device = "cuda" if os.environ.get("MATFN_TEST_ON_GPU") else "cpu"
    if (device == "cuda") == bool(os.environ.get("TRITON_INTERPRET")):
        pytest.skip("the interpreter runs on CPU tensors, a compiled kernel on CUDA ones")
    g = torch.Generator().manual_seed(12)
    scales = 2.0 ** torch.randint(-30, 30, (64, 1), generator=g)
    K = torch.randn(64, 128, generator=g) * scales  # rows of every size
    K[5] = 0.0
    K[6, ::2] = 0.0
    K[7, 3] = K[7].norm() * 1e-9  # a channel far below its row's norm
    sigma = torch.empty(64, device=device)
    parts = torch.empty(4, 64, 128, device=device)
    H, S = torch.empty(64, 64, device=device), torch.empty(64, 64, device=device)
    gram_kernel[(1,)](K.to(device), sigma, parts, H, S, 128, BK=32)
    sigma = sigma.double().cpu()[:, None]
    h, l1, l2, m = parts.double().cpu()
    l1, l2 = l1 / 2**11, l2 / 2**11
    H, S = H.double().cpu(), S.double().cpu()
    K64 = K.double()
    norms = K64.norm(dim=1, keepdim=True)
    assert ((sigma >= norms) & ((sigma < 2 * norms) | (norms == 0))).all()
    assert (torch.frexp(sigma).mantissa == 0.5).all()  # powers of two
    Ks = K64 / sigma
    on_grid = lambda x, g: (x / g == (x / g).round()).all()  # noqa: E731
    assert on_grid(h, 2**-10) and on_grid(l1, 2**-21)
    l2_exact = Ks - h - l1
    assert (h - Ks).abs().max() <= 2**-11 and l2_exact.abs().max() <= 2**-22
    assert (l2_exact - l2).abs().max() <= 2**-34
    dm = (m - (l1 / 2 + l2_exact)).abs()
    assert dm.max() <= 2**-23
    torch.testing.assert_close(H, h @ h.T, rtol=0, atol=0)
    G = sigma * sigma.T * (H + (S + S.T) / 2**11)
    accumulation = (2**-26 if device == "cuda" else 2**-30) * norms * norms.T
    m_rounding = sigma * sigma.T * (l1.abs() @ dm.T + dm @ l1.abs().T)
    assert ((G - K64 @ K64.T).abs() <= accumulation + m_rounding).all()


@interpreted
@pytest.mark.parametrize(
    ("dtype", "decay", "C", "kernel"),
    [
        (torch.float32, None, 64, True),
        (torch.bfloat16, "row", 64, True),
        (torch.float32, "channel", 64, False),
        (torch.float32, None, 32, False),
        (torch.float32, None, 8, False),
        (torch.float64, "row", 16, False),
    ],
)
def test_op_dispatch(monkeypatch, dtype, decay, C, kernel):
    """CUDA float32, C = 64, no decay or one per row: the kernel; else the torch form."""
    calls = []
    launch = chunks_kernel.tri_inv_chunks_triton

    def launcher(*args, **kwargs):
        calls.append(args)
        return launch(*args, **kwargs)

    monkeypatch.setattr(chunks, "use_triton", lambda *t: True)
    monkeypatch.setattr(chunks_kernel, "tri_inv_chunks_triton", launcher)
    K, beta, L = make((2, 2), 40, 16, decay=decay, seed=13, dtype=dtype)
    Y = tri_inv_chunks(K, beta, log_decay=L, chunk_size=C)
    assert len(calls) == int(kernel) and Y.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: KERNEL_RTOL, torch.bfloat16: 1e-2}[dtype]
    assert rel(Y, oracle(K, beta, L, C)) <= tol


# ---------------------------------------------------------------------------------------------
# the custom op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", [None, "row", "channel"])
def test_opcheck(dtype, decay):
    K, beta, L = make((2,), 40, 5, decay=decay, seed=4, dtype=dtype)
    torch.library.opcheck(torch.ops.matfn.tri_inv_chunks, (K, beta, L, 16, True))


def test_compile_and_export_keep_one_node():
    K, beta, L = make((2,), 40, 5, decay="row", seed=5)
    eager = tri_inv_chunks(K, beta, log_decay=L, chunk_size=16)

    def fn(K, beta, L):
        return tri_inv_chunks(K, beta, log_decay=L, chunk_size=16)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(K, beta, L), eager, rtol=0, atol=0)
    dyn = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(dyn(K, beta, L), eager, rtol=0, atol=0)

    class M(torch.nn.Module):
        def forward(self, K, beta, L):
            return fn(K, beta, L)

    ep = torch.export.export(M(), (K, beta, L))
    torch.testing.assert_close(ep.module()(K, beta, L), eager, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    beta32 = beta.float()
    with FakeTensorMode() as mode:
        out = fn(mode.from_tensor(K), mode.from_tensor(beta32), mode.from_tensor(L))
    assert out.shape == (2, 40, 16) and out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("decay", "strength", "C", "tol"),
    [
        (None, 1.0, 64, 3e-8),  # the benchmark case, smaller: the kernel's goal
        (None, 1.0, 16, 3e-8),
        ("row", 1.0, 64, 5e-8),
        ("row", 5.0, 32, 5e-8),
        ("channel", 1.0, 64, 5e-8),  # the torch form
    ],
)
def test_cuda_matches_float64(decay, strength, C, tol):
    """The public call on CUDA (the kernel but for KDA) against the float64 torch form."""
    K, beta, L = make(
        (2, 4), 1000, 128, decay=decay, strength=strength, seed=7, dtype=torch.float32
    )
    K, beta, L = (None if x is None else x.cuda() for x in (K, beta, L))
    Y = tri_inv_chunks(K, beta, log_decay=L, chunk_size=C)
    double = lambda x: None if x is None else x.double()  # noqa: E731
    ref = tri_inv_chunks(double(K), double(beta), log_decay=double(L), chunk_size=C)
    assert Y.dtype == torch.float32
    assert rel(Y, ref) <= tol
