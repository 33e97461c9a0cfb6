"""Stand-ins for CUDA calls (CPU tests of code that captures CUDA graphs), and a call spy."""

from __future__ import annotations

import contextlib

import pytest
import torch


class FakeCuda:
    """The CUDA stream and graph calls a capture makes, doing nothing (the calls run eagerly)."""

    class Stream:
        stream_id = 0

        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            """Nothing: the static output keeps the value of the capture run."""

    @staticmethod
    def current_stream(device=None):
        return FakeCuda.Stream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def graph(graph, **kwargs):
        return contextlib.nullcontext()


@pytest.fixture
def fake_cuda(monkeypatch):
    """Replace ``torch.cuda``'s stream and graph calls by :class:`FakeCuda`'s for one test."""
    for name in ("Stream", "CUDAGraph", "current_stream", "stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(FakeCuda, name))


def spy_on(monkeypatch, module, name: str, calls: list) -> None:
    """Replace ``module.name`` by a wrapper that appends ``name`` to ``calls``, then calls it."""
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
