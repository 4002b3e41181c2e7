import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and CuPy")


@pytest.fixture
def rng():
    return np.random.RandomState(1234)


@pytest.fixture(autouse=True)
def clean_parameters():
    """Each test starts with an empty parameter registry (tests that need nnabla only)."""
    nn = sys.modules.get("nnabla")
    if nn is not None:
        nn.clear_parameters()
    yield
    if nn is not None:
        nn.clear_parameters()
