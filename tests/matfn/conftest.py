"""Fixtures that replace the frozen kernel configs of :mod:`matfn._backend` for one test."""

from __future__ import annotations

import dataclasses

import pytest

from matfn import _backend


@pytest.fixture
def ns_config(monkeypatch):
    """``ns_config(**changes)``: run the test under ``replace(NEWTON_SCHULZ, **changes)``."""

    def patch(**changes):
        new = dataclasses.replace(_backend.NEWTON_SCHULZ, **changes)
        monkeypatch.setattr(_backend, "NEWTON_SCHULZ", new)

    return patch


@pytest.fixture
def matmul_config(monkeypatch):
    """``matmul_config(**changes)``: run the test under ``replace(MATMUL, **changes)``."""

    def patch(**changes):
        monkeypatch.setattr(_backend, "MATMUL", dataclasses.replace(_backend.MATMUL, **changes))

    return patch
