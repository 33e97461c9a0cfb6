"""Test-suite set-up (tests and doctests): Triton CPU interpreter, hypothesis profiles."""

import os

# Must happen before any Triton kernel module is imported: the kernel modules read it then.
if not os.environ.get("MATFN_TEST_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from matfn import _graphs  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: Shared fixtures (``fake_cuda``) for every test module.
pytest_plugins = ["tests.fakes"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_cached_cuda_graphs():
    """Drop the CUDA graphs a test captured (msign and tri_* replay by default).

    A later test that patches a kernel choice must not replay a graph captured before it.
    """
    yield
    _graphs.clear()
