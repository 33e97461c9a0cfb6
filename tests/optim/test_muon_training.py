"""A real training check: a small MLP on scikit-learn's digits, Muon against AdamW.

Both optimizers get a small learning-rate grid around their usual defaults (AdamW 3e-3…3e-2,
Muon 0.02…0.1 with Keller's shape factor) and we compare the best step count of each to reach a
full-data cross-entropy of 0.05 from the same initialisation and minibatch stream. Measured on
CPU (seeds 0/1/2): Muon 50/50/60 steps, AdamW 85/65/105. Runs in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim import Muon, muon_param_groups

datasets = pytest.importorskip("sklearn.datasets")

TARGET = 0.05
MAX_STEPS = 300


@pytest.fixture
def one_thread():
    # tiny matmuls: one thread is fastest and avoids oversubscription under pytest -n 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data():
    X, y = datasets.load_digits(return_X_y=True)  # ships with scikit-learn, no download
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def steps_to_target(make_opt, X, y, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, MAX_STEPS + 1):
        idx = torch.randint(0, len(X), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            with torch.no_grad():
                if nn.functional.cross_entropy(model(X), y).item() < TARGET:
                    return step
    return MAX_STEPS + 1


def test_muon_trains_faster_than_adamw_on_digits(one_thread):
    X, y = _data()
    adamw = {
        lr: steps_to_target(
            lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), X, y
        )
        for lr in (3e-3, 1e-2, 3e-2)
    }
    muon = {
        lr: steps_to_target(
            lambda m, lr=lr: Muon(muon_param_groups(m), lr=lr, weight_decay=0.0, adamw_lr=1e-2),
            X,
            y,
        )
        for lr in (0.02, 0.05, 0.1)
    }
    best_adamw, best_muon = min(adamw.values()), min(muon.values())
    assert best_muon <= MAX_STEPS, muon  # Muon trains at all
    # a clear margin, not a tie: measured 50 vs 85 steps for this seed
    assert best_muon < 0.85 * best_adamw, (muon, adamw)
    # and Muon at its usual default lr (0.02) already matches AdamW's best
    assert muon[0.02] <= best_adamw, (muon, adamw)
