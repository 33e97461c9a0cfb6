"""optim.Muon: torch.optim conventions, equivalence with torch.optim.Muon, and the Muon math."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optim import Muon, muon_param_groups
from optim.muon import (
    _stack,
    adjust_lr_ratio,
    matrix_shape,
    orthogonalize,
    orthogonalize_bucket,
)

KELLER = (3.4445, -4.7750, 2.0315)


@pytest.fixture(autouse=True)
def _one_thread():
    # small matrices: one intra-op thread is fastest and avoids oversubscribing CI's 2 cores
    # under pytest -n 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHAPES = [(32, 16), (16, 32), (24, 24), (32, 16), (48, 16)]


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype) for s in shapes]


def make_grads(shapes, steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def run(opt_factory, params, grads_per_step):
    ps = [p.clone().requires_grad_() for p in params]
    opt = opt_factory(ps)
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def svd_oracle(M: torch.Tensor) -> np.ndarray:
    U, _, Vh = np.linalg.svd(M.double().numpy(), full_matrices=False)
    return U @ Vh


# ------------------------------------------------------------------------------------------
# Equivalence with torch.optim.Muon
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, None], ids=["ns-bf16", "ns-default"])
def test_matches_torch_muon(adjust_lr_fn, nesterov, ns_dtype):
    params = make_params(SHAPES)
    grads = make_grads(SHAPES, steps=4)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    kw["adjust_lr_fn"] = adjust_lr_fn
    ref, _ = run(lambda ps: torch.optim.Muon(ps, **kw), params, grads)
    ours, _ = run(
        lambda ps: Muon(ps, ns_coefficients=KELLER, ns_steps=5, ns_dtype=ns_dtype, **kw),
        params,
        grads,
    )
    # torch iterates in bf16 from a bf16 norm; we normalise in fp32 and iterate in ns_dtype. bf16
    # rounding (2^-9 relative) amplified by 5 Keller steps leaves ~1% relative difference in
    # each update (measured 0.7–1.3% of the total move after 4 steps); allow 3%.
    for p_ref, p_ours, p0 in zip(ref, ours, params, strict=True):
        move = (p_ref - p0).norm()
        assert move > 0
        assert (p_ours - p_ref).norm() < 0.03 * move
        # and entrywise: within 3% of one step's entry size lr·r(A,B)/√max(A,B) per step
        _, n, m = matrix_shape(p0.shape)
        step_entry = 0.02 * adjust_lr_ratio(adjust_lr_fn, n, m) / math.sqrt(max(n, m))
        torch.testing.assert_close(p_ours, p_ref, atol=4 * 0.03 * 3 * step_entry, rtol=0)


def test_bf16_params_match_torch_and_keep_fp32_momentum():
    params = make_params(SHAPES, dtype=torch.bfloat16)
    grads = make_grads(SHAPES, steps=3, dtype=torch.bfloat16)
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=True)
    ref, _ = run(lambda ps: torch.optim.Muon(ps, **kw), params, grads)
    ours, opt = run(lambda ps: Muon(ps, ns_coefficients=KELLER, **kw), params, grads)
    for p_ref, p_ours, p0 in zip(ref, ours, params, strict=True):
        assert p_ours.dtype == torch.bfloat16
        assert opt.state[p_ours]["momentum_buffer"].dtype == torch.float32
        # bf16 params: each step's update (~0.02/√L per entry) is rounded against |W| ~ 1
        # (bf16 ulp 2^-8..2^-6), and our fp32 momentum differs from torch's bf16 one, so the
        # weights differ by a few ulps: measured 5–12% of the (small) total move; allow 25%.
        move = (p_ref.float() - p0.float()).norm()
        assert (p_ours.float() - p_ref.float()).norm() < 0.25 * move


@pytest.mark.parametrize("nesterov", [True, False])
def test_state_not_mutated_by_msign_and_grads_not_mutated(nesterov):
    # torch.optim.Muon normalises `grad.bfloat16()` in place: for bf16 params without Nesterov
    # that aliases (and corrupts) the momentum buffer. Ours must hold exactly the EMA.
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.randn(16, 24, dtype=dtype, requires_grad=True)
        opt = Muon([p], lr=0.1, nesterov=nesterov, ns_coefficients=KELLER)
        expected = torch.zeros(16, 24, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
        for _ in range(3):
            g = torch.randn(16, 24, dtype=dtype)
            p.grad = g.clone()
            opt.step()
            assert torch.equal(p.grad, g)  # grads untouched
            if dtype == torch.bfloat16:  # fp32 buffer: μB + (1−μ)G
                expected = expected * 0.95 + g.float() * (1 - 0.95)
            else:
                expected = expected.lerp(g, 0.05)
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"], expected, rtol=1e-6, atol=1e-7
            )


# ------------------------------------------------------------------------------------------
# The Muon math
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_match_rms_adamw_gives_update_rms_02(shape):
    # Full-rank grad, exact msign (method="svd"), no decay: ΔW = −lr·0.2·√max(A,B)·U Vᵀ and
    # ‖U Vᵀ‖_F² = min(A, B), so RMS(ΔW)/lr = 0.2 up to float32 rounding.
    W = torch.zeros(shape, requires_grad=True)
    opt = Muon([W], lr=1.0, weight_decay=0.0, msign="svd", adjust_lr_fn="match_rms_adamw")
    W.grad = torch.randn(shape, dtype=torch.float32)
    opt.step()
    rms = W.detach().pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.2, rel=1e-5)
    np.testing.assert_allclose(
        -W.detach().double().numpy() / (0.2 * math.sqrt(max(shape))),
        svd_oracle(W.grad),
        atol=1e-5,  # float32 SVD of a well-conditioned Gaussian: ~1e-6 per entry
    )


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_weight_decay_uses_unadjusted_lr(adjust_lr_fn):
    # Zero grad → zero update (msign(0) = 0), so only the decay acts: W ← (1 − lr·λ) W, with the
    # unadjusted lr (the adjusted one is 0.2·√64 = 1.6× or 2× larger here).
    W0 = torch.randn(64, 16)
    W = W0.clone().requires_grad_()
    opt = Muon([W], lr=0.05, weight_decay=0.3, adjust_lr_fn=adjust_lr_fn)
    W.grad = torch.zeros_like(W)
    opt.step()
    torch.testing.assert_close(W.detach(), W0 * (1 - 0.05 * 0.3), rtol=0, atol=0)


def test_default_schedule_is_polar_express_and_close_to_svd():
    # ns_coefficients=None → matfn.msign's Polar-Express schedule (5 steps): singular values in
    # [1 − 0.14, 1 + 0.14] for σ/σ_max ≥ 1e-3 (docs/math.md §1.3); this grad has cond ≈ 10.
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 16))
    V, _ = torch.linalg.qr(torch.randn(16, 16))
    G = U @ torch.diag(torch.logspace(0, -1, 16)) @ V.T
    O = orthogonalize(G[None], {"msign": "polar_express", "eps": 1e-7})
    s = torch.linalg.svdvals(O[0].double())
    assert s.min() > 0.85 and s.max() < 1.15


def test_mclip_update_clips_singular_values():
    # update="mclip", exact inner msign: O = mclip(U/c), c = κ‖U‖_F/√s, i.e. σᵢ(O) = min(σᵢ/c, 1).
    pytest.importorskip("matfn.mclip")
    torch.manual_seed(0)
    Uq, _ = torch.linalg.qr(torch.randn(40, 20, dtype=torch.float64))
    Vq, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    sv = torch.logspace(1, -2, 20, dtype=torch.float64)
    G = Uq @ torch.diag(sv) @ Vq.T
    for kappa in (0.5, 1.0, 2.0):
        O = orthogonalize(
            G[None], {"msign": "svd", "eps": 1e-12, "update": "mclip", "mclip_scale": kappa}
        )
        c = kappa * sv.norm() / math.sqrt(20)
        expected = Uq @ torch.diag(torch.clamp(sv / c, max=1.0)) @ Vq.T
        torch.testing.assert_close(O[0], expected, rtol=0, atol=1e-10)  # float64 SVD path
        # ‖O‖_F² ≤ min(s, s/κ²): the msign update RMS bounds the mclip one
        assert O.norm() ** 2 <= min(20, 20 / kappa**2) + 1e-9


def test_mclip_optimizer_step_matches_oracle():
    pytest.importorskip("matfn.mclip")
    W = torch.zeros(24, 40, dtype=torch.float64, requires_grad=True)
    opt = Muon([W], lr=1.0, weight_decay=0.0, update="mclip", msign="svd", eps=1e-12)
    G = torch.randn(24, 40, dtype=torch.float64)
    W.grad = G.clone()
    opt.step()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = S.norm() / math.sqrt(24)
    expected = -(U * torch.clamp(S / c, max=1.0)) @ Vh  # "original": √max(1, 24/40) = 1
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("update", ["msign", "mclip"])
def test_zero_grad_gives_zero_update(update):
    W = torch.randn(8, 12, requires_grad=True)
    W0 = W.detach().clone()
    opt = Muon([W], lr=0.1, weight_decay=0.0, update=update)
    W.grad = torch.zeros_like(W)
    opt.step()
    assert torch.equal(W.detach(), W0)


def test_lr_scheduler_scales_muon_and_adamw():
    w, b = torch.zeros(8, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    opt = Muon([w, b], lr=0.1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(2):
        w0, b0 = w.detach().clone(), b.detach().clone()
        w.grad, b.grad = torch.eye(8), torch.ones(8)
        opt.step()
        sched.step()
        moves.append(((w - w0).abs().max().item(), (b - b0).abs().max().item()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    # msign(I) = I and Adam's normalised step is ±lr (up to eps): both halve with the lr
    assert moves[1][0] == pytest.approx(moves[0][0] / 2, rel=1e-5)
    assert moves[1][1] == pytest.approx(moves[0][1] / 2, rel=1e-3)


# ------------------------------------------------------------------------------------------
# Layouts: conv flatten, experts, tall/wide buckets, batched == per-matrix
# ------------------------------------------------------------------------------------------


def test_conv_flatten_round_trip_and_shape_factor():
    # A conv weight (out, in, kh, kw) is optimised as its (out, in·kh·kw) view; the shape factor
    # comes from that view (8×27 → √max(1, 8/27) = 1), not from kh/kw as in Keller's code.
    conv = torch.randn(8, 3, 3, 3)
    flat = conv.reshape(8, 27).clone()
    grads = make_grads([(8, 3, 3, 3)], steps=3, seed=5)
    a, opt_a = run(lambda ps: Muon(ps, lr=0.1), [conv], grads)
    b, _ = run(lambda ps: Muon(ps, lr=0.1), [flat], [[g[0].reshape(8, 27)] for g in grads])
    assert a[0].shape == (8, 3, 3, 3)
    assert opt_a.state[a[0]]["momentum_buffer"].shape == (8, 3, 3, 3)
    torch.testing.assert_close(a[0].detach().reshape(8, 27), b[0].detach(), rtol=0, atol=0)


def test_channels_last_and_mixed_dtypes_in_one_bucket():
    # a channels_last conv weight has no (out, in·kh·kw) view; fp32 and bf16 params of one shape
    # share a bucket (their momentum is fp32): each must equal its own single-param run
    conv = torch.randn(8, 3, 3, 3)
    shapes = [(8, 3, 3, 3), (8, 27), (8, 27)]
    grads = make_grads(shapes, steps=2, seed=3)
    params = [conv.to(memory_format=torch.channels_last), conv.reshape(8, 27), torch.randn(8, 27)]
    params[2] = params[2].bfloat16()
    grads = [[g[0], g[1], g[2].bfloat16()] for g in grads]
    together, _ = run(lambda ps: Muon(ps, lr=0.1), params, grads)
    assert together[0].is_contiguous(memory_format=torch.channels_last)
    for j in range(3):
        alone, _ = run(lambda ps: Muon(ps, lr=0.1), [params[j]], [[g[j]] for g in grads])
        torch.testing.assert_close(together[j], alone[0], rtol=1e-5, atol=1e-6)


def test_expert_weights_orthogonalised_per_expert():
    experts = torch.randn(4, 16, 8)
    grads = make_grads([(4, 16, 8)], steps=2, seed=7)
    a, _ = run(lambda ps: Muon(ps, lr=0.1, adjust_lr_fn="match_rms_adamw"), [experts], grads)
    for e in range(4):
        b, _ = run(
            lambda ps: Muon(ps, lr=0.1, adjust_lr_fn="match_rms_adamw", batched=False),
            [experts[e]],
            [[g[0][e]] for g in grads],
        )
        # batched bmm vs a single matmul: float32 rounding differences only
        torch.testing.assert_close(a[0].detach()[e], b[0].detach(), rtol=1e-5, atol=1e-6)


def test_matrix_view_flatten_for_conv1d():
    assert matrix_shape((8, 4, 3), "flatten") == (1, 8, 12)
    assert matrix_shape((8, 4, 3), "auto") == (8, 4, 3)
    assert matrix_shape((8, 4, 3, 3), "auto") == (1, 8, 36)
    assert matrix_shape((2, 3, 4, 5), "batch") == (6, 4, 5)
    with pytest.raises(ValueError, match="ndim >= 2"):
        matrix_shape((8,))


@st.composite
def shape_lists(draw):
    dims = st.sampled_from([1, 3, 8, 16, 24])
    base = [(draw(dims), draw(dims)) for _ in range(draw(st.integers(1, 3)))]
    shapes = []
    for n, m in base:  # repeats, transposes and an expert stack, so buckets merge
        shapes += [(n, m)] * draw(st.integers(1, 3))
        if draw(st.booleans()):
            shapes.append((m, n))
        if draw(st.booleans()):
            shapes.append((2, n, m))
    return shapes


@settings(deadline=None)
@given(
    shapes=shape_lists(),
    seed=st.integers(0, 2**16),
    adjust=st.sampled_from([None, "match_rms_adamw"]),
)
def test_batched_path_equals_per_matrix_path(shapes, seed, adjust):
    params = make_params(shapes, seed=seed)
    grads = make_grads(shapes, steps=2, seed=seed + 1)
    a, _ = run(lambda ps: Muon(ps, lr=0.05, adjust_lr_fn=adjust), params, grads)
    b, _ = run(lambda ps: Muon(ps, lr=0.05, adjust_lr_fn=adjust, batched=False), params, grads)
    for x, y in zip(a, b, strict=True):
        # the same float32 ops, batched vs single bmm: rounding-level differences
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_orthogonalize_bucket_matches_per_matrix_and_checks_shapes():
    updates = [torch.randn(12, 20) for _ in range(3)]
    group = {"msign": "polar_express", "eps": 1e-7}
    outs = orthogonalize_bucket(updates, group)
    for u, o in zip(updates, outs, strict=True):
        torch.testing.assert_close(o, orthogonalize(u[None], group)[0], rtol=1e-5, atol=1e-6)
        assert o.shape == u.shape and o.dtype == u.dtype
    assert orthogonalize_bucket([], group) == []
    with pytest.raises(ValueError, match="updates"):
        orthogonalize_bucket([torch.randn(3, 4), torch.randn(4, 3)], group)


# ------------------------------------------------------------------------------------------
# torch.optim conventions
# ------------------------------------------------------------------------------------------


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 4)
    )
    return model.to(dtype)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (5, 3), generator=g)
    return model(x).float().square().mean()


def _train(model, opt, seeds):
    for s in seeds:
        opt.zero_grad()
        _loss(model, s).backward()
        opt.step()


def test_momentum_zero_accepted_like_torch():
    # torch.optim.Muon accepts momentum=0 with its default nesterov=True: the update is msign(G)
    W = torch.zeros(12, 20, requires_grad=True)
    G = torch.randn(12, 20)
    W.grad = G.clone()
    Muon([W], lr=1.0, momentum=0.0, weight_decay=0.0, msign="svd").step()
    np.testing.assert_allclose(-W.detach().double().numpy(), svd_oracle(G), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_gives_identical_steps(dtype):
    model = _model(dtype)
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-3)
    _train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    model2 = _model(dtype)
    model2.load_state_dict(saved["model"])
    opt2 = Muon(muon_param_groups(model2), lr=0.02, adamw_lr=3e-3)
    opt2.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        for key, v in opt.state[p].items():
            assert opt2.state[q][key].dtype == v.dtype, key  # fp32 momentum of bf16 stays fp32
    _train(model, opt, range(3, 6))
    _train(model2, opt2, range(3, 6))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_from_torch_muon_checkpoint():
    params = make_params(SHAPES[:3])
    grads = make_grads(SHAPES[:3], steps=4)
    ref, ref_opt = run(lambda ps: torch.optim.Muon(ps, lr=0.02), params, grads[:2])
    ours = [p.detach().clone().requires_grad_() for p in ref]
    opt = Muon(ours, lr=0.02)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert opt.param_groups[0]["ns_coefficients"] == KELLER and opt.param_groups[0]["batched"]
    for gs in grads[2:]:
        for a, b, g in zip(ref, ours, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, ours, strict=True):
        # two steps, bf16 (torch) vs float32 (ours) iteration: ~1% of each 0.02/√L-sized step
        torch.testing.assert_close(b, a, rtol=0, atol=2 * 0.03 * 0.02 * 2)


def test_param_groups_and_add_param_group():
    a = torch.zeros(8, 8, requires_grad=True)
    b = torch.zeros(8, 8, requires_grad=True)
    opt = Muon([{"params": [a], "lr": 0.1}], lr=0.01, msign="keller")
    opt.add_param_group({"params": [b], "ns_steps": 3})
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["ns_steps"] == 3 and opt.param_groups[1]["msign"] == "keller"
    # same grad, lr 10× apart, same normalised update: the moves differ by exactly 10× (no decay)
    opt.param_groups[0]["weight_decay"] = opt.param_groups[1]["weight_decay"] = 0.0
    opt.param_groups[1]["ns_steps"] = None
    g = torch.randn(8, 8)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    # from zero weights: a = −0.1·O, b = −0.01·O, equal up to one float32 rounding of each
    torch.testing.assert_close(a.detach(), 10 * b.detach(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.randn(3, 3, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="ndim >= 2"):
        opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "use_muon": True})


def test_adamw_groups_match_torch_adamw():
    # 1-D params and use_muon=False groups run torch's AdamW (decoupled decay) exactly.
    shapes = [(16,), (6, 5)]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=4)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    ref, _ = run(lambda ps: torch.optim.AdamW(ps, **kw), params, grads)
    ours, opt = run(
        lambda ps: Muon(
            [{"params": ps, "use_muon": False}],
            lr=3e-3,
            weight_decay=0.05,
            adamw_betas=(0.9, 0.95),
            adamw_eps=1e-8,
        ),
        params,
        grads,
    )
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert set(opt.state[ours[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    # adamw_lr / adamw_weight_decay override the group's lr / decay for AdamW params only
    ours2, _ = run(
        lambda ps: Muon(ps, lr=1.0, weight_decay=0.0, adamw_lr=3e-3, adamw_weight_decay=0.05),
        params[:1],
        [g[:1] for g in grads],
    )
    torch.testing.assert_close(ours2[0], ref[0], rtol=1e-6, atol=1e-7)


def test_tensor_lr_equals_float_lr():
    params = make_params(SHAPES[:3] + [(7,)])
    grads = make_grads(SHAPES[:3] + [(7,)], steps=3)
    a, _ = run(lambda ps: Muon(ps, lr=0.02, adjust_lr_fn="match_rms_adamw"), params, grads)
    b, _ = run(
        lambda ps: Muon(ps, lr=torch.tensor(0.02), adjust_lr_fn="match_rms_adamw"), params, grads
    )
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_grad_none_and_frozen_params_are_skipped():
    a = torch.randn(8, 8, requires_grad=True)
    b = torch.randn(8, 8, requires_grad=True)  # grad stays None
    frozen = torch.randn(8, 8, requires_grad=False)
    b0, f0 = b.detach().clone(), frozen.clone()
    opt = Muon([a, b, frozen], lr=0.1)
    a.grad = torch.randn(8, 8)
    opt.step()
    assert torch.equal(b.detach(), b0) and torch.equal(frozen, f0)
    assert b not in opt.state and frozen not in opt.state and a in opt.state
    opt.step()  # second step with the same grad works too


def test_step_hooks_and_closure():
    w = torch.randn(6, 6, requires_grad=True)
    opt = Muon([w], lr=0.1)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and loss.item() > 0
    h1.remove()
    h2.remove()
    opt.step(closure)
    assert calls == ["pre", "post"]
    opt.zero_grad()
    assert w.grad is None


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 4, requires_grad=True)
    for kwargs, name in [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adjust_lr_fn": "bogus"}, "adjust_lr_fn"),
        ({"msign": "bogus"}, "msign"),
        ({"update": "bogus"}, "update"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"update": "mclip", "ns_coefficients": KELLER}, "ns_coefficients"),
        ({"lr": torch.tensor([0.1, 0.2])}, "lr"),
        ({"matrix_view": "bogus"}, "matrix_view"),
        ({"adamw_betas": (1.0, 0.9)}, "adamw_betas"),
    ]:
        with pytest.raises(ValueError, match=name):
            Muon([w], **kwargs)
    c = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    opt = Muon([c])
    c.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_muon_param_groups_routing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.conv = nn.Conv1d(8, 8, 3)
            self.block = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.embed.weight  # tied
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

    net = Net()
    groups = muon_param_groups(net)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert [g["use_muon"] for g in groups] == [True, True, False]
    assert ids[0] == {id(net.block.weight)}
    assert ids[1] == {id(net.conv.weight)} and groups[1]["matrix_view"] == "flatten"
    assert id(net.embed.weight) in ids[2] and id(net.block.bias) in ids[2]
    assert id(net.norm.weight) in ids[2]
    assert id(net.frozen.weight) not in set().union(*ids)
    # and the last Linear is the head for a plain MLP
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = muon_param_groups(mlp, adamw_options={"lr": 1e-3})
    assert [id(p) for p in g[0]["params"]] == [id(mlp[0].weight)]
    assert g[1]["lr"] == 1e-3 and id(mlp[2].weight) in {id(p) for p in g[1]["params"]}
    Muon(groups).step()  # no grads yet: a no-op


def test_model_parameters_drop_in():
    # Muon(model.parameters()) routes ≥2-D params to Muon and the rest to AdamW.
    model = _model()
    opt = Muon(model.parameters(), lr=0.02)
    _train(model, opt, range(2))
    assert set(opt.state[model[2].weight]) == {"momentum_buffer"}
    assert set(opt.state[model[2].bias]) == {"step", "exp_avg", "exp_avg_sq"}


def test_deepcopy_optimizer():
    model = _model()
    opt = Muon(muon_param_groups(model), lr=0.02)
    _train(model, opt, range(2))
    opt2 = copy.deepcopy(opt)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------


def test_compiled_step_equals_eager():
    torch._dynamo.reset()
    shapes = [(16, 8), (8, 16), (16, 8), (12,)]
    params = make_params(shapes)
    grads = make_grads(shapes, steps=3)

    def run_with(compile_step):
        ps = [p.clone().requires_grad_() for p in params]
        opt = Muon(ps, lr=0.05, adjust_lr_fn="match_rms_adamw")

        def step():
            opt.step()

        fn = torch.compile(step, backend="inductor") if compile_step else step
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            fn()
        return ps

    eager = run_with(False)
    compiled = run_with(True)
    for x, y in zip(compiled, eager, strict=True):
        # inductor may fuse/reorder the float32 elementwise work: rounding-level differences
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_stack_casts_to_a_half_iteration_dtype_in_one_pass():
    parts = [torch.randn(2, 3, 5), torch.randn(1, 5, 3).mT]
    ref = torch.cat(parts)
    half = {"ns_dtype": torch.bfloat16, "update": "msign"}
    out = _stack(parts, half)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    # mclip normalises in float32 and the default CPU iteration is float32: no cast
    assert _stack(parts, {**half, "update": "mclip"}).dtype == torch.float32
    assert torch.equal(_stack(parts, {"update": "msign"}), ref)
    assert _stack(parts[:1], {"update": "msign"}) is parts[0]
