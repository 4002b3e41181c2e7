"""Backend selection, and the GPU backend's checks that run without a GPU."""
import numpy as np
import pytest

from bnfold_gpu._synthetic import make_arrays, random_plan
from bnfold_gpu.backends import FoldError, cupy_backend, get_backend, numpy_backend


def test_auto_falls_back_to_numpy_without_a_device(monkeypatch):
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: "no CUDA device found")
    assert get_backend("auto") is numpy_backend
    assert get_backend("numpy") is numpy_backend


def test_cupy_without_a_device_says_why(monkeypatch):
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: "no CUDA device found")
    with pytest.raises(RuntimeError, match="backend 'cupy' is not usable: no CUDA device found"):
        get_backend("cupy")


def test_cupy_not_installed_says_how(monkeypatch):
    monkeypatch.setattr(cupy_backend, "cupy", None)
    reason = cupy_backend.unavailable_reason()
    assert "CuPy is not installed" in reason and "bnfold_gpu[cuda]" in reason


def _device_without_nvrtc(monkeypatch, cupy_finds_one: bool):
    """A device answers; NVRTC is neither in the wheel nor on the loader's path; CuPy's own
    loader finds one or not."""
    import types
    from bnfold_gpu import _nvrtc

    def get_version():
        if not cupy_finds_one:
            raise RuntimeError("libnvrtc.so.12: cannot open shared object file")
        return (12, 9)
    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                 nvrtc=types.SimpleNamespace(getVersion=get_version))
    monkeypatch.setattr(cupy_backend, "cupy", types.SimpleNamespace(cuda=cuda))

    def load():
        raise OSError("libnvrtc.so.12: cannot open shared object file")
    monkeypatch.setattr(_nvrtc, "load", load)


def test_auto_falls_back_to_numpy_without_nvrtc(monkeypatch):
    # a device but no compiler for the kernels: 'auto' folds with NumPy, 'cupy' says what is missing
    _device_without_nvrtc(monkeypatch, cupy_finds_one=False)
    assert get_backend("auto") is numpy_backend
    with pytest.raises(RuntimeError, match=r"not usable: NVRTC.*not found.*bnfold_gpu\[cuda\]"):
        get_backend("cupy")


def test_nvrtc_found_by_cupy_itself_is_enough(monkeypatch):
    _device_without_nvrtc(monkeypatch, cupy_finds_one=True)
    assert cupy_backend.unavailable_reason() is None
    assert get_backend("auto") is cupy_backend


def test_auto_picks_cupy_when_a_device_answers(monkeypatch):
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: None)
    assert get_backend("auto") is cupy_backend


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        get_backend("opencl")


def test_kernel_sources_are_found():
    assert (cupy_backend.kernel_dir() / "bnfold.cu").exists()


def test_numpy_backend_writes_nothing_when_a_later_bn_is_bad():
    rng = np.random.RandomState(5)
    plan = random_plan(rng, n_folds=4, dtype=np.float32)
    arrays = make_arrays(plan, np, poison=False)
    arrays[plan.folds[-1].var].flat[0] = -1.0
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(FoldError, match=f"{plan.folds[-1].bn}: variance has negative values"):
        numpy_backend.fold(plan, arrays)
    assert all(np.array_equal(arrays[k], before[k]) for k in arrays)


def test_numpy_backend_rejects_wrong_shapes():
    rng = np.random.RandomState(6)
    plan = random_plan(rng, n_folds=2, dtype=np.float32)
    arrays = make_arrays(plan, np)
    arrays[plan.folds[1].mean] = np.zeros(3, np.float32)
    with pytest.raises(FoldError, match=f"{plan.folds[1].bn}: mean"):
        numpy_backend.fold(plan, arrays)


def test_folded_weight_of_another_dtype_is_refused():
    # the weight kernel reads and writes one dtype; neither backend converts silently
    rng = np.random.RandomState(8)
    plan = random_plan(rng, n_folds=2, dtype=np.float32)
    arrays = make_arrays(plan, np)
    spec = plan.folds[1]
    arrays[spec.folded_weight] = arrays[spec.folded_weight].astype(np.float16)
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(FoldError, match=f"{spec.bn}: folded weight .* is float16, its source .* float32"):
        numpy_backend.fold(plan, arrays)
    assert all(np.array_equal(arrays[k], before[k], equal_nan=True) for k in arrays)


def test_numpy_backend_writes_nothing_when_a_later_bias_runs_out_of_memory(monkeypatch):
    # the new biases are all computed before the first is stored: a MemoryError on the last
    # conversion of new biases to their dtype (a float64 temporary) leaves every array as it was
    plan = random_plan(np.random.RandomState(9), n_folds=5, dtype=np.float32)
    arrays = make_arrays(plan, np, poison=False)
    before = {k: v.copy() for k, v in arrays.items()}
    real = numpy_backend.stored
    calls = [0]

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(numpy_backend, "stored", counting)
    numpy_backend.prepare(plan, arrays)   # computes, writes nothing
    last, calls[0] = calls[0], 0
    assert last >= 2

    def failing(*args):
        calls[0] += 1
        if calls[0] == last:
            raise MemoryError("no room for the float64 temporaries")
        return real(*args)

    monkeypatch.setattr(numpy_backend, "stored", failing)
    with pytest.raises(MemoryError):
        numpy_backend.fold(plan, arrays)
    assert calls[0] == last
    assert all(np.array_equal(arrays[k], before[k]) for k in arrays)


@pytest.mark.parametrize("fault, message", [
    ("missing weight", "array 'f1/W' is missing"),
    ("missing mean", "array 'f1/mean' is missing"),
    ("short weight", "'f1/W' has 7 elements, expected shape"),
    ("strided weight", "'f1/W' is not C-contiguous"),
    ("short var", "var 'f1/var' has 2 values for"),
])
def test_array_faults_are_named_before_anything_is_written(fault, message):
    plan = random_plan(np.random.RandomState(10), n_folds=3, dtype=np.float32)
    arrays = make_arrays(plan, np, poison=False)
    spec = plan.folds[1]
    if fault == "missing weight":
        del arrays[spec.weight]
    elif fault == "missing mean":
        del arrays[spec.mean]
    elif fault == "short weight":
        arrays[spec.weight] = arrays[spec.weight].reshape(-1)[:7].copy()
    elif fault == "strided weight":
        w = arrays[spec.weight]
        arrays[spec.weight] = np.repeat(w[..., None], 2, axis=-1)[..., 0]
        assert not arrays[spec.weight].flags.c_contiguous
    else:
        arrays[spec.var] = arrays[spec.var].reshape(-1)[:2].copy()
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(FoldError, match=f"^{spec.bn}: {message}"):
        numpy_backend.fold(plan, arrays)
    assert all(np.array_equal(arrays[k], before[k]) for k in arrays)


def test_installed_package_carries_the_kernel_sources(tmp_path):
    """setup.py installs kernels/ as bnfold_gpu/_kernels/, and the backend finds it there."""
    pytest.importorskip("setuptools", reason="setuptools is not installed (it builds the package)")
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("bnfold.cu", "bnfold_math.cuh"):
        assert (lib / "bnfold_gpu" / "_kernels" / name).read_bytes() == (root / "kernels" / name).read_bytes()
    r = subprocess.run([sys.executable, "-c", "from bnfold_gpu.backends import cupy_backend as c; "
                        "print(c.kernel_dir()); print(len(c.kernel_source()))"],
                       cwd=tmp_path, env={"PYTHONPATH": str(lib), "PATH": ""}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    where, size = r.stdout.split()
    assert Path(where) == lib / "bnfold_gpu" / "_kernels" and int(size) > 1000


def test_auto_folds_host_arrays_with_numpy_even_when_a_device_answers(monkeypatch):
    """Host-resident arrays (NNabla's CPU context, every .nnp file) are rescaled where they are:
    streaming them through a GPU is bound by the host link."""
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: None)
    assert get_backend("auto", on_device=False) is numpy_backend
    assert get_backend("auto", on_device=True) is cupy_backend
    assert get_backend("cupy", on_device=False) is cupy_backend   # asked for by name


def test_cuda_context_by_the_contexts_first_backend():
    from types import SimpleNamespace
    from bnfold_gpu.backends.common import cuda_context
    assert cuda_context(SimpleNamespace(backend=["cudnn:float"]))
    assert cuda_context(SimpleNamespace(backend=["cuda:float", "cpu:float"]))
    assert not cuda_context(SimpleNamespace(backend=["cpu:float"]))
    assert not cuda_context(SimpleNamespace(backend=[]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape4", [(1, 1, 37, 300), (1, 1, 40, 9), (1, 6, 33, 9), (3, 5, 70, 1),
                                    (2, 4, 3, 1000), (1, 3, 40000, 3)])
def test_rescale_each_loop_shape_gives_the_multiplys_bits(dtype, shape4, rng):
    """The rescale picks its loop by the length of each channel's run (long runs, short runs
    through a repeated scale, one element); each gives the bits of a plain multiply, in place,
    out of place and cut into pieces, and leaves NumPy's buffer size as it was."""
    from bnfold_gpu.layout import ChannelLayout
    layout = ChannelLayout(*shape4)
    w = (rng.randn(layout.size) * 3).astype(dtype)
    scale = rng.randn(shape4[0] * shape4[2]) * 2   # negative scales too
    work = np.result_type(dtype, np.float32)
    want = (w.reshape(shape4).astype(work) * scale.astype(work).reshape(shape4[0], 1, shape4[2], 1))
    want = want.astype(dtype).reshape(-1)
    before = np.getbufsize()
    out = np.empty_like(w)
    numpy_backend.rescale(w, out, scale, layout)
    assert out.tobytes() == want.tobytes()
    pieces = w.copy()
    steps = numpy_backend._steps(numpy_backend._rescale_tasks(pieces, pieces, scale, layout,
                                                              split_bytes=pieces.nbytes // 5))
    scratch = numpy_backend._scratch(steps)
    for step in steps:
        numpy_backend._multiply(step, scratch)
    assert pieces.tobytes() == want.tobytes()
    numpy_backend.rescale(w, w, scale, layout)
    assert w.tobytes() == want.tobytes()
    assert np.getbufsize() == before


def test_rescale_puts_the_buffer_size_back_when_the_multiply_fails(monkeypatch):
    from bnfold_gpu.layout import ChannelLayout
    layout = ChannelLayout(1, 1, 8, 512)
    w = np.ones(layout.size, np.float32)
    before = np.getbufsize()

    def failing(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(np, "multiply", failing)
    with pytest.raises(MemoryError, match="injected"):
        numpy_backend.rescale(w, w, np.full(8, 3.0), layout)
    monkeypatch.undo()
    assert np.getbufsize() == before and (w == 1).all()


def test_short_row_views_never_write_into_a_copy():
    a = np.zeros((1, 4, 6, 3), np.float32)
    view = numpy_backend._runs(a[:, :, 1:4])
    view[...] = 1
    assert a[:, :, 1:4].all() and not a[:, :, :1].any()   # written through
    with pytest.raises(ValueError, match="cannot be merged"):
        numpy_backend._runs(a[:, :, :, ::2])
