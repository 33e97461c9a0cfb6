"""QK-Clip: max-logit reference, per-head clipping rules (MHA/GQA/MQA/MLA), hooks, state."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optim import Muon, QKClip
from optim.max_logit import max_logit_torch, max_logits

from .toy_attention import ToyAttention, ToyLM, ToyMLA

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-wait (20x slower on a loaded box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- helpers


def _oracle(q, k, causal, scale, use_abs=False):
    """float64 numpy per-head max over the dense masked score tensor."""
    qn, kn = q.double().numpy(), k.double().numpy()
    G = q.shape[1] // k.shape[1]
    kn = np.repeat(kn, G, axis=1)
    s = np.einsum("bhid,bhjd->bhij", qn, kn) * scale
    if use_abs:
        s = np.abs(s)
    Sq, Sk = s.shape[-2:]
    if causal:
        s = np.where(np.tril(np.ones((Sq, Sk), dtype=bool)), s, -np.inf)
    if s.size == 0:
        return np.full(q.shape[1], -np.inf)
    return s.max(axis=(0, 2, 3))


def _head_max(module, x):
    """Per-head max of the recomputed (masked) logits, in the module's dtype."""
    with torch.no_grad():
        return module.logits(x).amax(dim=(0, 2, 3))


def _boost_heads(module, heads, factor):
    """Multiply the query rows (and bias) of `heads` so their logits grow by `factor`."""
    with torch.no_grad():
        if isinstance(module, ToyMLA):
            lin, per = module.q_proj, module.dn + module.dr
        else:
            lin, per = (module.qkv if module.fused else module.q_proj), module.D
        for h in heads:
            lin.weight[h * per : (h + 1) * per] *= factor
            if lin.bias is not None:
                lin.bias[h * per : (h + 1) * per] *= factor


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------- max-logit reference


@st.composite
def _qk_case(draw):
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    Sq = draw(st.integers(1, 40))
    causal = draw(st.booleans())
    Sk = draw(st.integers(1, 40))
    D = draw(st.integers(1, 12))
    scale_q = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, H=G * Hkv, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, causal=causal,
                scale_q=scale_q, seed=seed,
                block_q=draw(st.sampled_from([1, 3, 16, 256])),
                block_k=draw(st.sampled_from([1, 5, 16, 1024])),
                use_abs=draw(st.booleans()))  # fmt: skip


@given(_qk_case())
def test_reference_matches_float64_oracle(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["B"], c["H"], c["Sq"], c["D"], generator=g) * c["scale_q"]
    k = torch.randn(c["B"], c["Hkv"], c["Sk"], c["D"], generator=g)
    q0, k0 = q.clone(), k.clone()
    scale = 1 / math.sqrt(c["D"])
    want = _oracle(q, k, c["causal"], scale, c["use_abs"])
    got = max_logit_torch(q, k, causal=c["causal"], scale=scale, use_abs=c["use_abs"],
                           block_q=c["block_q"], block_k=c["block_k"])  # fmt: skip
    # float32 products summed over D ≤ 12 terms: error ≤ D·eps32·Σ|q_d k_d|·scale; bound Σ|q k|
    # by |q|·|k| (Cauchy–Schwarz) and take the largest over all pairs.
    bound = 16 * 1.2e-7 * scale * (q.norm(dim=-1).max() * k.norm(dim=-1).max()).item()
    assert got.dtype == torch.float32 and got.shape == (c["H"],)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=bound + 1e-30)
    # float64 inputs: float64 arithmetic, agreement to 1e-12 relative
    kw = dict(causal=c["causal"], scale=scale, use_abs=c["use_abs"], block_q=c["block_q"],
              block_k=c["block_k"])  # fmt: skip
    got64 = max_logit_torch(q.double(), k.double(), **kw)
    np.testing.assert_allclose(got64.numpy(), want, rtol=1e-12, atol=1e-300)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_max_logits_public_defaults_and_noncontiguous():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 6, 8, generator=g).transpose(1, 2)  # (B, H=6, S=9, D) strided view
    k = torch.randn(2, 9, 3, 8, generator=g).transpose(1, 2)
    want = _oracle(q, k, True, 1 / math.sqrt(8))
    np.testing.assert_allclose(max_logits(q, k).double().numpy(), want, rtol=1e-6, atol=1e-6)
    want_nc = _oracle(q, k, False, 0.5)
    got = max_logits(q, k, causal=False, scale=0.5)
    np.testing.assert_allclose(got.double().numpy(), want_nc, rtol=1e-6, atol=1e-6)


def test_max_logits_empty_and_zero():
    q, k = torch.zeros(0, 2, 5, 4), torch.zeros(0, 2, 5, 4)
    assert torch.equal(max_logits(q, k), torch.full((2,), -math.inf))
    q, k = torch.zeros(1, 2, 0, 4), torch.zeros(1, 2, 0, 4)
    assert torch.equal(max_logits(q, k), torch.full((2,), -math.inf))
    assert torch.equal(max_logits(torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 3, 4)),
                       torch.zeros(2))  # fmt: skip


@pytest.mark.parametrize(
    ("q", "k", "exc", "msg"),
    [
        ("x", torch.zeros(1, 1, 2, 2), TypeError, "`q`"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 2), TypeError, "`q`"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2), ValueError, "`q`"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), ValueError, "head_dim"),
        (torch.zeros(1, 3, 3, 4), torch.zeros(1, 2, 3, 4), ValueError, "multiple"),
        (torch.zeros(2, 2, 3, 4), torch.zeros(1, 2, 3, 4), ValueError, "batch"),
    ],
)
def test_max_logits_bad_inputs(q, k, exc, msg):
    with pytest.raises(exc, match=msg):
        max_logits(q, k)


# --------------------------------------------------------------------------- clipping rules

ATTN_CASES = {
    "mha": dict(num_kv_heads=None),
    "mha-bias": dict(num_kv_heads=None, bias=True),
    "gqa": dict(num_kv_heads=2),
    "gqa-bias-fused": dict(num_kv_heads=2, bias=True, fused=True),
    "mqa": dict(num_kv_heads=1),
    "mha-fused": dict(num_kv_heads=None, fused=True),
}


def _setup(case, dtype=F64, tau=None, seed=0, **reg):
    torch.manual_seed(seed)
    m = ToyAttention(16, 4, **ATTN_CASES[case]).to(dtype)
    m.eval()
    x = torch.randn(2, 11, 16, dtype=dtype)
    # heads 1 and 2 far above the others; τ between the groups
    _boost_heads(m, [1, 2], 12.0)
    S0 = _head_max(m, x)
    tau = tau if tau is not None else float((S0[1:3].min() + S0[[0, 3]].max()) / 2)
    qk = QKClip(tau=tau)
    m.register(qk, "attn", **reg)
    return m, x, qk, S0


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_clip_caps_clipped_heads_and_leaves_others_bit_identical(case):
    m, x, qk, S0 = _setup(case)
    tau = qk.tau
    over = S0 > tau
    assert over.tolist() == [False, True, True, False]
    L0, O0 = m.logits(x).detach(), m.head_outputs(x).detach()
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    stats = qk.clip_()["attn"]
    assert stats["clipped"].tolist() == over.tolist()
    S1 = _head_max(m, x)
    # float64 throughout: γ is rounded to float32 once (6e-8 relative), far under 1e-6
    assert (S1[over] <= tau * (1 + 1e-6)).all()
    assert (S1[over] >= tau * (1 - 1e-6)).all()  # clipped exactly to τ, not below
    L1, O1 = m.logits(x).detach(), m.head_outputs(x).detach()
    # every logit of a clipped head scales by exactly γ (bias rule: b scaled with W)
    g = stats["gamma"].double()
    for h in torch.nonzero(over).flatten().tolist():
        torch.testing.assert_close(L1[:, h], g[h] * L0[:, h], rtol=1e-6, atol=0)
    # heads below τ: bit-identical logits and outputs
    assert torch.equal(L1[:, ~over], L0[:, ~over])
    assert torch.equal(O1[:, ~over], O0[:, ~over])


def test_clip_float32_bound():
    m, x, qk, S0 = _setup("gqa", dtype=torch.float32)
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    qk.clip_()
    S1 = _head_max(m, x)
    over = S0 > qk.tau
    # float32 recompute: 16-term dot products and γ rounding, a few ulps (eps32 = 1.2e-7)
    assert (S1[over] <= qk.tau * (1 + 1e-5)).all()
    assert torch.equal(S1[~over], S0[~over])


@pytest.mark.parametrize("case", ["gqa", "mqa", "gqa-bias-fused"])
def test_gqa_shared_key_heads_never_scaled(case):
    m, x, qk, S0 = _setup(case)
    before = _params(m)
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    qk.clip_()
    after = _params(m)
    nq = m.H * m.D
    if m.fused:
        key = slice(nq, None)  # k and v rows of the fused weight
        assert torch.equal(after["qkv.weight"][key], before["qkv.weight"][key])
        if "qkv.bias" in before:
            assert torch.equal(after["qkv.bias"][key], before["qkv.bias"][key])
    else:
        assert torch.equal(after["k_proj.weight"], before["k_proj.weight"])
    # query heads 0 and 3 share key heads with clipped heads 1 and 2 (GQA) and are unchanged
    L = m.logits(x).detach()
    assert torch.equal(_head_max(m, x)[[0, 3]], S0[[0, 3]])
    assert (L.amax(dim=(0, 2, 3))[[1, 2]] <= qk.tau * (1 + 1e-6)).all()


def test_gqa_group_rule_is_megatrons():
    m, x, qk, S0 = _setup("gqa", gqa="group")
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    stats = qk.clip_()["attn"]
    S1 = _head_max(m, x)
    G = 2
    g_group = stats["gamma"].double().view(2, G).amin(1).repeat_interleave(G)
    # every head of a group scales by the group's γ: the shared key is scaled too
    torch.testing.assert_close(S1, g_group * S0, rtol=1e-6, atol=0)
    assert (S1 <= qk.tau * (1 + 1e-6)).all()


def test_mla_shared_rope_key_untouched_and_per_head_factors():
    torch.manual_seed(0)
    m = ToyMLA(dim=16, num_heads=4, nope_dim=4, rope_dim=4, v_dim=6, kv_rank=8).double().eval()
    x = torch.randn(2, 9, 16, dtype=F64)
    _boost_heads(m, [0, 3], 15.0)
    S0 = _head_max(m, x)
    tau = float((S0[[0, 3]].min() + S0[[1, 2]].max()) / 2)
    qk = QKClip(tau=tau, alpha=0.3)
    m.register(qk, "mla")
    before, L0, O0 = _params(m), m.logits(x).detach(), m.head_outputs(x).detach()
    q, k, _ = m.qkv_heads(x)
    qk.record("mla", q, k)
    st_ = qk.clip_()["mla"]
    after = _params(m)
    over = S0 > tau
    assert over.tolist() == [True, False, False, True]
    # shared RoPE key projection and the value rows of kv_b are never touched
    assert torch.equal(after["kv_a.weight"], before["kv_a.weight"])
    kvb_b = before["kv_b.weight"].view(4, 10, 8)
    kvb_a = after["kv_b.weight"].view(4, 10, 8)
    assert torch.equal(kvb_a[:, 4:], kvb_b[:, 4:])
    g = st_["gamma"].double()
    qa, qb = after["q_proj.weight"].view(4, 8, 16), before["q_proj.weight"].view(4, 8, 16)
    for h in range(4):
        # q_c × γ^α, q_r × γ, k_c × γ^(1−α)
        torch.testing.assert_close(qa[h, :4], qb[h, :4] * g[h] ** 0.3, rtol=1e-6, atol=0)
        torch.testing.assert_close(qa[h, 4:], qb[h, 4:] * g[h], rtol=1e-6, atol=0)
        torch.testing.assert_close(kvb_a[h, :4], kvb_b[h, :4] * g[h] ** 0.7, rtol=1e-6, atol=0)
    L1, O1 = m.logits(x).detach(), m.head_outputs(x).detach()
    for h in (0, 3):
        torch.testing.assert_close(L1[:, h], g[h] * L0[:, h], rtol=1e-6, atol=0)
    S1 = L1.amax(dim=(0, 2, 3))
    assert (S1[over] <= tau * (1 + 1e-6)).all()
    assert torch.equal(L1[:, ~over], L0[:, ~over])
    assert torch.equal(O1[:, ~over], O0[:, ~over])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_split(alpha):
    m, x, qk, S0 = _setup("mha")
    qk.alpha = alpha
    before = _params(m)
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    g = qk.clip_()["attn"]["gamma"].double()
    after = _params(m)
    D = m.D
    for h in range(4):
        rows = slice(h * D, (h + 1) * D)
        wq = before["q_proj.weight"][rows] * g[h] ** alpha
        wk = before["k_proj.weight"][rows] * g[h] ** (1 - alpha)
        torch.testing.assert_close(after["q_proj.weight"][rows], wq, rtol=1e-6, atol=0)
        torch.testing.assert_close(after["k_proj.weight"][rows], wk, rtol=1e-6, atol=0)
    if alpha == 0.0:
        assert torch.equal(after["q_proj.weight"], before["q_proj.weight"])
    if alpha == 1.0:
        assert torch.equal(after["k_proj.weight"], before["k_proj.weight"])
    assert (_head_max(m, x)[S0 > qk.tau] <= qk.tau * (1 + 1e-6)).all()


def test_out_dim_1_weights():
    """Weights stored (in, out), e.g. GPT-2's Conv1D: the head rows are columns."""
    torch.manual_seed(0)
    H, D, dim = 3, 4, 8
    wq = torch.randn(dim, H * D, dtype=F64)
    wk = torch.randn(dim, H * D, dtype=F64)
    wq[:, D : 2 * D] *= 10
    x = torch.randn(1, 6, dim, dtype=F64)

    def qk_of(wq, wk):
        def heads(y):
            return y.view(1, 6, H, D).transpose(1, 2)

        return heads(x @ wq), heads(x @ wk)

    S0 = max_logits(*qk_of(wq, wk))
    tau = float(S0[1] / 2)
    assert (S0[[0, 2]] < tau).all()
    wq0, wk0 = wq.clone(), wk.clone()
    clip = QKClip(tau=tau)
    clip.add_attention("a", wq, wk, H, D, out_dim=1)
    clip.record("a", *qk_of(wq, wk))
    clip.clip_()
    S1 = max_logits(*qk_of(wq, wk))
    assert S1[1] <= tau * (1 + 1e-6)
    assert torch.equal(wq[:, :D], wq0[:, :D]) and torch.equal(wk[:, 2 * D :], wk0[:, 2 * D :])


def test_interleaved_rows_layout():
    """Megatron-style interleaved fused QKV ([q_g, k_g, v_g] per KV group) via explicit rows."""
    torch.manual_seed(1)
    H, Hkv, D, dim = 4, 2, 3, 8
    G = H // Hkv
    per_group = (G + 2) * D
    w = torch.randn(Hkv * per_group, dim, dtype=F64)
    q_rows = [g * per_group + i for g in range(Hkv) for i in range(G * D)]
    k_rows = [g * per_group + G * D + i for g in range(Hkv) for i in range(D)]
    x = torch.randn(2, 5, dim, dtype=F64)

    def qk_of():
        y = x @ w.T
        q = y[..., q_rows].view(2, 5, H, D).transpose(1, 2)
        k = y[..., k_rows].view(2, 5, Hkv, D).transpose(1, 2)
        return q, k

    w[q_rows[2 * D : 3 * D]] *= 20  # query head 2
    S0 = max_logits(*qk_of())
    tau = float(S0[2] / 3)
    assert (S0[[0, 1, 3]] < tau).all()
    clip = QKClip(tau=tau)
    clip.add_attention("a", w, w, H, D, Hkv, q_rows=q_rows, k_rows=k_rows)
    clip.record("a", *qk_of())
    clip.clip_()
    S1 = max_logits(*qk_of())
    assert S1[2] <= tau * (1 + 1e-6) and torch.equal(S1[[0, 1, 3]], S0[[0, 1, 3]])


def test_log_only_changes_nothing():
    m, x, qk, S0 = _setup("gqa-bias-fused")
    qk.log_only = True
    before = _params(m)
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q, k)
    st_ = qk.clip_()["attn"]
    after = _params(m)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not st_["clipped"].any()
    assert (st_["gamma"][S0 > qk.tau] < 1).all()  # what would have been applied
    torch.testing.assert_close(st_["max_logits"], S0.float())


def test_micro_batch_accumulation_and_reset():
    m, x, qk, S0 = _setup("gqa")
    q, k, _ = m.qkv_heads(x)
    qk.record("attn", q[:1], k[:1])
    s_a = qk.max_logits()["attn"]
    qk.record("attn", q[1:], k[1:])
    s_ab = qk.max_logits()["attn"]
    assert (s_ab >= s_a).all()
    whole = max_logits(q, k).float()
    assert torch.equal(s_ab, whole)  # max over micro-batches = max over the whole batch
    torch.testing.assert_close(s_ab, S0.float())
    qk.record_max_logits("attn", torch.tensor([0.0, 0.0, 0.0, 1e9]))
    assert qk.max_logits()["attn"][3] == 1e9
    qk.clip_()
    assert torch.isinf(qk.max_logits()["attn"]).all()  # reset after the step
    assert qk.last_stats()["attn"]["clipped"].tolist() == [False, True, True, True]


def test_nonfinite_statistics_are_not_applied():
    m, x, qk, S0 = _setup("mha")
    before = _params(m)
    qk.record_max_logits("attn", torch.tensor([math.nan, math.inf, 0.0, -math.inf]))
    st_ = qk.clip_()["attn"]
    assert not st_["clipped"].any()
    assert all(torch.equal(before[n], _params(m)[n]) for n in before)


def test_no_record_means_no_clip_and_empty_sequences():
    m, x, qk, _ = _setup("mha")
    before = _params(m)
    qk.record("attn", torch.zeros(1, 4, 0, 4, dtype=F64), torch.zeros(1, 4, 0, 4, dtype=F64))
    st_ = qk.clip_()["attn"]
    assert torch.isinf(st_["max_logits"]).all() and not st_["clipped"].any()
    assert all(torch.equal(before[n], _params(m)[n]) for n in before)


# --------------------------------------------------------------------------- validation


def test_registration_errors():
    lin = torch.nn.Linear(8, 8)
    qk = QKClip()
    with pytest.raises(ValueError, match="tau"):
        QKClip(tau=0.0)
    with pytest.raises(TypeError, match="tau"):
        QKClip(tau="1")
    with pytest.raises(ValueError, match="alpha"):
        QKClip(alpha=1.5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        qk.add_attention("a", lin.weight, lin.weight, 4, 2, num_kv_heads=3)
    with pytest.raises(ValueError, match="q_rows"):
        qk.add_attention("a", lin.weight, lin.weight, 4, 4)
    with pytest.raises(ValueError, match="overlap"):
        qk.add_attention("a", lin.weight, lin.weight, 2, 2, q_rows=slice(0, 4), k_rows=slice(2, 6))
    with pytest.raises(ValueError, match="q_bias"):
        qk.add_attention("a", lin.weight, lin.weight, 2, 2, q_rows=slice(0, 4),
                         k_rows=slice(4, 8), q_bias=torch.zeros(3))  # fmt: skip
    with pytest.raises(TypeError, match="q_weight"):
        qk.add_attention("a", "w", lin.weight, 2, 4)
    with pytest.raises(ValueError, match="out_dim"):
        qk.add_attention("a", lin.weight, lin.weight, 2, 2, out_dim=2)
    with pytest.raises(ValueError, match="twice"):
        qk.add_attention("a", lin.weight, lin.weight, 2, 2, q_rows=[0, 0, 1, 2], k_rows=[4, 5])
    qk.add_attention("a", lin.weight, lin.weight, 2, 2, q_rows=slice(0, 4), k_rows=slice(4, 8))
    with pytest.raises(ValueError, match="already registered"):
        qk.add_attention("a", lin.weight, lin.weight, 2, 2, q_rows=slice(0, 4), k_rows=slice(4, 8))
    with pytest.raises(KeyError, match="no attention"):
        qk.record("b", torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2))
    with pytest.raises(ValueError, match="num_heads"):
        qk.record("a", torch.zeros(1, 3, 3, 2), torch.zeros(1, 3, 3, 2))
    with pytest.raises(ValueError, match="per_head_max"):
        qk.record_max_logits("a", torch.zeros(3))
    with pytest.raises(TypeError, match="optimizer"):
        qk.attach(lin)
    with pytest.raises(ValueError, match="tp_group"):  # no torch.distributed here
        qk.add_attention("t", lin.weight, lin.weight, 2, 2, q_rows=slice(0, 4),
                         k_rows=slice(4, 8), tp_group=True)  # fmt: skip
    mla = ToyMLA(16, 2, 4, 4, 4, 8)
    with pytest.raises(ValueError, match="k_rope_weight"):
        qk.add_mla("m", mla.q_proj.weight, mla.kv_b.weight, mla.q_proj.weight,
                   mla.q_proj.weight, 2, 4, 4)  # fmt: skip
    with pytest.raises(ValueError, match="k_nope_weight"):
        odd = torch.nn.Linear(8, 7).weight  # 7 rows: neither 2·4 nor 2·(4 + d_v)
        qk.add_mla("m", mla.q_proj.weight, odd, mla.q_proj.weight, None, 2, 4, 4)


# --------------------------------------------------------------------------- hooks and state


def _train(model, opt, steps, seed=1, vocab=16):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (8, 12), generator=g)
        y = torch.roll(x, 1, 1)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _optimizers():
    out = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        "adamw": lambda p: torch.optim.AdamW(p, lr=3e-2),
    }
    out["muon"] = lambda p: Muon(p, lr=0.05)
    return out


@pytest.mark.parametrize("name", list(_optimizers()))
def test_attach_clips_after_every_step(name):
    torch.manual_seed(0)
    model = ToyLM(layers=2, num_kv_heads=2)
    qk = QKClip(tau=2.0)
    model.register(qk)
    opt = _optimizers()[name](model.parameters())
    handle = qk.attach(opt)
    _train(model, opt, 3)
    assert qk.num_clips == 3
    assert set(qk.last_stats()) == {"layer0", "layer1"}
    assert torch.isfinite(qk.last_stats()["layer0"]["max_logits"]).all()
    assert torch.isinf(qk.max_logits()["layer0"]).all()  # reset
    handle.remove()
    _train(model, opt, 1)
    assert qk.num_clips == 3


def test_deepcopy_drops_hook_and_attach_restores_it():
    torch.manual_seed(0)
    model = ToyLM(layers=1)
    qk = QKClip(tau=1.0)
    model.register(qk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    qk.attach(opt)
    _train(model, opt, 1)
    assert qk.num_clips == 1
    # a deep-copied / unpickled optimizer has no step hooks: attach again
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt3 = copy.deepcopy(opt)
    assert not opt3._optimizer_step_post_hooks
    qk2 = QKClip()
    model2.register(qk2)
    qk2.load_state_dict(qk.state_dict())
    _train(model2, opt2, 1)
    assert qk2.num_clips == 1  # restored count, no hook yet
    qk2.attach(opt2)
    _train(model2, opt2, 1)
    assert qk2.num_clips == 2


def test_state_dict_round_trip_and_resume_is_identical():
    def build():
        torch.manual_seed(0)
        model = ToyLM(layers=1, num_kv_heads=2)
        qk = QKClip(tau=1.5, alpha=0.25, use_abs=True)
        model.register(qk)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        qk.attach(opt)
        return model, opt, qk

    m1, o1, q1 = build()
    _train(m1, o1, 2, seed=3)
    # a micro-batch already recorded when the checkpoint is taken
    m1.train()
    m1(torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(9)))
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "qk": q1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    m2, o2, q2 = build()
    q2.tau, q2.alpha, q2.use_abs = 99.0, 0.5, False
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    q2.load_state_dict(ck["qk"])
    assert (q2.tau, q2.alpha, q2.use_abs, q2.num_clips) == (1.5, 0.25, True, 2)
    for n in q1.names():
        assert torch.equal(q1.max_logits()[n], q2.max_logits()[n])
        assert torch.equal(q1.last_stats()[n]["gamma"], q2.last_stats()[n]["gamma"])
    l1 = _train(m1, o1, 2, seed=4)
    l2 = _train(m2, o2, 2, seed=4)
    assert l1 == l2
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2), n
    with pytest.raises(ValueError, match="register the same"):
        QKClip().load_state_dict(ck["qk"])


# --------------------------------------------------------------------------- training


def test_training_max_logit_grows_without_clip_and_is_capped_with_it():
    tau = 10.0

    def run(log_only):
        torch.manual_seed(0)
        model = ToyLM(vocab=16, dim=32, num_heads=4, layers=1)
        qk = QKClip(tau=tau, log_only=log_only)
        model.register(qk)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
        qk.attach(opt)
        g = torch.Generator().manual_seed(1)
        seen, recomputed = [], []
        for _ in range(50):
            x = torch.randint(0, 16, (16, 24), generator=g)
            loss = torch.nn.functional.cross_entropy(
                model(x).flatten(0, 1), torch.roll(x, 1, 1).flatten()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(qk.last_stats()["layer0"]["max_logits"].max().item())
            if not log_only:
                model.eval()
                (h,) = model.attn_inputs(x)
                recomputed.append(_head_max(model.attn[0], h).max().item())
                model.train()
        return seen, recomputed, loss.item()

    free, _, loss_free = run(True)
    clipped, recomputed, loss_clip = run(False)
    assert max(free) > 4 * tau  # the logit explodes without QK-Clip
    # with it: the forward of each step sees at most one update's growth past τ
    assert max(clipped) < 1.5 * tau
    # and after each clip the weights give ≤ τ on the step's batch up to that same growth;
    # the last steps settle at τ
    assert max(recomputed[-10:]) < 1.2 * tau
    assert loss_clip < 1.5 * loss_free + 0.5  # still learns


# --------------------------------------------------------------------------- distributed


# The spawned 2- and 3-rank worlds (MAX all-reduce over plain replicas, DTensor layouts, FSDP2,
# DDP and tensor-parallel training) are in test_qk_clip_sharded.py.


def test_reduce_path_with_mocked_dist(monkeypatch):
    """The single-process path of the reduction: one all_reduce(MAX) per device, stats scattered."""
    import torch.distributed as dist

    calls = []

    def fake_all_reduce(t, op=None, group=None):
        calls.append((t.clone(), op, group))
        t.copy_(torch.maximum(t, torch.full_like(t, 7.0)))

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    lin = torch.nn.Linear(4, 16, bias=False)
    qk = QKClip(tau=100.0, distributed=True, process_group="pg")
    qk.add_attention("a", lin.weight, lin.weight, 2, 4, q_rows=slice(0, 8), k_rows=slice(8, 16))
    qk.add_attention("b", lin.weight, lin.weight, 1, 4, q_rows=slice(0, 4), k_rows=slice(8, 12))
    qk.record_max_logits("a", torch.tensor([1.0, 9.0]))
    st_ = qk.clip_()
    assert len(calls) == 1 and calls[0][1] == dist.ReduceOp.MAX and calls[0][2] == "pg"
    assert calls[0][0].shape == (3,)
    assert st_["a"]["max_logits"].tolist() == [7.0, 9.0]
    assert st_["b"]["max_logits"].tolist() == [7.0]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pair", [(4, 5), (5, 4), (5, 5), (0, 1), (8, 8)])
@pytest.mark.parametrize(("block_q", "block_k"), [(3, 2), (256, 1024)])
def test_reference_mask_with_planted_logit(causal, pair, block_q, block_k):
    """One huge logit at (i, j): it counts iff unmasked, whatever the block boundaries."""
    g = torch.Generator().manual_seed(0)
    q, k = 0.01 * torch.randn(1, 2, 9, 4, generator=g), 0.01 * torch.randn(1, 1, 9, 4, generator=g)
    i, j = pair
    q[0, 1, i, 0] += 10.0
    k[0, 0, j, 0] += 10.0
    got = max_logit_torch(q, k, causal=causal, scale=1.0, block_q=block_q, block_k=block_k)
    np.testing.assert_allclose(got.double().numpy(), _oracle(q, k, causal, 1.0), atol=1e-5)
    assert (got[1] > 50) == (not causal or j <= i)


# --------------------------------------------------------------------------- QK-Norm

# (num_kv_heads, q gain, k gain, gqa rule)
NORM_CASES = {
    "mha-shared-shared": (None, "shared", "shared", "per_head"),
    "gqa-shared-shared": (2, "shared", "shared", "per_head"),
    "mha-perhead-perhead": (None, "per_head", "per_head", "per_head"),
    "mha-shared-perhead": (None, "shared", "per_head", "per_head"),
    "gqa-shared-perhead": (2, "shared", "per_head", "per_head"),
    "gqa-perhead-shared": (2, "per_head", "shared", "per_head"),
    "gqa-perhead-perhead-group": (2, "per_head", "per_head", "group"),
    "mha-qnorm-only": (None, "per_head", None, "per_head"),
    "gqa-knorm-only": (2, None, "shared", "per_head"),
}


def _expected_scale(Hkv, qn, kn, gqa, g):
    """Per head, the factor its logits get, from docs/math.md §6 written out per case."""
    H = g.shape[0]
    Uq = 1 if qn == "shared" else H
    Uk = 1 if kn == "shared" else Hkv
    Gq, Gk = H // Uq, H // Uk
    if Gq == 1 and Gk == 1:
        return g  # α split: g^α · g^(1−α)
    gk = g.view(Uk, Gk).amin(1).repeat_interleave(Gk)
    if Gq == 1:
        return g if gqa == "per_head" else gk
    return gk  # shared q gain: k units carry the (group) min, or both shared: the min


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_qk_norm_gains_clip_exactly(case):
    Hkv, qn, kn, gqa = NORM_CASES[case]
    torch.manual_seed(3)
    m = ToyAttention(16, 4, Hkv, q_norm=qn, k_norm=kn).double().eval()
    x = torch.randn(2, 11, 16, dtype=F64)
    with torch.no_grad():  # spread the heads: per-head gains (or the data) set their scale
        for g, heads in ((m.q_norm, 4), (m.k_norm, m.Hkv)):
            if g is not None and g.ndim == 2:
                g.mul_(torch.linspace(1.0, 3.0, heads, dtype=F64)[:, None])
        m.q_proj.weight.mul_(4.0)  # no effect on normed sides; grows unnormed logits
    S0 = _head_max(m, x)
    srt = S0.sort().values
    tau = float((srt[1] + srt[2]) / 2)  # two heads over τ, two under
    qk = QKClip(tau=tau, alpha=0.3)
    m.register(qk, "attn", gqa=gqa)
    before, L0 = _params(m), m.logits(x).detach()
    # one training step that leaves the weights as they are (lr 0), then the clip
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    qk.attach(opt)
    m.train()
    m(x).square().mean().backward()
    opt.step()
    m.eval()
    st_ = qk.last_stats()["attn"]
    over = S0 > tau
    assert st_["clipped"].tolist() == over.tolist()
    after, L1 = _params(m), m.logits(x).detach()
    # weights of a normed side are never written (the norm would undo it)
    if qn is not None:
        assert torch.equal(after["q_proj.weight"], before["q_proj.weight"])
    if kn is not None:
        assert torch.equal(after["k_proj.weight"], before["k_proj.weight"])
    e = _expected_scale(m.Hkv, qn, kn, gqa, st_["gamma"].double())
    for h in range(4):
        if e[h] == 1:
            assert torch.equal(L1[:, h], L0[:, h]), h  # untouched heads: bit-identical
        else:
            torch.testing.assert_close(L1[:, h], e[h] * L0[:, h], rtol=1e-6, atol=0)
    S1 = L1.amax(dim=(0, 2, 3))
    assert (S1 <= tau * (1 + 1e-6)).all()  # every head ≤ τ after one clip
    exact = torch.equal(e, st_["gamma"].double())  # no head shares a unit with a clipped one
    assert not exact or (S1[over] >= tau * (1 - 1e-6)).all()  # then clipped to τ exactly


def test_qk_norm_shared_gains_alpha_split_and_per_head_keeps_others():
    """Both gains shared: q × γ*^α, k × γ*^(1−α) with γ* the smallest γ; per-head: only the
    clipped heads' gain rows change."""
    torch.manual_seed(4)
    m = ToyAttention(16, 4, q_norm="shared", k_norm="shared").double().eval()
    x = torch.randn(2, 9, 16, dtype=F64)
    S0 = _head_max(m, x)
    qk = QKClip(tau=float(S0.max() / 2), alpha=0.25)
    m.register(qk, "a")
    g_q, g_k = m.q_norm.detach().clone(), m.k_norm.detach().clone()
    qk.record("a", *m.qkv_heads(x)[:2])
    gs = qk.clip_()["a"]["gamma"].double().min()
    torch.testing.assert_close(m.q_norm.detach(), g_q * gs**0.25, rtol=1e-7, atol=0)
    torch.testing.assert_close(m.k_norm.detach(), g_k * gs**0.75, rtol=1e-7, atol=0)

    m = ToyAttention(16, 4, q_norm="per_head", k_norm="per_head").double().eval()
    with torch.no_grad():
        m.q_norm[1].mul_(5.0)
    S0 = _head_max(m, x)
    qk = QKClip(tau=float(S0[1] * 0.8))
    assert int((S0 > qk.tau).sum()) == 1
    m.register(qk, "a")
    g_q, g_k = m.q_norm.detach().clone(), m.k_norm.detach().clone()
    qk.record("a", *m.qkv_heads(x)[:2])
    qk.clip_()
    rest = [0, 2, 3]
    assert torch.equal(m.q_norm.detach()[rest], g_q[rest])
    assert torch.equal(m.k_norm.detach()[rest], g_k[rest])
    assert not torch.equal(m.q_norm.detach()[1], g_q[1])


def test_qk_norm_flat_per_head_gain_and_errors():
    """A per-head gain stored flat (H·D,), and shapes that fit no rule."""
    torch.manual_seed(5)
    lin_q, lin_k = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    g_q = torch.nn.Parameter(torch.ones(8))  # H=2, D=4: (H·D,) per head
    g_k = torch.nn.Parameter(torch.ones(4))  # (D,) shared
    qk = QKClip(tau=1.0)
    qk.add_attention("a", lin_q.weight, lin_k.weight, 2, 4, q_norm_weight=g_q,
                     k_norm_weight=g_k)  # fmt: skip
    qk.record_max_logits("a", torch.tensor([4.0, 0.5]))
    qk.clip_()
    # q per head, k shared by both heads (G_k = 2): the whole γ on q's rows of head 0
    assert torch.equal(g_q.detach()[4:], torch.ones(4))
    torch.testing.assert_close(g_q.detach()[:4], torch.full((4,), 0.25))
    assert torch.equal(g_k.detach(), torch.ones(4))
    with pytest.raises(ValueError, match="q_norm_weight"):
        qk.add_attention("b", lin_q.weight, lin_k.weight, 2, 4, q_norm_weight=torch.ones(5))
    with pytest.raises(ValueError, match="different tensors"):
        qk.add_attention("b", lin_q.weight, lin_k.weight, 2, 4, q_norm_weight=g_k,
                         k_norm_weight=g_k)  # fmt: skip
    with pytest.raises(TypeError, match="k_norm_weight"):
        qk.add_attention("b", lin_q.weight, lin_k.weight, 2, 4, k_norm_weight="g")


# --------------------------------------------------------------------------- attach


def test_attach_is_idempotent_per_optimizer():
    from torch.distributed.checkpoint.stateful import Stateful

    assert isinstance(QKClip(), Stateful)  # torch.distributed.checkpoint calls its state_dict
    torch.manual_seed(0)
    model = ToyLM(layers=1)
    qk = QKClip(tau=1.0)
    model.register(qk)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h1 = qk.attach(opt)
    h2 = qk.attach(opt)
    assert h1 is h2 and len(opt._optimizer_step_post_hooks) == 1
    _train(model, opt, 2)
    assert qk.num_clips == 2  # once per step, not twice
    assert torch.isfinite(qk.last_stats()["layer0"]["max_logits"]).all()  # not a second −inf
    h1.remove()
    h3 = qk.attach(opt)  # removed: attaching again registers anew
    assert h3 is not h1 and len(opt._optimizer_step_post_hooks) == 1
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    qk.attach(opt2)
    qk.detach()

    assert not opt._optimizer_step_post_hooks and not opt2._optimizer_step_post_hooks
