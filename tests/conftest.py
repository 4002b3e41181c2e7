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


def need_tool(found, what: str):
    """Skip, saying why, where a build tool the test needs is missing (a newcomer's first
    ``make test``); fail instead where BNFOLD_REQUIRE_TOOLCHAIN is set, as CI sets it, so that the
    kernels are never left unchecked there."""
    if found:
        return
    import os
    message = f"{what} is needed for this test and is not installed"
    if os.environ.get("BNFOLD_REQUIRE_TOOLCHAIN"):
        pytest.fail(message)
    pytest.skip(message + " (BNFOLD_REQUIRE_TOOLCHAIN=1 makes this a failure)")


def build_host(directory, defines=()):
    """The kernels' per-element code compiled for the CPU (tests/host/bnfold_host.cpp), via ctypes;
    ``defines`` are ``-D`` options (``BNFOLD_UNROLL=16``)."""
    import ctypes
    import shutil
    import subprocess
    cxx = shutil.which("g++") or shutil.which("c++")
    need_tool(cxx, "a C++ compiler (g++ or c++), to test the kernels' code on the host,")
    lib = Path(directory) / "libbnfold_host.so"
    src = Path(__file__).parent / "host" / "bnfold_host.cpp"
    r = subprocess.run([cxx, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(lib), str(src)]
                       + ["-D" + d for d in defines], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    h = ctypes.CDLL(str(lib))
    i64, p = ctypes.c_longlong, ctypes.c_void_p
    h.bnfold_host_channel64.restype = i64
    h.bnfold_host_channel64.argtypes = [i64] * 4
    h.bnfold_host_channel32.restype = ctypes.c_int
    h.bnfold_host_channel32.argtypes = [ctypes.c_int] * 4
    h.bnfold_host_fastdiv.restype = ctypes.c_uint
    h.bnfold_host_fastdiv.argtypes = [ctypes.c_uint, ctypes.c_ulonglong]
    h.bnfold_host_half_to_float.argtypes = [p, p, i64]
    h.bnfold_host_float_to_half.argtypes = [p, p, i64]
    h.bnfold_host_channels.argtypes = [p, ctypes.c_int, i64, p, p, p, p, p, p]
    h.bnfold_host_biases.argtypes = [p, ctypes.c_int, i64, p, p, p, p]
    h.bnfold_host_copy.argtypes = [p, ctypes.c_int, i64]
    h.bnfold_host_weight_check.argtypes = [p, ctypes.c_int, i64, p, p, p]
    h.bnfold_host_input_biases.argtypes = [p, ctypes.c_int, i64, p, p]
    h.bnfold_host_weights.argtypes = [p, ctypes.c_int, i64, p, p]
    return h


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return build_host(tmp_path_factory.mktemp("host"))
