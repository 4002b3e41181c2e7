"""The GPU backend against the NumPy backend, twice: on a real device (``cuda``, marker ``gpu``, skipped
where no device answers) and on the host (``emulated``: a CuPy stand-in whose kernels are the real
kernel code compiled for the CPU), so its Python side is tested in CI too. NumPy and CuPy only: this
runs where nnabla is absent."""
import dataclasses
import gc

import numpy as np
import pytest

from compare import assert_same_fold
from bnfold_gpu._synthetic import LAYOUTS, fold_spec, in_place_cases, make_arrays, random_plan
from bnfold_gpu.backends import FoldError, cupy_backend, numpy_backend, segments
from bnfold_gpu.backends.common import FLOAT_DTYPES, check_plan_arrays, check_statistics_exact
from bnfold_gpu.plan import INPUT_SIDE, OUTPUT_SIDE, Plan


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def cp(request, monkeypatch):
    if request.param == "cuda":
        reason = cupy_backend.unavailable_reason()
        if reason:
            pytest.skip(f"backend 'cupy' is not usable: {reason}")
        return cupy_backend.cupy
    import fake_cupy
    fake = fake_cupy.make(request.getfixturevalue("host"))
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    return fake


@pytest.mark.parametrize("seed", range(20))
def test_device_fold_matches_numpy(cp, seed):
    rng = np.random.RandomState(seed)
    plan = random_plan(rng)
    host = make_arrays(plan, np, seed=seed)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}   # outputs poisoned with NaN
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


# BN -> layer biases whose sums are longer than a block (256 threads) and not a multiple of it
LONG_SUMS = (("Convolution", INPUT_SIDE, (1, 5, 70, 9), (5, 70, 3, 3), (5,)),     # rows of 630
             ("Affine", INPUT_SIDE, (1, 1, 600, 3), (600, 3), (3,)),              # columns of 600
             # a grouped 1x1 deconvolution: groups 2 of 300 inputs, 5 outputs each
             ("Deconvolution", INPUT_SIDE, (1, 1, 600, 5), (2, 300, 5), (10,), (1,)))


@pytest.mark.parametrize("case", LONG_SUMS, ids=[c[0] for c in LONG_SUMS])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_side_biases_summed_over_many_threads(cp, case, dtype):
    spec, shapes = fold_spec(0, case, dtype, inplace=True)
    plan = Plan((spec,), (), shapes)
    host = make_arrays(plan, np, seed=5)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


IN_PLACE = list(in_place_cases())


@pytest.mark.parametrize("case, dtype, plan, arrays", IN_PLACE,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{np.dtype(d)}" for c, d, _, _ in IN_PLACE])
def test_every_layout_and_dtype_in_place(cp, case, dtype, plan, arrays):
    want = {k: v.copy() for k, v in arrays.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in arrays.items()}
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


def test_host_arrays_stream_through_small_staging(cp, monkeypatch):
    monkeypatch.setattr(cupy_backend, "STAGING_BYTES", 64 << 10)  # many batches, weights cut in pieces
    rng = np.random.RandomState(11)
    big = ("Convolution", OUTPUT_SIDE, (1, 1, 96, 200 * 9), (96, 200, 3, 3), (96,))
    a = random_plan(rng, n_folds=3, dtype=np.float32, cases=(big,))
    b = random_plan(rng, n_folds=6, first=3)
    plan = Plan(a.folds + b.folds, (), {**a.arrays, **b.arrays})
    host = make_arrays(plan, np, seed=3)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    cupy_backend.fold(plan, host)
    assert_same_fold(plan, host, want)


def test_host_arrays_stream_without_page_locking(cp, monkeypatch):
    monkeypatch.setattr(cupy_backend, "PIN_HOST", False)
    monkeypatch.setattr(cupy_backend, "STAGING_BYTES", 64 << 10)
    monkeypatch.setattr(cupy_backend, "_register", lambda arrays: pytest.fail("page-locked"))
    plan = random_plan(np.random.RandomState(15), n_folds=6)
    host = make_arrays(plan, np, seed=8)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    cupy_backend.fold(plan, host)
    assert_same_fold(plan, host, want)


def test_bad_variance_on_device_changes_nothing(cp):
    rng = np.random.RandomState(12)
    plan = random_plan(rng, n_folds=5, dtype=np.float32)
    host = make_arrays(plan, np, seed=4, poison=False)
    host[plan.folds[3].var].flat[1] = np.nan
    dev = {k: cp.asarray(v) for k, v in host.items()}
    with pytest.raises(FoldError, match=f"{plan.folds[3].bn}: variance has non-finite"):
        cupy_backend.fold(plan, dev)
    for k, v in dev.items():
        assert np.array_equal(v.get(), host[k], equal_nan=True), k


def test_strided_statistics_are_read_correctly(cp):
    # e.g. one (channels, 4) array holding every statistic, passed as column views
    rng = np.random.RandomState(14)
    plan = random_plan(rng, n_folds=4, dtype=np.float32)
    host = make_arrays(plan, np, seed=7)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    for spec in plan.folds:
        for key in (spec.gamma, spec.beta, spec.mean, spec.var):
            if key:
                wide = cp.zeros((host[key].size, 3), host[key].dtype)
                wide[:, 1] = dev[key].reshape(-1)
                dev[key] = wide[:, 1]
                assert not dev[key].flags.c_contiguous
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


def test_arrays_on_two_gpus_are_refused(cp):
    if not hasattr(cp, "launches"):
        pytest.skip("places arrays on a second device of the emulated device only")
    plan = random_plan(np.random.RandomState(13), n_folds=3, dtype=np.float32)
    host = make_arrays(plan, np, seed=6, poison=False)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    dev[plan.folds[2].weight].fake_device = 1
    with pytest.raises(FoldError, match=r"several GPUs \(0, 1\)"):
        cupy_backend.fold(plan, dev)
    assert cp.launches == [] and all(np.array_equal(v, host[k]) for k, v in dev.items())


def test_index_past_2_to_the_31(cp):
    """2^31 + 3 float16 weights in one layer: elements beyond 2^31 get their own channel's scale."""
    free, _ = cp.cuda.runtime.memGetInfo()
    n_ch, inner = 2, 2 ** 30 + 2       # 2^31 + 4 elements
    if free < 3 * n_ch * inner * 2:
        pytest.skip("needs about 13 GB of free device memory")
    case = ("Convolution", OUTPUT_SIDE, (1, 1, n_ch, inner), (n_ch, inner), (n_ch,))
    spec, shapes = fold_spec(0, case, np.float16, with_bias=False, inplace=True)
    plan = Plan((spec,), (), shapes)
    arrays = {k: cp.asarray(v) for k, v in make_arrays(
        Plan((spec,), (), {k: v for k, v in shapes.items() if k != "f0/W"}), np).items()
        if k != "f0/W"}
    arrays["f0/W"] = cp.ones((n_ch, inner), np.float16)
    stats = {k: arrays[k].get().astype(np.float64).reshape(-1) for k in
             ("f0/gamma", "f0/var", "f0/mean", "f0/beta")}
    cupy_backend.fold(plan, arrays)
    scale = stats["f0/gamma"] / np.sqrt(stats["f0/var"] + spec.eps)
    w = arrays["f0/W"].reshape(-1)
    for e in [0, inner - 1, inner, 2 ** 31 - 1, 2 ** 31, 2 * inner - 1]:
        want = np.float16(np.float32(1.0) * np.float32(scale[e // inner]))
        assert w[e].get() == want, e


def test_launches_do_not_grow_with_layers(cp):
    if not hasattr(cp, "launches"):
        pytest.skip("counts launches of the emulated device only")
    rng = np.random.RandomState(21)
    output_cases = tuple(c for c in LAYOUTS if c[1] == OUTPUT_SIDE)
    input_cases = tuple(c for c in LAYOUTS if c[1] == INPUT_SIDE)
    for n in (1, 40):
        plan = random_plan(rng, n_folds=n, cases=output_cases)
        inputs = random_plan(rng, n_folds=n, cases=input_cases, first=n)   # BN -> layer folds
        plan = Plan(plan.folds + inputs.folds, (), {**plan.arrays, **inputs.arrays})
        dev = {k: cp.asarray(v) for k, v in make_arrays(plan, np).items()}
        del cp.launches[:]
        cupy_backend.fold(plan, dev)
        assert cp.launches == ["bnfold_channels", "bnfold_weight_check", "bnfold_biases",
                               "bnfold_input_biases", "bnfold_copy", "bnfold_weights"]


@pytest.mark.parametrize("dtype, tiny", [(np.float32, 1e-39), (np.float16, 1e-6)])
def test_subnormal_values_are_kept(cp, dtype, tiny):
    """CuPy compiles with -ftz=true; the kernels must still keep subnormal weights, scales and
    products as the NumPy backend does, not flush them to zero."""
    spec, shapes = fold_spec(0, LAYOUTS[0], dtype, stat_dtype=np.float32)
    plan = Plan((spec,), (), shapes)
    host = make_arrays(plan, np, seed=5)
    rs = np.random.RandomState(5)
    host[spec.weight][...] = (rs.standard_normal(spec.weight_shape) * tiny).astype(dtype)
    host[spec.gamma].flat[:3] = np.float32(3e-39)          # subnormal float32 scales
    host[spec.beta].flat[:3] = np.float32(1e-41)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    out = want[spec.folded_weight]
    assert ((out != 0) & (np.abs(out) < np.finfo(dtype).tiny)).any()   # the case is really subnormal
    dev = {k: cp.asarray(v) for k, v in host.items()}
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


class _NoRoom(MemoryError):
    pass


@pytest.mark.parametrize("where", ["device", "host"])
def test_failed_allocation_writes_nothing(cp, monkeypatch, where):
    """Out of device memory: every allocation of the fold (tables, staging buffers) comes before its
    first write, so the caller's arrays are left as they were."""
    if not hasattr(cp, "launches"):
        pytest.skip("injects allocation failures into the emulated device only")
    monkeypatch.setattr(cupy_backend, "STAGING_BYTES", 64 << 10)
    rng = np.random.RandomState(17)
    output_cases = tuple(c for c in LAYOUTS if c[1] == OUTPUT_SIDE)
    a = random_plan(rng, n_folds=4, cases=output_cases)
    b = random_plan(rng, n_folds=4, cases=tuple(c for c in LAYOUTS if c[1] == INPUT_SIDE), first=4)
    plan = Plan(a.folds + b.folds, (), {**a.arrays, **b.arrays})
    host = make_arrays(plan, np, seed=2, poison=False)
    arrays = host if where == "host" else {k: cp.asarray(v) for k, v in host.items()}
    before = {k: np.array(v) for k, v in host.items()}
    allocations = {"n": 0}
    empty, asarray = cp.empty, cp.asarray

    def counted(real):
        def allocate(*args, **kwargs):
            allocations["n"] += 1
            if allocations["n"] == allocations.get("fail"):
                raise _NoRoom("out of device memory")
            return real(*args, **kwargs)
        return allocate

    monkeypatch.setattr(cp, "empty", counted(empty))
    monkeypatch.setattr(cp, "asarray", counted(asarray))
    cupy_backend.fold(plan, {k: v.copy() for k, v in arrays.items()})   # counts the allocations
    total, allocations["n"] = allocations["n"], 0
    assert total > 3
    for fail in range(1, total + 1):
        allocations.update(n=0, fail=fail)
        copies = {k: v.copy() for k, v in arrays.items()}
        with pytest.raises(_NoRoom):
            cupy_backend.fold(plan, copies)
        for k, v in copies.items():
            assert np.array_equal(np.array(v), before[k]), (fail, k)


@pytest.mark.parametrize("where", ["device", "host"])
def test_empty_plan_launches_nothing(cp, where):
    """A model with no BN to fold (or all kept): the call does nothing and raises nothing."""
    plan = Plan((), (), {})
    cupy_backend.fold(plan, {})
    w = np.arange(6, dtype=np.float32)
    other = {"unrelated": cp.asarray(w) if where == "device" else w.copy()}
    if hasattr(cp, "launches"):
        del cp.launches[:]
    cupy_backend.fold(plan, other)
    assert np.array_equal(np.array(other["unrelated"].get() if where == "device" else other["unrelated"]), w)
    if hasattr(cp, "launches"):
        assert cp.launches == []


def test_arrays_partly_on_the_host_are_refused(cp):
    plan = random_plan(np.random.RandomState(19), n_folds=3, dtype=np.float32)
    host = make_arrays(plan, np, seed=9, poison=False)
    mixed = {k: cp.asarray(v) for k, v in host.items()}
    mixed[plan.folds[1].weight] = host[plan.folds[1].weight].copy()
    with pytest.raises(FoldError, match=f"partly on the host \\('{plan.folds[1].weight}'\\)"):
        cupy_backend.fold(plan, mixed)
    assert all(np.array_equal(np.array(v.get() if hasattr(v, "get") else v), host[k])
               for k, v in mixed.items())


def test_only_large_weights_are_page_locked(cp, monkeypatch):
    if not hasattr(cp, "launches"):
        pytest.skip("watches the emulated device's page-locking calls")
    locked, unlocked = [], []
    monkeypatch.setattr(cp.cuda.runtime, "hostRegister", lambda p, n, flags: locked.append((p, n)))
    monkeypatch.setattr(cp.cuda.runtime, "hostUnregister", unlocked.append)
    big = np.ones(cupy_backend.PIN_MIN_BYTES // 4, np.float32)
    small, empty = np.ones(1000, np.float32), np.ones(0, np.float32)
    pinned = cupy_backend._register([small, big, empty, big])   # in place: the same array twice
    assert locked == [(big.ctypes.data, big.nbytes)] and pinned == [big.ctypes.data]
    cupy_backend._unregister(pinned)
    assert unlocked == [big.ctypes.data]


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")   # the NaN patterns
def test_every_float16_bit_pattern_folds_as_numpy(cp):
    """Every float16 (subnormals, infinities, NaNs) through the fold: scale 1 exactly on one channel
    (converted there and back), another scale on the other. The device converts with the hardware's
    IEEE conversions, the host tests with NumPy's bit algorithm: both give NumPy's bits, NaN payloads
    aside (a NaN stays a NaN)."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    case = ("Convolution", OUTPUT_SIDE, (1, 1, 2, 1 << 16), (2, 1 << 16), (2,))
    spec, shapes = fold_spec(0, case, np.float16, with_bias=False, inplace=True, eps=0.25,
                             stat_dtype=np.float64)
    plan = Plan((spec,), (), shapes)
    host = make_arrays(plan, np, seed=3)
    host[spec.weight][...] = patterns
    host[spec.gamma][...] = np.array([1.0, 0.3]).reshape(host[spec.gamma].shape)
    host[spec.var][...] = np.array([0.75, 1.3]).reshape(host[spec.var].shape)   # var + eps = 1.0
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    cupy_backend.fold(plan, dev)
    got, ref = dev[spec.weight].get(), want[spec.weight]
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), ref[~nan].view(np.uint16))
    same = ~np.isnan(patterns)   # scale 1: every value but NaN comes back as it was
    assert np.array_equal(got[0][same].view(np.uint16), patterns[same].view(np.uint16))


# -- values the dtype cannot hold: refused before anything is written, as by the NumPy backend -------
def _overflow_case(kind, dtype, seed=0):
    """One in-place fold of every layout of ``kind``'s side with one value made to overflow
    (``weight``, ``bias``: an output-side bias, ``input``: a BN -> layer bias)."""
    side = INPUT_SIDE if kind == "input" else OUTPUT_SIDE
    case = next(c for c in LAYOUTS if c[1] == side and c[0] == "Convolution")
    spec, shapes = fold_spec(0, case, dtype, stat_dtype=np.float64, inplace=True)
    plan = Plan((spec,), (), shapes)
    arrays = make_arrays(plan, np, seed=seed, poison=False)
    big = 1e30 if dtype == np.float32 else 3e4
    arrays[spec.var][...] = 1.0
    arrays[spec.gamma][...] = 1.0
    if kind == "weight":
        arrays[spec.gamma].flat[1] = 1e9 if dtype == np.float32 else 3.0
        first_of_channel = spec.weight_layout.inner          # channel 1 of a (1, 1, c, inner) layout
        arrays[spec.weight].flat[first_of_channel] = big
    elif kind == "bias":
        big = 1e38 if dtype == np.float32 else big
        arrays[spec.beta].flat[2] = big * 2
        arrays[spec.mean].flat[2] = -big * 2
    else:
        arrays[spec.weight][...] = big / 4
        arrays[spec.beta][...] = big
    return plan, arrays


@pytest.mark.parametrize("kind, dtype", [("weight", np.float16), ("weight", np.float32),
                                         ("bias", np.float16), ("bias", np.float32),
                                         ("input", np.float16)])
def test_overflow_on_device_is_refused_as_numpy_does(cp, kind, dtype):
    plan, host = _overflow_case(kind, dtype)
    with pytest.raises(FoldError) as want:
        numpy_backend.fold(plan, {k: v.copy() for k, v in host.items()})
    assert "would overflow" in str(want.value)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    with pytest.raises(FoldError) as got:
        cupy_backend.fold(plan, dev)
    assert str(got.value) == str(want.value)
    for k, v in dev.items():
        assert np.array_equal(v.get(), host[k]), k
    with pytest.raises(FoldError) as staged:   # and streamed from the host
        cupy_backend.fold(plan, {k: v.copy() for k, v in host.items()})
    assert str(staged.value) == str(want.value)


def test_weights_already_inf_or_nan_fold_on_device_as_numpy_does(cp):
    plan, host = _overflow_case("weight", np.float16)
    spec = plan.folds[0]
    host[spec.weight].flat[0] = np.inf
    host[spec.weight].flat[1] = np.nan
    host[spec.gamma][...] = 0.5                 # nothing else overflows
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    cupy_backend.fold(plan, dev)
    got = {k: v.get() for k, v in dev.items()}
    assert np.isinf(got[spec.weight].flat[0]) and np.isnan(got[spec.weight].flat[1])
    np.testing.assert_array_equal(got[spec.folded_bias], want[spec.folded_bias])


def test_non_finite_map_on_device_is_refused(cp):
    spec, shapes = fold_spec(0, LAYOUTS[0], np.float32, stat_dtype=np.float64, eps=0.0)
    plan = Plan((spec,), (), shapes)
    host = make_arrays(plan, np, seed=1, poison=False)
    host[spec.var].flat[2] = 1e-320
    host[spec.gamma].flat[2] = 1e200
    dev = {k: cp.asarray(v) for k, v in host.items()}
    with pytest.raises(FoldError, match=r"f0: its scale gamma / sqrt\(var \+ eps\) is not finite"):
        cupy_backend.fold(plan, dev)
    for k, v in dev.items():
        assert np.array_equal(v.get(), host[k]), k


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_statistics_on_device(cp, dtype):
    spec, shapes = fold_spec(0, LAYOUTS[4], np.float32, stat_dtype=np.float64)
    plan = Plan((spec,), (), shapes)
    host = make_arrays(plan, np, seed=2)
    for key in (spec.mean, spec.var, spec.gamma, spec.beta):
        host[key] = (np.round(host[key] * 3) + (1 if key == spec.var else 0)).astype(dtype)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


def test_integer_weight_is_refused_on_device(cp):
    spec, shapes = fold_spec(0, LAYOUTS[0], np.float32)
    plan = Plan((spec,), (), {**shapes, spec.weight: (spec.weight_shape, np.dtype(np.int32))})
    host = make_arrays(plan, np, seed=2)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    with pytest.raises(FoldError, match=r"f0: 'f0/W' is int32; a weight or bias of a fold must be"):
        cupy_backend.fold(plan, dev)


# -- the checks over all layers at once (column-wise, no Python loop per layer) against the checks
# one layer at a time, which name the BN -------------------------------------------------------
def _per_layer_error(plan, arrays):
    """The message of the first check the arrays fail, as the checks one layer at a time find it."""
    try:
        check_plan_arrays(plan, arrays)
        check_statistics_exact(plan, arrays)
        for spec in plan.folds:
            if not np.isfinite(spec.eps):
                raise FoldError(f"{spec.bn}: eps is not finite")
    except FoldError as e:
        return str(e)
    return None


def _mixed_plan(rng):
    """Random folds of every layout, in place or into new arrays, some without bias or scale."""
    folds, shapes = [], {}
    for k in range(int(rng.randint(1, 7))):
        spec, arrays = fold_spec(k, LAYOUTS[rng.randint(len(LAYOUTS))],
                                 rng.choice([np.float16, np.float32, np.float64]),
                                 with_bias=bool(rng.rand() < 0.6), no_scale=bool(rng.rand() < 0.3),
                                 stat_dtype=rng.choice([np.float32, np.float64]),
                                 inplace=bool(rng.rand() < 0.5))
        folds.append(spec)
        shapes.update(arrays)
    return Plan(tuple(folds), (), shapes)


def _corrupt(rng, plan, dev, cp):
    """One change a caller could make to a plan's arrays: some the checks refuse, some they allow
    (another statistic dtype, strided statistics). Returns the plan (a change of eps makes a new
    one)."""
    spec = plan.folds[rng.randint(len(plan.folds))]
    keys = [k for k in (spec.gamma, spec.beta, spec.mean, spec.var, spec.weight, spec.folded_weight,
                        spec.bias, spec.folded_bias) if k and k in dev]
    key = keys[rng.randint(len(keys))]
    a = dev[key]
    change = rng.choice(["size", "dtype", "float dtype", "strided", "missing", "eps", "wide integer",
                         "none", "none"])
    if change == "size":
        dev[key] = cp.zeros(a.size + int(rng.choice([-1, 1])), a.dtype)
    elif change in ("dtype", "float dtype"):
        dtypes = [np.float16, np.float32, np.float64]
        if change == "dtype":
            dtypes += [np.int32, np.int64, np.uint8, np.bool_, np.complex64]
        dev[key] = cp.asarray(a.get().astype(dtypes[rng.randint(len(dtypes))]))
    elif change == "strided":
        wide = cp.zeros((a.size, 2), a.dtype)
        wide[:, 1] = a.reshape(-1)
        dev[key] = wide[:, 1].reshape(a.shape)
    elif change == "missing":
        del dev[key]
    elif change == "eps":
        folds = tuple(dataclasses.replace(s, eps=float(rng.choice([np.nan, np.inf])))
                      if s is spec else s for s in plan.folds)
        return Plan(folds, (), plan.arrays)
    elif change == "wide integer":
        v = np.round(a.get()).astype(np.int64)
        v.flat[0] = rng.choice([2 ** 53, 2 ** 53 + 2])
        dev[key] = cp.asarray(v)
    return plan


@pytest.mark.parametrize("seed", range(80))
def test_checks_over_all_layers_agree_with_the_per_layer_checks(cp, seed):
    """Whatever is wrong with the arrays, the call refuses them with the message of the per-layer
    checks (naming the first BN they find); what those accept, it folds as the NumPy backend does."""
    rng = np.random.RandomState(seed)
    plan = _mixed_plan(rng)
    host = make_arrays(plan, np, seed=seed, poison=False)
    dev = {k: cp.asarray(v) for k, v in host.items()}
    for _ in range(int(rng.randint(1, 3))):
        plan = _corrupt(rng, plan, dev, cp)
    want = _per_layer_error(plan, dev)
    columns = cupy_backend._columns(plan)
    facts = cupy_backend._read(columns, dev)
    if facts is None or not columns.plan_ok or not cupy_backend._fits(columns, facts):
        assert want is not None   # refused over all layers: refused one layer at a time too
    # and the converse: the call refuses what the per-layer checks refuse, with their message
    before = {k: v.get() for k, v in dev.items()}
    if want is not None:
        with pytest.raises(FoldError) as got:
            cupy_backend.fold(plan, dev)
        assert str(got.value) == want
        for k, v in dev.items():
            assert np.array_equal(v.get(), before[k], equal_nan=True), k
        return
    reference = {k: v.copy() for k, v in before.items()}
    try:
        numpy_backend.fold(plan, reference)
    except FoldError:   # a value the dtype cannot hold, found by both
        with pytest.raises(FoldError):
            cupy_backend.fold(plan, dev)
        for k, v in dev.items():
            assert np.array_equal(v.get(), before[k], equal_nan=True), k
        return
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, reference)


def test_dtype_columns_as_one_dtype_at_a_time():
    dtypes = [np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int32, np.int64,
                                    np.uint64, np.bool_, np.complex64, np.longdouble)]
    dtypes += [np.dtype(">f4"), np.dtype("f4", metadata={"a": 1}), np.dtype("U3"), np.dtype("M8[s]")]
    rng = np.random.RandomState(3)
    for n in (0, 1, 5, 200):
        sample = [dtypes[i] for i in rng.randint(len(dtypes), size=n)]
        for some in (sample, [np.dtype(np.float32)] * n):
            code, statistic_ok, to_float, wide_integer = cupy_backend._dtype_columns(some)
            for d, c, s, f, w in zip(some, code, statistic_ok, to_float, wide_integer):
                assert c == (segments.dtype_code(d) if d in FLOAT_DTYPES else -1), d
                assert s == (d.kind in "biuf" and d.itemsize <= 8), d
                assert f == (d.kind != "f") and w == (d.kind in "iu" and d.itemsize == 8), d


def test_arrays_in_any_order_and_others_beside_them_fold_alike(cp):
    rng = np.random.RandomState(23)
    plan = _mixed_plan(rng)
    host = make_arrays(plan, np, seed=23)
    want = {k: v.copy() for k, v in host.items()}
    numpy_backend.fold(plan, want)
    names = list(host)
    rng.shuffle(names)
    dev = {k: cp.asarray(host[k]) for k in names}
    dev["unrelated"] = cp.asarray(np.arange(5, dtype=np.float64))
    cupy_backend.fold(plan, dev)
    assert_same_fold(plan, {k: v.get() for k, v in dev.items()}, want)


def test_unrelated_array_of_an_unsupported_dtype_is_refused_as_before(cp):
    plan = random_plan(np.random.RandomState(24), n_folds=2)
    dev = {k: cp.asarray(v) for k, v in make_arrays(plan, np, poison=False).items()}
    dev["unrelated"] = cp.asarray(np.arange(5, dtype=np.int32))
    with pytest.raises(TypeError, match="unsupported dtype int32"):
        cupy_backend.fold(plan, dev)


def test_what_follows_from_a_plan_is_kept_while_it_lives(cp):
    plan = random_plan(np.random.RandomState(25), n_folds=3)
    host = make_arrays(plan, np, poison=False)
    cupy_backend.fold(plan, {k: cp.asarray(v) for k, v in host.items()})
    columns = cupy_backend._columns(plan)
    cupy_backend.fold(plan, {k: cp.asarray(v) for k, v in host.items()})
    assert cupy_backend._columns(plan) is columns
    kept = [k for k in segments._PER_PLAN if k[0] == id(plan)]
    assert len(kept) >= 3   # the fields, the tables, the backend's columns
    del plan, columns
    gc.collect()
    assert not any(k in segments._PER_PLAN for k in kept)


REFUSED = [  # (what, the array of fold f1 it changes, its new dtype or "strided", the message)
    ("folded weight of another dtype", "f1/W_folded", np.float64,
     "f1: folded weight 'f1/W_folded' is float64, its source 'f1/W' float32"),
    ("complex statistic", "f1/mean", np.complex64,
     "f1: 'f1/mean' is complex64; a statistic of a fold must be a real number type"),
    ("strided bias", "f1/b", "strided", "f1: 'f1/b' is not C-contiguous"),
    ("integer bias", "f1/b_folded", np.int16,
     "f1: 'f1/b_folded' is int16; a weight or bias of a fold must be float16, float32 or float64"),
]


@pytest.mark.parametrize("what, key, dtype, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_arrays_the_checks_refuse(cp, what, key, dtype, message):
    spec, shapes = fold_spec(0, LAYOUTS[2], np.float32)
    spec2, shapes2 = fold_spec(1, LAYOUTS[0], np.float32)
    plan = Plan((spec, spec2), (), {**shapes, **shapes2})
    dev = {k: cp.asarray(v) for k, v in make_arrays(plan, np, poison=False).items()}
    a = dev[key]
    if dtype == "strided":
        wide = cp.zeros((a.size, 2), a.dtype)
        wide[:, 0] = a.reshape(-1)
        dev[key] = wide[:, 0].reshape(a.shape)
    else:
        dev[key] = cp.asarray(a.get().astype(dtype))
    assert _per_layer_error(plan, dev) == message
    with pytest.raises(FoldError) as got:
        cupy_backend.fold(plan, dev)
    assert str(got.value) == message


def test_importing_the_gpu_backend_leaves_warning_filters_and_the_excepthook_as_they_were():
    # what CuPy imports may add warning filters, and the exceptiongroup backport (Python 3.10,
    # where installed) replaces sys.excepthook on import
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import sys, warnings
        import numpy   # its own filters, as any program importing it gets them
        hook, filters = sys.excepthook, list(warnings.filters)
        from bnfold_gpu.backends import cupy_backend
        assert sys.excepthook is hook
        assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]
        print("cupy" if cupy_backend.cupy is not None else "no cupy")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
