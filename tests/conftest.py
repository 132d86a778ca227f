"""Test-wide settings: one intra-op thread (the suite's tensors are tiny, where extra threads
only add synchronisation), and hypothesis derandomised under CI for reproducible runs; the
``float64`` fixture for tests compared against brute-force oracles."""

import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def float64():
    """Make float64 torch's default dtype for the test, and restore the previous one after it.

    A module opts in for all its tests with ``pytestmark = pytest.mark.usefixtures("float64")``.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
