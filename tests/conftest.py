"""Test-wide settings: one intra-op thread (the suite's tensors are tiny, where extra threads
only add synchronisation), and hypothesis derandomised under CI for reproducible runs."""

import os

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
