"""The delta rule (DeltaNet, Gated DeltaNet, KDA) through ``tri_solve`` against its recurrence.

With ``G = cumsum(log α)`` and ``E_ij = exp(G_i − G_j)`` (per channel for KDA), the recurrence
``S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` unrolls to the WY
form ``U = T⁻¹ (β ⊙ V)`` with ``T = I + tril(Diag(β) K Kᵀ ⊙ E, −1)`` and the output
``O = tril(Q Kᵀ ⊙ E, 0) U`` (docs/math.md §5.3, §5.6). Interleaving a query row ``(−q_t, 0, 0)``
after each key row ``(β_t k_t, k_t, β_t v_t)`` of one ``tri_solve`` over ``2n`` rows gives ``O``
in its odd rows. Both forms are compared in float64 with autograd through the recurrence loop:
outputs and gradients w.r.t. ``q``, ``k`` (before L2 normalisation), ``v``, ``β`` and the decay
logits (``log α = log σ(a)``). ``notebooks/05_linear_attention.ipynb`` derives them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import matfn

F64 = torch.float64
TOL = 1e-10


def _per_channel(log_alpha: torch.Tensor | None, q: torch.Tensor) -> bool:
    return log_alpha is not None and log_alpha.shape == q.shape


def recurrence(q, k, v, beta, log_alpha):
    """``o_t = S_tᵀ q_t`` by the step-by-step delta rule (the oracle)."""
    *batch, n, d = q.shape
    S = q.new_zeros(*batch, d, v.shape[-1])
    out = []
    for t in range(n):
        if log_alpha is not None:
            a = log_alpha[..., t, :] if _per_channel(log_alpha, q) else log_alpha[..., t, None]
            S = a.exp().unsqueeze(-1) * S
        k_t, b_t = k[..., t, :, None], beta[..., t, None, None]
        S = S - b_t * k_t * (k_t.transpose(-1, -2) @ S) + b_t * k_t * v[..., t, None, :]
        out.append((S.transpose(-1, -2) @ q[..., t, :, None]).squeeze(-1))
    return torch.stack(out, dim=-2)


def two_step(q, k, v, beta, log_alpha, chunk_size):
    """``U = tri_solve(β⊙K, K, β⊙V, log_decay=log α)``, then the dense decayed causal product."""
    n = q.shape[-2]
    b = beta[..., None]
    U = matfn.tri_solve(b * k, k, b * v, log_decay=log_alpha, chunk_size=chunk_size)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    if log_alpha is None:
        return ((q @ k.transpose(-1, -2)) * mask) @ U
    if _per_channel(log_alpha, q):
        G = log_alpha.cumsum(-2)
        diff = G[..., :, None, :] - G[..., None, :, :]
        E = torch.where(mask[..., None], diff, float("-inf")).exp()
        return torch.einsum("...ic,...jc,...ijc->...ij", q, k, E) @ U
    G = log_alpha.cumsum(-1)
    E = torch.where(mask, G[..., :, None] - G[..., None, :], float("-inf")).exp()
    return ((q @ k.transpose(-1, -2)) * E) @ U


def _interleave(a, b, row_dim):
    return torch.stack([a, b], dim=row_dim).flatten(row_dim - 1, row_dim)


def one_solve(q, k, v, beta, log_alpha, chunk_size):
    """The outputs as the odd rows of one ``tri_solve`` over ``2n`` interleaved rows."""
    b = beta[..., None]
    Qp = _interleave(b * k, -q, -2)
    Kp = _interleave(k, torch.zeros_like(k), -2)
    Vp = _interleave(b * v, torch.zeros_like(v), -2)
    Lp = None
    if log_alpha is not None:
        row_dim = -2 if _per_channel(log_alpha, q) else -1
        Lp = _interleave(log_alpha, torch.zeros_like(log_alpha), row_dim)
    X = matfn.tri_solve(Qp, Kp, Vp, log_decay=Lp, chunk_size=chunk_size)
    return X[..., 1::2, :]


def _leaves(batch, n, d, e, decay, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, n, d, generator=g, dtype=F64)
    k = torch.randn(*batch, n, d, generator=g, dtype=F64)
    v = torch.randn(*batch, n, e, generator=g, dtype=F64)
    beta = torch.rand(*batch, n, generator=g, dtype=F64) * 0.98 + 0.01
    shape = {"none": None, "scalar": (*batch, n), "channel": (*batch, n, d)}[decay]
    logits = None if shape is None else 2 + 1.5 * torch.randn(shape, generator=g, dtype=F64)
    return [x if x is None else x.requires_grad_() for x in (q, k, v, beta, logits)]


def _output_and_grads(core, leaves, W):
    q, k, v, beta, logits = leaves
    log_alpha = None if logits is None else F.logsigmoid(logits)
    o = core(q, F.normalize(k, dim=-1), v, beta, log_alpha)
    live = [x for x in leaves if x is not None]
    return [o.detach(), *torch.autograd.grad((o * W).sum(), live)]


@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
@pytest.mark.parametrize(
    ("batch", "n", "d", "e", "chunk_size"),
    [((2,), 1, 3, 2, 64), ((2, 3), 29, 4, 3, 8), ((1, 2), 70, 6, 5, 64)],
)
@pytest.mark.parametrize("form", [one_solve, two_step], ids=["one_solve", "two_step"])
def test_matches_recurrence(form, batch, n, d, e, chunk_size, decay):
    leaves = _leaves(batch, n, d, e, decay, seed=n + d)
    W = torch.randn(*batch, n, e, generator=torch.Generator().manual_seed(n), dtype=F64)
    expected = _output_and_grads(recurrence, leaves, W)
    got = _output_and_grads(lambda *a: form(*a, chunk_size=chunk_size), leaves, W)
    names = ["output", "q", "k", "v", "beta", "decay logits"][: len(got)]
    for name, a, b in zip(names, got, expected, strict=True):
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"{name}: max |Δ| = {err:.2e}"


def test_unit_write_replaces_the_value():
    """β = 1, α = 1 and a repeated unit key: the state forgets the first value entirely."""
    k = F.normalize(torch.randn(1, 3, dtype=F64), dim=-1).expand(2, 3)
    q, v = k.clone(), torch.tensor([[1.0, 2.0], [-3.0, 5.0]], dtype=F64)
    o = one_solve(q, k, v, torch.ones(2, dtype=F64), None, chunk_size=64)
    torch.testing.assert_close(o, v, rtol=0, atol=1e-14)
