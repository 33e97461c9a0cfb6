"""optim.Muon as a drop-in: LR schedulers on every group, per-step coefficient tables, the
``betas`` alias, the embedding-shape warning, torch.optim.Muon checkpoints both ways, and
zero-size parameters."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR

from optim import Muon, distributed_muon, muon_param_groups
from optim.muon import looks_like_embedding, muon, orthogonalize

KELLER = (3.4445, -4.7750, 2.0315)
# a 4-step table of distinct quintics (Polar-Express-like: aggressive first, polishing last)
TABLE = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


class _LM(nn.Module):
    """Embedding, two hidden matrices, a norm and a head: muon_param_groups' usual split."""

    def __init__(self, vocab: int = 12, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return self.lm_head(self.norm(h))


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (4, 5), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()


# ------------------------------------------------------------------------------------------
# 1. LR schedulers scale every group, AdamW's included
# ------------------------------------------------------------------------------------------


def test_readme_recipe_with_zero_lambda_freezes_every_parameter():
    torch.manual_seed(0)
    model = _LM()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-4)
    adamw = next(g for g in opt.param_groups if g["use_muon"] is False)
    assert adamw["lr"] == 3e-4 and adamw["adamw_lr"] is None
    sched = LambdaLR(opt, lambda s: 0.0)
    assert adamw["initial_lr"] == 3e-4 and all(g["lr"] == 0.0 for g in opt.param_groups)
    before = copy.deepcopy(model.state_dict())
    for s in range(2):
        _lm_step(model, opt, s)
        sched.step()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name  # embedding, head, norm, biases included


def _split(seed=0):
    mats = _tensors([(8, 6), (6, 8)], seed)
    vecs = _tensors([(6,), (8,), (5, 4)], seed + 1)  # a matrix on AdamW too (like a head)
    return mats, vecs


def _grads(step):
    return _tensors([(8, 6), (6, 8)], 100 + step), _tensors([(6,), (8,), (5, 4)], 200 + step)


SCHEDULES = {
    "lambda": lambda opt, lrs: LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "step": lambda opt, lrs: StepLR(opt, step_size=2, gamma=0.3),
    "onecycle": lambda opt, lrs: OneCycleLR(
        opt, max_lr=lrs, total_steps=6, cycle_momentum=False, pct_start=0.5
    ),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_adamw_group_follows_a_scheduler_exactly_like_torch_adamw(kind):
    """The AdamW group's lrs and parameters equal torch.optim.AdamW's under the same scheduler."""
    mats, vecs = _split()
    m_ours, v_ours, v_ref = _leaves(mats), _leaves(vecs), _leaves(vecs)
    opt = Muon(
        [{"params": m_ours, "use_muon": True}, {"params": v_ours, "use_muon": False}],
        lr=0.02,
        weight_decay=0.01,
        adamw_lr=3e-3,
    )
    ref = torch.optim.AdamW(v_ref, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    sched = SCHEDULES[kind](opt, [0.02, 3e-3])
    sched_ref = SCHEDULES[kind](ref, [3e-3])
    lrs, lrs_ref = [], []
    for step in range(6):
        gm, gv = _grads(step)
        for p, g in zip(m_ours, gm, strict=True):
            p.grad = g
        for p, q, g in zip(v_ours, v_ref, gv, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        lrs.append([g["lr"] for g in opt.param_groups])
        lrs_ref.append(ref.param_groups[0]["lr"])
        sched.step()
        sched_ref.step()
    assert [lr[1] for lr in lrs] == lrs_ref
    assert len({lr[0] for lr in lrs}) > 1  # the Muon group is scheduled too
    for p, q in zip(v_ours, v_ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_step_lr_scales_a_mixed_group_adamw_lr_by_ratio():
    """A group routed by ndim: AdamW's lr is adamw_lr · lr / (lr when the group was added)."""
    w, b = torch.zeros(8, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    b_ref = torch.zeros(8, requires_grad=True)
    opt = Muon([w, b], lr=0.02, weight_decay=0.0, adamw_lr=3e-3)
    assert opt.param_groups[0]["adamw_lr_ref"] == 0.02
    ref = torch.optim.AdamW([b_ref], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched, sched_ref = StepLR(opt, 1, gamma=0.5), StepLR(ref, 1, gamma=0.5)
    for step in range(3):
        g = torch.randn(8, generator=torch.Generator().manual_seed(step))
        w.grad, b.grad, b_ref.grad = torch.eye(8), g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        sched_ref.step()
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7)
    LambdaLR(opt, lambda s: 0.0)
    b0 = b.detach().clone()
    w.grad, b.grad = torch.eye(8), torch.ones(8)
    opt.step()
    assert torch.equal(b.detach(), b0)


def test_one_cycle_with_momentum_cycling_runs_on_both_group_kinds():
    """cycle_momentum=True (OneCycleLR's default) cycles Muon's μ; AdamW's betas stay."""
    mats, vecs = _split()
    m, v = _leaves(mats), _leaves(vecs)
    opt = Muon(
        [{"params": m, "use_muon": True}, {"params": v, "use_muon": False}],
        lr=0.02,
        adamw_lr=3e-3,
    )
    sched = OneCycleLR(opt, max_lr=[0.02, 3e-3], total_steps=6, pct_start=0.5)
    momenta, lrs = [], []
    for step in range(6):
        gm, gv = _grads(step)
        for p, g in zip(m + v, gm + gv, strict=True):
            p.grad = g
        opt.step()
        momenta.append(opt.param_groups[0]["momentum"])
        lrs.append(opt.param_groups[1]["lr"])
        sched.step()
    assert min(momenta) < 0.95 and all(0.85 <= mu <= 0.95 for mu in momenta)
    assert all(g["adamw_betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert max(lrs) == pytest.approx(3e-3) and min(lrs) < 3e-3 / 10
    assert all(torch.isfinite(p).all() for p in m + v)


def test_which_lr_a_use_muon_false_group_gets():
    x = [torch.zeros(4, requires_grad=True) for _ in range(4)]
    opt = Muon(
        [
            {"params": [x[0]], "use_muon": False},  # constructor's adamw_lr
            {"params": [x[1]], "use_muon": False, "lr": 1e-2},  # its own lr
            {"params": [x[2]], "use_muon": False, "adamw_lr": 5e-3},  # its own adamw_lr
        ],
        lr=0.02,
        adamw_lr=3e-4,
    )
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 1e-2, 5e-3]
    assert all(g["adamw_lr"] is None for g in opt.param_groups)
    no_adamw_lr = Muon([{"params": [x[3]], "use_muon": False}], lr=0.02)
    assert no_adamw_lr.param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match="not both"):
        opt.add_param_group({"params": [x[3]], "use_muon": False, "lr": 1e-3, "adamw_lr": 2e-3})
    with pytest.raises(ValueError, match="lr > 0"):
        Muon([torch.zeros(4, 4, requires_grad=True)], lr=0.0, adamw_lr=1e-3)


def test_checkpoint_with_a_constant_adamw_lr_keeps_it():
    """A checkpoint group with adamw_lr set and no adamw_lr_ref runs AdamW at that constant
    lr, whatever the group's lr says (it resumes as it was trained)."""
    vecs = _tensors([(6,)], 0)
    a, b = _leaves(vecs), _leaves(vecs)
    opt = Muon([{"params": a, "use_muon": False}], lr=0.02)
    state = opt.state_dict()
    group = state["param_groups"][0]
    group["adamw_lr"] = 3e-3
    del group["adamw_lr_ref"]
    opt.load_state_dict(state)
    assert opt.param_groups[0]["adamw_lr_ref"] is None
    ref = torch.optim.AdamW(b, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(2):
        g = _tensors([(6,)], 10 + step)[0]
        a[0].grad, b[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# 2. Per-step coefficient tables
# ------------------------------------------------------------------------------------------


def _newton_schulz_oracle(G: torch.Tensor, table) -> torch.Tensor:
    """torch.optim.Muon's iteration in float64, one row of ``table`` per step."""
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / X.norm().clamp_min(1e-7)
    for a, b, c in table:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


@pytest.mark.parametrize("batched", [True, False])
def test_table_runs_one_row_per_step_from_the_frobenius_normalisation(batched):
    shapes = [(12, 20), (20, 12), (12, 20)]
    W0, G = _tensors(shapes, 0), _tensors(shapes, 1)
    params = [w.double().requires_grad_() for w in W0]
    opt = Muon(
        params,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        ns_coefficients=[list(row) for row in TABLE],
        ns_dtype=torch.float64,
        batched=batched,
    )
    for p, g in zip(params, G, strict=True):
        p.grad = g.double()
    opt.step()
    for p, w, g in zip(params, W0, G, strict=True):
        scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        expected = w.double() - 0.1 * scale * _newton_schulz_oracle(g, TABLE)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_table_of_one_triple_repeated_equals_the_triple_bitwise():
    shapes = [(16, 8), (8, 16), (12, 12)]
    W, G = _tensors(shapes, 0), _tensors(shapes, 1)
    out = []
    for coefficients, steps in [(KELLER, None), ([KELLER] * 5, None), ([KELLER] * 5, 5)]:
        ps = _leaves(W)
        opt = Muon(ps, lr=0.02, ns_coefficients=coefficients, ns_steps=steps)
        for _ in range(2):
            for p, g in zip(ps, G, strict=True):
                p.grad = g.clone()
            opt.step()
        out.append(ps)
    for ps in out[1:]:
        for p, q in zip(ps, out[0], strict=True):
            assert torch.equal(p, q)


def test_group_keys_are_resolved_and_torch_compatible():
    w = torch.zeros(4, 4, requires_grad=True)
    g = Muon([w], ns_coefficients=[3.4445, -4.775, 2.0315]).param_groups[0]
    assert g["ns_coefficients"] == KELLER and g["ns_steps"] == 5
    g = Muon([w], ns_coefficients=KELLER, ns_steps=3).param_groups[0]
    assert g["ns_steps"] == 3
    g = Muon([w], ns_coefficients=[list(r) for r in TABLE]).param_groups[0]
    assert g["ns_coefficients"] == TABLE and g["ns_steps"] == 4
    g = Muon([w]).param_groups[0]  # Polar Express: the method's schedule
    assert g["ns_coefficients"] is None and g["ns_steps"] is None
    # a group may bring its own table, with the constructor's triple as the default
    opt = Muon([w], ns_coefficients=KELLER)
    opt.add_param_group(
        {"params": [torch.zeros(3, 3, requires_grad=True)], "ns_coefficients": TABLE}
    )
    assert opt.param_groups[1]["ns_steps"] == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ns_coefficients": TABLE, "ns_steps": 5}, "does not match the 4-step"),
        ({"ns_coefficients": []}, "non-empty table"),
        ({"ns_coefficients": [(1.0, 2.0, 3.0), (1.0, 2.0)]}, "one triple per step"),
        ({"ns_coefficients": "keller"}, "ns_coefficients"),
        ({"ns_coefficients": (1.0, float("nan"), 0.0)}, "finite"),
        ({"ns_coefficients": [KELLER] * 100}, "< 100 rows"),
        ({"ns_steps": 100}, "< 100"),
        ({"ns_coefficients": KELLER, "ns_steps": 100}, "< 100"),
        ({"ns_coefficients": TABLE, "update": "mclip"}, "ns_coefficients"),
    ],
)
def test_bad_tables_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon([torch.zeros(4, 4, requires_grad=True)], **kwargs)


def test_table_is_saved_and_resumes_bit_identically():
    torch.manual_seed(0)
    model = _LM()
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, ns_coefficients=TABLE)
    for s in range(3):
        _lm_step(model, opt, s)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert saved["opt"]["param_groups"][0]["ns_coefficients"] == TABLE
    model2 = _LM()
    model2.load_state_dict(saved["model"])
    opt2 = Muon(muon_param_groups(model2), lr=0.02, adamw_lr=3e-3)  # default schedule ...
    opt2.load_state_dict(saved["opt"])  # ... replaced by the saved table
    assert opt2.param_groups[0]["ns_coefficients"] == TABLE
    for s in range(3, 6):
        _lm_step(model, opt, s)
        _lm_step(model2, opt2, s)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_functional_orthogonalize_accepts_a_table():
    X = _tensors([(3, 6, 10)], 0)[0].double()
    group = {"ns_coefficients": TABLE, "ns_steps": None, "eps": 1e-7, "ns_dtype": torch.float64}
    O = orthogonalize(X, group)
    for b in range(3):
        torch.testing.assert_close(O[b], _newton_schulz_oracle(X[b], TABLE), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 3. Drop-in: betas, the embedding warning, torch.optim.Muon checkpoints both ways
# ------------------------------------------------------------------------------------------


def test_betas_is_an_alias_of_adamw_betas():
    vecs = _tensors([(6,), (5,)], 0)
    a, b = _leaves(vecs), _leaves(vecs)
    opt = Muon(a, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.01)
    assert opt.param_groups[0]["adamw_betas"] == (0.8, 0.99)
    ref = torch.optim.AdamW(b, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.01)
    for step in range(3):
        for p, q, g in zip(a, b, _tensors([(6,), (5,)], 10 + step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the same value twice is fine; two different values say what to use
    Muon(a, betas=(0.9, 0.9), adamw_betas=(0.9, 0.9))
    with pytest.raises(ValueError, match="alias of `adamw_betas`"):
        Muon(a, betas=(0.9, 0.999), adamw_betas=(0.9, 0.95))
    # in a param group (e.g. groups written for AdamW) too, stored as adamw_betas
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": (0.5, 0.6)})
    assert opt.param_groups[1]["adamw_betas"] == (0.5, 0.6) and "betas" not in opt.param_groups[1]
    with pytest.raises(ValueError, match="alias"):
        opt.add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "betas": (0.5, 0.6),
             "adamw_betas": (0.9, 0.95)}
        )  # fmt: skip


def test_looks_like_embedding_rule():
    meta = torch.device("meta")
    assert looks_like_embedding(torch.empty(50257, 768, device=meta))  # GPT-2 wte / lm_head
    assert looks_like_embedding(torch.empty(768, 50257, device=meta))  # transposed
    assert looks_like_embedding(torch.empty(32000, 4096, device=meta))  # Llama-2-7B: 7.8×
    assert not looks_like_embedding(torch.empty(8192, 2048, device=meta))  # MLP 4× expansion
    assert not looks_like_embedding(torch.empty(2048, 8192, device=meta))
    assert not looks_like_embedding(torch.empty(4000, 100, device=meta))  # < 8192 rows
    assert not looks_like_embedding(torch.empty(8192, 8192, device=meta))
    assert not looks_like_embedding(torch.empty(50257, device=meta))
    assert not looks_like_embedding(torch.empty(4, 50257, 768, device=meta))


def test_warns_when_model_parameters_route_an_embedding_to_muon():
    meta = torch.device("meta")
    model = nn.Sequential(
        nn.Embedding(8192, 64, device=meta),
        nn.Linear(64, 256, device=meta),
        nn.Linear(256, 64, device=meta),
        nn.Linear(64, 8192, device=meta),
    )
    with pytest.warns(UserWarning, match=r"\(8192, 64\), \(8192, 64\).*muon_param_groups") as w:
        opt = Muon(model.parameters())
    assert w[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match="embedding") as w:  # add_param_group, after construction
        opt.add_param_group({"params": [torch.empty(10000, 16, device=meta, requires_grad=True)]})
    assert w[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon(muon_param_groups(model))
        Muon([{"params": [model[0].weight], "use_muon": True}])  # explicit: no warning
        Muon(list(model[1:3].parameters()))


def test_state_dict_loads_into_torch_muon_and_back():
    """optim.Muon → torch.optim.Muon → optim.Muon with Keller's coefficients, 2-D params."""
    shapes = [(16, 8), (8, 16), (12, 12)]
    W, grads = _tensors(shapes, 0), [_tensors(shapes, 10 + s) for s in range(6)]

    def feed(ps, step):
        for p, g in zip(ps, grads[step], strict=True):
            p.grad = g.clone()

    ours = _leaves(W)
    opt = Muon(ours, lr=0.02, ns_coefficients=KELLER)
    for s in range(2):
        feed(ours, s)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    theirs = [p.detach().clone().requires_grad_() for p in ours]
    topt = torch.optim.Muon(theirs, lr=0.02)
    topt.load_state_dict(torch.load(buffer))
    assert topt.param_groups[0]["ns_steps"] == 5
    for s in range(2, 4):
        feed(ours, s)
        feed(theirs, s)
        opt.step()
        topt.step()
    for a, b in zip(ours, theirs, strict=True):
        # two steps, bf16 (torch) vs float32 (ours) iteration: ~1 % of each 0.02/√L-sized step
        torch.testing.assert_close(a, b, rtol=0, atol=2 * 0.03 * 0.02 * 2)

    back = [p.detach().clone().requires_grad_() for p in theirs]
    opt2 = Muon(back, lr=0.02)
    opt2.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert opt2.param_groups[0]["ns_coefficients"] == KELLER
    feed(theirs, 4)
    feed(back, 4)
    topt.step()
    opt2.step()
    for a, b in zip(back, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * 0.02 * 2)
    # and our state dict of torch's checkpoint loads into torch again
    torch.optim.Muon(_leaves(W), lr=0.02).load_state_dict(opt2.state_dict())


# ------------------------------------------------------------------------------------------
# 4. Zero-size parameters
# ------------------------------------------------------------------------------------------

EMPTY = [(0, 4), (4, 0), (0, 0), (2, 0, 3), (3, 0, 2, 2)]
FULL = [(6, 4), (4, 6), (6, 4)]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("coefficients", [None, KELLER, TABLE])
def test_zero_size_parameters_are_skipped(batched, coefficients):
    W, G = _tensors(FULL, 0), _tensors(FULL, 1)
    full = _leaves(W)
    empty = [torch.zeros(s, requires_grad=True) for s in EMPTY]
    bias = torch.zeros(0, requires_grad=True)
    opt = Muon(full[:1] + empty + full[1:] + [bias], batched=batched, ns_coefficients=coefficients)
    alone = _leaves(W)
    ref = Muon(alone, batched=batched, ns_coefficients=coefficients)
    for _ in range(2):
        for p, q, g in zip(full, alone, G, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        for e in empty + [bias]:
            e.grad = torch.zeros_like(e)
        opt.step()
        ref.step()
    for p, q in zip(full, alone, strict=True):
        assert torch.equal(p, q)


def test_functional_forms_skip_zero_size_parameters():
    W, G = _tensors([(5, 3)], 0), _tensors([(5, 3)], 1)
    for fn in (muon, distributed_muon):
        params = [torch.zeros(5, 0), W[0].clone(), torch.zeros(0, 3)]
        grads = [torch.zeros(5, 0), G[0].clone(), torch.zeros(0, 3)]
        bufs = [torch.zeros_like(p) for p in params]
        kwargs = dict(lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=True, adjust_lr_fn=None)
        if fn is distributed_muon:
            kwargs["group"] = {"msign": "polar_express", "eps": 1e-7}
        fn(params, grads, bufs, **kwargs)
        assert not torch.equal(params[1], W[0]) and torch.isfinite(params[1]).all()


def test_torch_checkpoint_saved_mid_warmup_loads_with_adamw_lr():
    """A torch.optim.Muon group saved at lr 0 (warm-up) takes its ratio from initial_lr."""
    ps = _leaves(_tensors([(6, 4)], 0))
    topt = torch.optim.Muon(ps, lr=0.02)
    LambdaLR(topt, lambda s: 0.0)
    opt = Muon(_leaves(_tensors([(6, 4)], 0)), lr=0.02, adamw_lr=1e-3)
    opt.load_state_dict(topt.state_dict())
    group = opt.param_groups[0]
    assert group["lr"] == 0.0 and group["adamw_lr_ref"] == 0.02 and group["ns_steps"] == 5
    with pytest.raises(ValueError, match="lr > 0"):  # a new group has no schedule to follow
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": 0.0})
    assert len(opt.param_groups) == 1  # the rejected group is not kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path and CUDA graphs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coefficients", [None, KELLER, TABLE[1:] + ((1.875, -1.25, 0.375),)])
def test_cuda_fused_and_graphed_steps_with_tables_and_zero_size(dtype, coefficients):
    """On CUDA the fused step (and its CUDA-graph replay) runs tables and skips empty params."""
    shapes = [(256, 128), (128, 256), (0, 64), (64, 0), (256, 128), (3, 64, 32), (2, 0, 8)]
    W = [t.cuda().to(dtype) for t in _tensors(shapes, 0)]
    G = [[t.cuda().to(dtype) for t in _tensors(shapes, 10 + s)] for s in range(4)]
    outs = {}
    for name, kw in [
        ("fused", {}),
        ("graphs", {"cuda_graphs": True}),
        ("single", {"batched": False}),
    ]:
        ps = [w.clone().requires_grad_() for w in W]
        opt = Muon(ps, lr=0.02, ns_coefficients=coefficients, **kw)
        for gs in G:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        outs[name] = ps
    for name in ("graphs", "single"):
        for a, b in zip(outs[name], outs["fused"], strict=True):
            assert torch.isfinite(a).all()
            # a step moves an entry by ≤ ~0.008 (lr·√2·max|O|); the paths differ by bf16
            # rounding of the iteration (~1 % of that). bf16 params: the fused pass applies
            # decay and update in float32 and rounds once, the torch paths round after each
            # (two roundings a step), so after 4 steps they may be up to 8 bf16 ulps apart
            # (2⁻⁴ relative; measured on an H100: 2⁻⁵)
            rtol = 2**-4 if dtype == torch.bfloat16 else 0.0
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=2e-3)
