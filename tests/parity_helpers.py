"""Shared by the parity tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the module on one thread: two OpenMP threads on a loaded two-core machine spin,
    and the tiny ops of these tests then run ~20x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
