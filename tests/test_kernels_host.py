"""The CUDA kernels without a GPU: every source compiles with nvcc (PTX, sm_80 and sm_90) and with
NVRTC (what CuPy uses), and their per-element code, compiled for the host, matches the NumPy backend
bit for bit on random plans (every layout and dtype)."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from compare import assert_same_fold
from conftest import need_tool
from bnfold_gpu.backends import FoldError, numpy_backend, segments
from bnfold_gpu._synthetic import LAYOUTS, fold_spec, make_arrays, random_plan
from bnfold_gpu.layout import ChannelLayout
from bnfold_gpu.plan import OUTPUT_SIDE, Plan

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))


def test_there_are_kernel_sources():
    assert SOURCES and (KERNELS / "bnfold_math.cuh").exists()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernels_compile_with_nvcc(tmp_path, source, arch):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    need_tool(Path(nvcc).exists(), "nvcc (the CUDA toolkit), to check that the kernels build,")
    out = tmp_path / (source.stem + ".ptx")
    r = subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-Werror=all-warnings", "-ftz=true",
                        str(source), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_ptx(out.read_text())


def _check_ptx(ptx):
    for name in ("bnfold_channels", "bnfold_biases", "bnfold_weights"):
        assert f".entry {name}" in ptx
    # CuPy compiles with -ftz=true; a flushing instruction would zero subnormal float32 values that
    # the NumPy backend keeps
    assert ".ftz" not in ptx, [line for line in ptx.splitlines() if ".ftz" in line][:5]


def _nvrtc():
    """NVRTC, the compiler CuPy uses: from the nvidia-cuda-nvrtc wheel (test extra) or a toolkit."""
    dirs = []
    try:
        import nvidia  # the wheels' namespace: cuda_nvrtc/lib (CUDA 12) or cu13/lib (CUDA 13)
        dirs += [lib for p in nvidia.__path__ for lib in sorted(Path(p).glob("*/lib"))]
    except ImportError:
        pass
    dirs += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib")]
    for d in dirs:
        for cand in sorted(d.glob("libnvrtc.so*")):
            return ctypes.CDLL(str(cand))
    return None


def test_kernels_compile_with_nvrtc_as_cupy_does():
    """The very source and options CuPy gets (header pasted in, -ftz=true appended last), through
    NVRTC, for sm_80 and sm_90."""
    from bnfold_gpu.backends.cupy_backend import kernel_source
    nvrtc = _nvrtc()
    need_tool(nvrtc is not None, "libnvrtc (the test extra's NVRTC wheel, or the CUDA toolkit), to "
              "check the kernels for CuPy,")
    code = kernel_source().encode()
    for arch in (b"compute_80", b"compute_90"):
        prog = ctypes.c_void_p()
        assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code, b"bnfold.cu", 0, None, None) == 0
        opts = [b"--gpu-architecture=" + arch, b"--std=c++14", b"-ftz=true"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if rc == 0:
            nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetPTX(prog, buf)
            ptx = buf.value
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
        assert rc == 0, log.value.decode()
        assert not log.value.strip(), log.value.decode()   # no warnings either
        _check_ptx(ptx.decode())


def _ptr(a):
    return a.ctypes.data


# -- index arithmetic -----------------------------------------------------------------------------
def test_channel_index_matches_layout(host, rng):
    for _ in range(200):
        layout = ChannelLayout(*map(int, rng.randint(1, 6, size=4)))
        e = int(rng.randint(layout.size))
        want = layout.channel_of(e)
        assert host.bnfold_host_channel64(e, layout.inner, layout.channels, layout.rows) == want
        assert host.bnfold_host_channel32(e, layout.inner, layout.channels, layout.rows) == want
        # and the NumPy backend's broadcasting agrees
        scale = np.arange(layout.n_channels, dtype=np.float32) + 1
        out = np.ones(layout.size, np.float32)
        numpy_backend.rescale(out, out, scale, layout)
        assert out[e] == want + 1


def test_channel_index_past_2_to_the_31(host, rng):
    # a 4-group deconvolution with 2^33 elements: the index function, not an allocation
    layout = ChannelLayout(groups=4, rows=4096, channels=1024, inner=128)
    assert layout.size == 2 ** 31
    big = ChannelLayout(groups=16, rows=4096, channels=1024, inner=128)
    for e in [2 ** 31 - 1, 2 ** 31, 2 ** 32 + 12345, big.size - 1] + list(rng.randint(0, big.size, 50)):
        e = int(e)
        assert host.bnfold_host_channel64(e, big.inner, big.channels, big.rows) == big.channel_of(e)


# -- float16 --------------------------------------------------------------------------------------
def test_half_to_float_every_pattern(host):
    bits = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, np.float32)
    host.bnfold_host_half_to_float(_ptr(bits), _ptr(out), 65536)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)) or \
        np.array_equal(out, want, equal_nan=True)


def test_float_to_half_rounds_like_numpy(host, rng):
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.99, 1e-8, 6e-8,
                        5.96e-8, 2.98e-8, 6.1035156e-05, 6.1e-05, 1.0009765625, 1.00048828125,
                        1.00146484375, -3.0517578e-05], np.float32)
    rand = np.concatenate([rng.standard_normal(200000).astype(np.float32) * s
                           for s in (1e-6, 1e-3, 1.0, 1e3, 7e4)])
    ulps = rng.randint(0, 2 ** 31, 200000, dtype=np.int64).astype(np.uint32).view(np.float32)
    f = np.concatenate([special, rand, ulps]).astype(np.float32)
    out = np.empty(f.size, np.uint16)
    host.bnfold_host_float_to_half(_ptr(f), _ptr(out), f.size)
    with np.errstate(over="ignore"):   # overflow to inf is one of the cases
        want = f.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(out[~nan], want[~nan].view(np.uint16))
    assert np.isnan(out[nan].view(np.float16)).all()


# -- whole folds, kernels emulated on the host vs the NumPy backend ---------------------------------
def _random_plan(rng, dtype=None):
    plan = random_plan(rng, dtype=dtype)
    return plan, make_arrays(plan, np, seed=int(rng.randint(1 << 30)))


def _run_host(host, plan, arrays, chunk=segments.CHUNK):
    t = segments.build(plan, {n: _ptr(a) for n, a in arrays.items()},
                       {n: a.dtype for n, a in arrays.items()}, chunk=chunk)
    n = t.total_channels
    scale_d, offset, mean_d, beta_d = (np.full(n, np.nan) for _ in range(4))
    scale_f = np.full(n, np.nan, np.float32)
    status = np.zeros(len(plan.folds), np.int32)
    host.bnfold_host_channels(_ptr(t.channels), len(t.channels), n, _ptr(scale_d), _ptr(scale_f),
                              _ptr(offset), _ptr(mean_d), _ptr(beta_d), _ptr(status))
    flags = np.zeros(len(t.weights) + len(t.biases) + len(t.inputs) + 1, np.int32)
    weight_flags = flags[:len(t.weights)]
    bias_flags = flags[len(t.weights):len(t.weights) + len(t.biases)]
    input_flags = flags[len(t.weights) + len(t.biases):]
    host.bnfold_host_weight_check(_ptr(t.weights), len(t.weights), t.total_blocks, _ptr(scale_d),
                                  _ptr(scale_f), _ptr(weight_flags))
    if t.total_bias:
        host.bnfold_host_biases(_ptr(t.biases), len(t.biases), t.total_bias, _ptr(scale_d),
                                _ptr(mean_d), _ptr(beta_d), _ptr(bias_flags))
    if t.total_input_blocks:
        host.bnfold_host_input_biases(_ptr(t.inputs), len(t.inputs), t.total_input_blocks,
                                      _ptr(offset), _ptr(input_flags))
    host.bnfold_host_weights(_ptr(t.weights), len(t.weights), t.total_blocks, _ptr(scale_d),
                             _ptr(scale_f))
    return status, offset, flags


@pytest.mark.parametrize("seed", range(12))
def test_host_kernels_match_numpy_backend_bit_for_bit(host, seed):
    rng = np.random.RandomState(seed)
    plan, arrays = _random_plan(rng)
    ref = {n: a.copy() for n, a in arrays.items()}
    numpy_backend.fold(plan, ref)
    status, _, flags = _run_host(host, plan, arrays)
    assert not status.any() and not flags.any()
    assert_same_fold(plan, arrays, ref)
    for spec in plan.folds:
        assert np.array_equal(arrays[spec.weight], ref[spec.weight])  # sources untouched


# every layout, alone in a plan; BN -> layer sums longer than a block (256 threads), of one group
# and of several (a grouped 1x1 deconvolution: groups 2, 300 inputs, 5 outputs each)
CASES = LAYOUTS + (("Affine", "input", (1, 1, 600, 3), (600, 3), (3,)),
                   ("Deconvolution", "input", (1, 1, 600, 5), (2, 300, 5), (10,), (1,)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'x'.join(map(str, c[3]))}")
def test_host_kernels_match_numpy_backend_on_every_layout(host, case, dtype):
    spec, shapes = fold_spec(0, case, dtype, stat_dtype=np.float32)
    plan = Plan((spec,), (), shapes)
    arrays = make_arrays(plan, np, seed=11)
    ref = {n: a.copy() for n, a in arrays.items()}
    numpy_backend.fold(plan, ref)
    status, _, flags = _run_host(host, plan, arrays)
    assert not status.any() and not flags.any()
    assert_same_fold(plan, arrays, ref)


@pytest.mark.parametrize("per_thread, unroll", [(16, 1), (16, 2), (16, 16), (1, 1), (64, 8)])
def test_every_build_matches_numpy_backend(tmp_path, per_thread, unroll):
    # the weight kernel at the BNFOLD_PER_THREAD / BNFOLD_UNROLL values the GPU benchmark compares
    from conftest import build_host
    lib = build_host(tmp_path, [f"BNFOLD_PER_THREAD={per_thread}", f"BNFOLD_UNROLL={unroll}"])
    for seed in range(3):
        rng = np.random.RandomState(100 + seed)
        plan, arrays = _random_plan(rng)
        ref = {n: a.copy() for n, a in arrays.items()}
        numpy_backend.fold(plan, ref)
        _run_host(lib, plan, arrays, chunk=segments.BLOCK * per_thread)
        for spec in plan.folds:
            got, want = arrays[spec.folded_weight], ref[spec.folded_weight]
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (unroll, spec.kind)


def test_large_weights_span_many_blocks(host):
    inner = 3 * segments.CHUNK + 17
    case = ("Convolution", OUTPUT_SIDE, (1, 1, 64, inner), (64, inner), (64,))
    spec, shapes = fold_spec(0, case, np.float32)
    plan = Plan((spec,), (), shapes)
    arrays = make_arrays(plan, np)
    ref = {n: a.copy() for n, a in arrays.items()}
    numpy_backend.fold(plan, ref)
    _run_host(host, plan, arrays)
    assert np.array_equal(arrays[spec.folded_weight], ref[spec.folded_weight])


@pytest.mark.parametrize("bad, message", [(-1.0, "negative"), (np.nan, "non-finite"),
                                          (np.inf, "non-finite")])
def test_status_reports_bad_variance(host, bad, message):
    rng = np.random.RandomState(3)
    plan, arrays = _random_plan(rng, np.float32)
    k = len(plan.folds) - 1
    arrays[plan.folds[k].var].flat[0] = bad
    status, _, _ = _run_host(host, plan, arrays)
    assert status[k] and not status[:k].any()
    msg = segments.status_message(plan, status)
    assert msg.startswith(plan.folds[k].bn) and message in msg
    with pytest.raises(FoldError, match=message):
        numpy_backend.fold(plan, arrays)


def test_pieces_cover_the_array_in_order():
    for shape4 in [(3, 2, 4, 9), (1, 7, 5, 3), (1, 1, 13, 11)]:
        layout = ChannelLayout(*shape4)
        got = np.empty(layout.size, np.int64)
        for first, count, piece, ch in segments.pieces(layout, 40):
            assert count == piece.size
            got[first:first + count] = [ch + piece.channel_of(e) for e in range(count)]
        assert list(got) == [layout.channel_of(e) for e in range(layout.size)]


def test_staging_batches_fit_the_buffer_and_cover_every_weight():
    from bnfold_gpu.backends.cupy_backend import _aligned, staging_batches
    rng = np.random.RandomState(9)
    plan = random_plan(rng, n_folds=12)
    itemsize = {n: np.dtype(dt).itemsize for n, (shape, dt) in plan.arrays.items()}
    bounds = np.cumsum([0] + [s.n_channels for s in plan.folds])
    for budget in (512, 1000, 4096, 1 << 20):
        covered = {s.weight: np.zeros(s.weight_layout.size, int) for s in plan.folds}
        for batch in staging_batches(plan, itemsize, bounds, budget):
            assert sum(_aligned(c * itemsize[s.weight]) for s, _, c, _, _ in batch) <= budget or \
                len(batch) == 1
            for spec, first, count, layout, c0 in batch:
                covered[spec.weight][first:first + count] += 1
                j = plan.folds.index(spec)
                assert bounds[j] <= c0 and c0 + layout.n_channels <= bounds[j + 1]
        assert all((c == 1).all() for c in covered.values())


def test_fast_division_is_exact(host, rng):
    divisors = [1, 2, 3, 5, 7, 9, 27, 64, 576, 1000, 4608, 65535, 65536, 65537, 1 << 20, 3 ** 19,
                2 ** 31 - 1] + list(rng.randint(1, 2 ** 31 - 1, 40))
    numerators = [0, 1, 2 ** 31 - 1, 2 ** 31 - 2, 2 ** 30] + list(rng.randint(0, 2 ** 31 - 1, 300))
    for d in divisors:
        packed = segments.fast_divider(int(d))
        for n in numerators + [int(d) - 1, int(d), int(d) + 1]:
            if 0 <= n < 2 ** 31:
                assert host.bnfold_host_fastdiv(int(n), packed) == n // int(d), (n, d)


def test_weight_check_flags_exactly_the_weights_numpy_finds(host):
    """The read-only check kernel, on weights placed at the edge of their dtype's range: it flags a
    weight exactly where the NumPy backend's exact check (largest |weight| of each channel times its
    scale, rounded as the rescale rounds) finds an overflow."""
    seen = set()
    for seed in range(8):
        rng = np.random.RandomState(seed)
        plan = random_plan(rng, n_folds=6, dtype=np.float16 if seed % 2 else np.float32)
        arrays = make_arrays(plan, np, seed=seed)
        for spec in plan.folds:
            w = arrays[spec.weight]
            top = 65504.0 if w.dtype == np.float16 else 3.4e38
            edge = rng.rand(w.size) < 0.01
            w.reshape(-1)[edge] = (top / rng.uniform(1.0, 3.0, edge.sum())).astype(w.dtype)
        flags = _run_host_check(host, plan, arrays)
        for j, spec in enumerate(plan.folds):
            scale = numpy_backend.channel_maps(Plan((spec,), (), {}), arrays)[0][0]
            want = numpy_backend.weight_overflow(spec, arrays[spec.weight], scale) is not None
            assert bool(flags[j]) == want, (seed, j, spec.kind)
            seen.add(want)
    assert seen == {True, False}


def _run_host_check(host, plan, arrays):
    t = segments.build(plan, {n: _ptr(a) for n, a in arrays.items()},
                       {n: a.dtype for n, a in arrays.items()})
    n = t.total_channels
    scale_d, offset, mean_d, beta_d = (np.full(n, np.nan) for _ in range(4))
    scale_f = np.full(n, np.nan, np.float32)
    status = np.zeros(len(plan.folds), np.int32)
    host.bnfold_host_channels(_ptr(t.channels), len(t.channels), n, _ptr(scale_d), _ptr(scale_f),
                              _ptr(offset), _ptr(mean_d), _ptr(beta_d), _ptr(status))
    flags = np.zeros(len(t.weights), np.int32)
    host.bnfold_host_weight_check(_ptr(t.weights), len(t.weights), t.total_blocks, _ptr(scale_d),
                                  _ptr(scale_f), _ptr(flags))
    assert not status.any()
    return flags
