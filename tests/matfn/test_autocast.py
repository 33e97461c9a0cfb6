"""Public functions under an enclosing ``torch.autocast``.

Every public matrix function turns autocast off inside (:mod:`matfn._autocast`), so under
``torch.autocast("cpu", bfloat16)`` (and "cuda" where available) it gives bitwise the result
of the call without autocast: same dtypes, same products, no false convergence errors.
"""

from __future__ import annotations

import pytest
import torch

import matfn
from matfn._autocast import autocast_disabled
from tests.strategies import MatrixCase, SignCase

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(device: str) -> dict[str, torch.Tensor]:
    M = MatrixCase((24, 16), dtype=torch.float32, cond=10.0, seed=3).tensor(device)
    A = SignCase(n=12, kind="eig", gap=0.3, q_cond=2.0, seed=1).tensor().float().to(device)
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(12, 12, generator=gen)
    P = (torch.eye(12) * 2 + 0.05 * (R + R.mT)).to(device)  # symmetric, eigenvalues near 2
    Q, K = (torch.randn(2, 32, 8, generator=gen).to(device) * 0.1 for _ in range(2))
    V = torch.randn(2, 32, 4, generator=gen).to(device)
    return {"M": M, "A": A, "P": P, "Q": Q, "K": K, "V": V}


CALLS = {
    "msign": lambda x: matfn.msign(x["M"]),
    "msign_auto": lambda x: matfn.msign(x["M"], steps="auto"),
    "mclip": lambda x: matfn.mclip(x["M"], max_sv=0.5),
    "msign_jvp": lambda x: matfn.msign_jvp(x["M"], x["M"].flip(0)),
    "msign_vjp": lambda x: matfn.msign_vjp(x["M"], x["M"].flip(0)),
    "mcsgn": lambda x: matfn.mcsgn(x["A"]),
    "solve_sylvester": lambda x: matfn.solve_sylvester(x["P"], x["P"].mT, x["A"]),
    "tri_inv": lambda x: matfn.tri_inv(x["Q"], x["K"]),
    "tri_solve": lambda x: matfn.tri_solve(x["Q"], x["K"], x["V"]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_public_functions_ignore_an_enclosing_autocast(name, device, dtype):
    x = _inputs(device)
    ref = CALLS[name](x)
    with torch.autocast(device, dtype=dtype):
        out = CALLS[name](x)
    assert out.dtype == ref.dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_msign_backward_ignores_an_enclosing_autocast(device):
    M = MatrixCase((10, 7), dtype=torch.float32, cond=5.0, seed=2).tensor(device)
    G = torch.randn(10, 7, generator=torch.Generator().manual_seed(1)).to(device)
    ref_in = M.clone().requires_grad_()
    (matfn.msign(ref_in) * G).sum().backward()
    with torch.autocast(device, dtype=torch.bfloat16):
        X = M.clone().requires_grad_()
        (matfn.msign(X) * G).sum().backward()
    assert X.grad.dtype == torch.float32
    assert torch.equal(X.grad, ref_in.grad)


def test_autocast_disabled_restores_the_state():
    assert not torch.is_autocast_enabled("cpu")
    with autocast_disabled():
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_disabled():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_wrapped_functions_keep_their_signature_and_doc():
    import inspect

    assert "M" in inspect.signature(matfn.msign).parameters
    assert matfn.msign.__doc__ and matfn.msign.__name__ == "msign"
