"""fold() as a transaction: every step that can fail is made to fail in turn, on the NumPy backend and
the emulated GPU backend, and afterwards the parameters' bytes, the parameter registry and the graph
are exactly as before; Ctrl-C during the writes completes the fold first; the user's process is left
as it was (modules, context, logging, NumPy error state, signal handlers)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import warnings

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import nnabla.functions as F
import nnabla.parametric_functions as PF

import bnfold_gpu
from bnfold_gpu import folding, rewrite
from bnfold_gpu.backends import FoldError, cupy_backend, numpy_backend
from helpers import bn_count, feed, forward_all, function_types, randomize_all, rel_err

BN = dict(batch_stat=False)


def model(seed=0):
    """Every kind of fold at once: a bias created (conv without one), a BN -> conv (input side), a
    fused BN with its residual, an affine head; in a fresh registry, with random statistics."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 4, 6, 6))
    h1 = F.relu(PF.batch_normalization(
        PF.convolution(x, 6, (3, 3), pad=(1, 1), with_bias=False, name="c1"), name="bn1", **BN))
    h = PF.convolution(PF.batch_normalization(h1, name="bn2", **BN), 6, (1, 1), name="c2")
    h = PF.fused_batch_normalization(PF.convolution(F.relu(h), 6, (1, 1), name="c3"), h1,
                                     name="bn3", **BN)
    y = PF.batch_normalization(PF.affine(h, 5, name="fc"), name="bn4", **BN)
    randomize_all(rng)
    feed(rng, x)
    return y


def state(y):
    """The parameters' bytes, the registry (name -> variable), the graph's functions and outputs."""
    params = nn.get_parameters(grad_only=False)
    return ({k: v.d.copy() for k, v in params.items()}, dict(params), function_types(y),
            forward_all(y))


def assert_unchanged(before, y):
    params, registry, types, outputs = before
    now = nn.get_parameters(grad_only=False)
    assert list(now) == list(registry)
    assert all(now[k] == registry[k] for k in now)   # the same variables, not copies
    for k, v in now.items():
        assert np.array_equal(v.d, params[k]), k
    assert function_types(y) == types
    for a, b in zip(forward_all(y), outputs):
        assert np.array_equal(a, b, equal_nan=True)


class Injected(Exception):
    pass


def failing(real, fail_at, calls):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise Injected(f"call {fail_at} of {getattr(real, '__name__', real)}")
        return real(*args, **kwargs)
    return wrapper


# (object, attribute) of every step of a fold that can raise: allocations (new parameters, the
# backends' temporaries, threads, device buffers), new functions, registrations, rewiring, writes
STEPS = [
    (folding, "new_parameter"), (rewrite, "new_function"), (folding, "_insert"), (rewrite, "rewire"),
    (numpy_backend, "folded_input_bias"), (numpy_backend, "check_bias"),
    (numpy_backend, "check_weight_overflow"), (numpy_backend, "_store_bias"),
]
NUMPY_STEPS = STEPS + [(numpy_backend, "channel_maps"), (numpy_backend, "output_biases"),
                       (numpy_backend, "stored_output_biases"), (numpy_backend, "_rescale_tasks"),
                       (numpy_backend, "_Threads"),
                       (numpy_backend, "magnitude_bounds"),
                       (numpy_backend.Prepared, "commit")]
GPU_STEPS = STEPS + [(cupy_backend, "_Staging"), (cupy_backend, "_Channels"),
                     (cupy_backend, "_register"), (cupy_backend._Staging, "run"),
                     (cupy_backend._HostFold, "commit")]
DEVICE_ALLOCATIONS = ["empty", "zeros", "asarray"]


@pytest.fixture
def emulated(host, monkeypatch):
    import fake_cupy
    fake = fake_cupy.make(host)
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    monkeypatch.setattr(cupy_backend, "STAGING_BYTES", 16 << 10)   # several batches
    return fake


def _count_calls(monkeypatch, obj, attr, backend, inplace, build=model):
    calls = [0]
    with monkeypatch.context() as m:
        m.setattr(obj, attr, failing(getattr(obj, attr), 0, calls))
        y = build()
        bnfold_gpu.fold(y, backend=backend, inplace=inplace)
    return calls[0]


def _every_failure(monkeypatch, steps, backend, inplace, build=model):
    tried = 0
    for obj, attr in steps:
        n = _count_calls(monkeypatch, obj, attr, backend, inplace, build)
        assert n >= 1, attr   # the step is part of this fold
        for k in range(1, n + 1):
            y = build()
            before = state(y)
            with monkeypatch.context() as m:
                m.setattr(obj, attr, failing(getattr(obj, attr), k, [0]))
                with pytest.raises(Injected):
                    bnfold_gpu.fold(y, backend=backend, inplace=inplace)
            assert_unchanged(before, y)
            tried += 1
    return tried


@pytest.mark.parametrize("inplace", [True, False])
def test_every_step_that_fails_leaves_everything_as_it_was_numpy(monkeypatch, inplace):
    monkeypatch.setattr(numpy_backend, "_SPLIT_BYTES", 1 << 10)   # several tasks, two threads
    monkeypatch.setattr(numpy_backend, "_workers", lambda: 2)
    assert _every_failure(monkeypatch, NUMPY_STEPS, "numpy", inplace) > 30
    y = model()   # and with nothing injected, the same fold is exact
    want = forward_all(y)
    res = bnfold_gpu.fold(y, backend="numpy", inplace=inplace)
    assert not res.skipped and rel_err(forward_all(res.outputs)[0], want[0]) < 1e-5


@pytest.mark.parametrize("inplace", [True, False])
def test_every_step_that_fails_leaves_everything_as_it_was_gpu_emulated(monkeypatch, emulated,
                                                                         inplace):
    steps = GPU_STEPS + [(emulated, name) for name in DEVICE_ALLOCATIONS]
    assert _every_failure(monkeypatch, steps, "cupy", inplace) > 30
    y = model()
    want = forward_all(y)
    res = bnfold_gpu.fold(y, backend="cupy", inplace=inplace)
    assert res.backend == "cupy" and rel_err(forward_all(res.outputs)[0], want[0]) < 1e-5


def products_model(seed=1):
    """Linears without bias as NNabla's ONNX importer builds them (no Add2), a BN before and after
    the first (the BN after becomes the add of a new bias holding both shifts), a BN before the
    second (an add of a new bias appended after the product), and a BN moved through a mean and a
    reflect padding into a convolution: the graph edits that add functions."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((4, 6, 5, 5))
    c = PF.convolution(x, 5, (3, 3), name="c")
    h = F.mean(F.pad(c, (1, 1), mode="reflect"), axis=(2, 3), keepdims=True)
    h = F.reshape(PF.batch_normalization(h, name="bn0", **BN), (4, 5))

    def linear(h, cols, name):
        w = nn.parameter.get_parameter_or_create(f"{name}_W", (h.shape[1], cols))
        p = F.batch_matmul(F.reshape(h, (1,) + h.shape), F.reshape(w, (1,) + w.shape))
        return F.reshape(p, (h.shape[0], cols))
    h = linear(F.relu(h), 6, "l1")
    h = F.relu(PF.batch_normalization(h, name="bn1", **BN))
    y = linear(PF.batch_normalization(h, name="bn2", **BN), 3, "l2")
    randomize_all(rng)
    feed(rng, x)
    return y


@pytest.mark.parametrize("inplace", [True, False])
def test_every_step_that_fails_in_edits_that_add_functions_leaves_everything_as_it_was(
        monkeypatch, inplace):
    y = products_model()
    planned = bnfold_gpu.plan(y)
    assert planned.edit.adds and planned.edit.appends and not planned.skipped   # what it tests
    assert _every_failure(monkeypatch, NUMPY_STEPS, "numpy", inplace, products_model) > 20
    y = products_model()
    want = forward_all(y)
    res = bnfold_gpu.fold(y, backend="numpy", inplace=inplace)
    assert not res.skipped and rel_err(forward_all(res.outputs)[0], want[0]) < 1e-5


def reach_model(seed=2):
    """The folds that move a map past a fork or into parts of a layer's output: a BN after a ReLU
    read by two convolutions (one through a slice of channels), a convolution's output in parts
    with a BN on each (the layer's output read outside the rebuilt functions until both join), a
    BN before a grouped 1x1 deconvolution without bias (its shift summed group by group into a new
    bias), and an ONNX-style Linear whose bias is scaled by beta, then a BN."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 4, 5, 5))
    h = PF.batch_normalization(F.relu(x), name="bn_fork", **BN)
    a = PF.convolution(h, 3, (1, 1), name="a")
    b = PF.convolution(F.slice(h, (0, 1, 0, 0), (2, 4, 5, 5)), 3, (1, 1), name="b")
    c = PF.convolution(x, 6, (3, 3), pad=(1, 1), with_bias=False, name="c")   # a new bias
    parts = [PF.batch_normalization(F.slice(c, (0, i, 0, 0), (2, i + 3, 5, 5)), name=f"p{i}", **BN)
             for i in (0, 3)]
    d = PF.deconvolution(PF.batch_normalization(F.relu(x), name="bn_dg", **BN), 4, (1, 1),
                         group=2, with_bias=False, name="dg")
    h = F.concatenate(F.relu(a), F.relu(b), F.relu(F.concatenate(*parts, axis=1)), F.relu(d),
                      axis=1)
    h = F.reshape(F.mean(h, axis=(2, 3)), (2, 16))
    w = nn.parameter.get_parameter_or_create("fc_W", (16, 4))
    bias = nn.parameter.get_parameter_or_create("fc_b", (4,))
    p = F.reshape(F.batch_matmul(F.reshape(h, (1, 2, 16)), F.reshape(w, (1, 16, 4))), (2, 4))
    y = PF.batch_normalization(F.add2(p, F.reshape(F.mul_scalar(bias, -2.0), (1, 4))),
                               name="bn_fc", **BN)
    randomize_all(rng)
    feed(rng, x)
    return y


@pytest.mark.parametrize("backend, inplace", [("numpy", True), ("cupy", False)])
def test_every_step_that_fails_in_folds_past_forks_and_parts_leaves_everything_as_it_was(
        monkeypatch, request, backend, inplace):
    steps = NUMPY_STEPS
    if backend == "cupy":
        emulated = request.getfixturevalue("emulated")
        steps = GPU_STEPS + [(emulated, name) for name in DEVICE_ALLOCATIONS]
    planned = bnfold_gpu.plan(reach_model())
    assert sorted(planned.folded_bns) == ["bn_dg/bn", "bn_fc/bn", "bn_fork/bn", "p0/bn", "p3/bn"]
    assert not planned.skipped   # what it tests
    assert _every_failure(monkeypatch, steps, backend, inplace, reach_model) > 20
    y = reach_model()
    want = forward_all(y)
    res = bnfold_gpu.fold(y, backend=backend, inplace=inplace)
    assert not res.skipped and rel_err(forward_all(res.outputs)[0], want[0]) < 1e-5


def both_sides_model(seed=3, dtype=np.float32):
    """A convolution with a bias and a BN on each side (folded in two stages, the bias written
    between them), its input side 3x3 (short runs of weights per channel: the scale repeated in
    blocks), then an affine head with a BN after it."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 4, 7, 7))
    h = PF.batch_normalization(F.relu(x), name="bn_in", **BN)
    h = PF.batch_normalization(PF.convolution(h, 6, (3, 3), name="c0"), name="bn_out", **BN)
    y = PF.batch_normalization(PF.affine(F.relu(h), 5, name="fc"), name="bn_fc", **BN)
    randomize_all(rng)
    if dtype != np.float32:
        for name, p in nn.get_parameters(grad_only=False).items():
            if name.endswith("/W"):
                p.data.cast(dtype)
    feed(rng, x)
    return y


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_a_layer_folded_on_both_sides_gets_its_bias_back_when_the_writes_fail(monkeypatch, request,
                                                                               backend):
    # the bias the first stage folds is the caller's, though the second stage writes it anew
    steps = [(numpy_backend, "_store_bias"), (numpy_backend.Prepared, "commit")]
    if backend == "cupy":
        request.getfixturevalue("emulated")
        steps = [(numpy_backend, "_store_bias"), (cupy_backend._Staging, "run")]
    else:
        monkeypatch.setattr(numpy_backend, "_workers", lambda: 1)
        y = both_sides_model()
        before = state(y)
        with monkeypatch.context() as m:   # the first multiply: no weight written yet
            m.setattr(numpy_backend, "_multiply", failing(numpy_backend._multiply, 1, [0]))
            with pytest.raises(Injected):
                bnfold_gpu.fold(y, backend="numpy")
        assert_unchanged(before, y)
    assert bnfold_gpu.plan(both_sides_model()).intermediates   # folded in two stages
    assert _every_failure(monkeypatch, steps, backend, True, both_sides_model) >= 3


@pytest.mark.parametrize("workers", [1, 2])
def test_a_multiply_failing_once_the_weights_are_being_written_is_redone(monkeypatch, workers):
    """Each multiply writes nothing if it fails; one that fails after others have written is done
    again, and the fold completes (exact); one that fails before any weight was written leaves all
    as it was."""
    monkeypatch.setattr(numpy_backend, "_SPLIT_BYTES", 1 << 8)   # many pieces
    monkeypatch.setattr(numpy_backend, "_SCALE_BLOCK", 16)       # many blocks of short runs
    monkeypatch.setattr(numpy_backend, "_workers", lambda: workers)
    n = _count_calls(monkeypatch, numpy_backend, "_multiply", "numpy", True, both_sides_model)
    assert n > 10
    completed = 0
    for k in range(1, n + 1):
        y = both_sides_model()
        before, want = state(y), forward_all(y)[0]
        with monkeypatch.context() as m:
            m.setattr(numpy_backend, "_multiply", failing(numpy_backend._multiply, k, [0]))
            try:
                res = bnfold_gpu.fold(y, backend="numpy")
            except Injected:   # the first step of a thread: no weight of the caller's written yet
                assert_unchanged(before, y)
                continue
        assert bn_count(y) == 0 and not res.skipped
        assert rel_err(forward_all(y)[0], want) < 1e-5
        completed += 1
    assert completed >= n - 2 * workers - 1


def test_no_thread_can_start_the_fold_runs_on_this_one(monkeypatch):
    # a process at its thread limit: the magnitude bounds, the writes and the Ctrl-C guard each
    # do their work on the calling thread instead of failing
    monkeypatch.setattr(numpy_backend, "_SPLIT_BYTES", 1 << 8)   # several bins to share
    monkeypatch.setattr(numpy_backend, "_workers", lambda: 2)
    y = both_sides_model()
    want = forward_all(y)[0]
    started = []

    def no_thread(self):
        started.append(self.name)
        raise RuntimeError("can't start new thread")
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", no_thread)
        from bnfold_gpu import _safe_points
        with _safe_points.ctrl_c_at_safe_points(lambda: "unused"):
            res = bnfold_gpu.fold(y, backend="numpy")
    assert "bnfold" in started and "bnfold-ctrl-c" in started
    assert bn_count(y) == 0 and not res.skipped
    assert rel_err(forward_all(y)[0], want) < 1e-5


def test_multiplies_failing_again_say_that_the_parameters_are_half_folded(monkeypatch):
    monkeypatch.setattr(numpy_backend, "_workers", lambda: 1)
    n = _count_calls(monkeypatch, numpy_backend, "_multiply", "numpy", True, both_sides_model)
    real = numpy_backend._multiply
    calls = [0]

    def fails_from_the_last(step, scratch):   # and every time it is tried again
        calls[0] += 1
        if calls[0] >= n:
            raise MemoryError("injected")
        return real(step, scratch)
    monkeypatch.setattr(numpy_backend, "_multiply", fails_from_the_last)
    with pytest.raises(RuntimeError, match="half folded"):
        bnfold_gpu.fold(both_sides_model(), backend="numpy")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_writes_allocate_nothing_through_numpys_functions(monkeypatch, dtype):
    # every array the writes use (the repeated scale's memory included) exists before they start
    monkeypatch.setattr(numpy_backend, "_SCALE_BLOCK", 16)
    y = both_sides_model(dtype=dtype)
    want = forward_all(y)[0]
    real_commit = numpy_backend.Prepared.commit

    def commit(self):
        with monkeypatch.context() as m:
            for name in ("empty", "zeros", "ones", "repeat", "concatenate", "array", "asarray",
                         "ascontiguousarray", "empty_like", "zeros_like", "copy", "tile"):
                m.setattr(np, name, failing(getattr(np, name), 1, [0]))
            return real_commit(self)
    monkeypatch.setattr(numpy_backend.Prepared, "commit", commit)
    res = bnfold_gpu.fold(y, backend="numpy")
    assert not res.skipped and bn_count(y) == 0
    assert rel_err(forward_all(y)[0], want) < (1e-5 if dtype == np.float32 else 2e-2)


@pytest.mark.parametrize("step, k", [("new_function", 5), ("rewire", 3)])
def test_a_failed_fold_frees_its_new_functions(monkeypatch, step, k):
    """The functions a failed fold created are gone when it returns, even while its traceback is
    kept: they would otherwise count as consumers of the weights in a later fold."""
    import gc
    y = model()
    # the registered handles, which the new functions read (each parametric call has its own)
    weights = [v for k, v in nn.get_parameters(grad_only=False).items() if k.endswith("/W")]
    assert len(weights) == 4
    gc.collect()
    gc.disable()
    try:
        with monkeypatch.context() as m:
            m.setattr(rewrite, step, failing(getattr(rewrite, step), k, [0]))
            with pytest.raises(Injected) as failure:   # kept, as an interactive session keeps it
                bnfold_gpu.fold(y)
        assert failure.traceback
        for w in weights:
            live = [f for f in w.function_references if f.outputs[0].parent == f]
            assert not live, [f.info.type_name for f in live]
    finally:
        gc.enable()
    res = bnfold_gpu.fold(y)   # folds as if nothing had happened
    assert len(res.folded) == 4 and not res.skipped


# -- Ctrl-C -----------------------------------------------------------------------------------------
def test_ctrl_c_during_the_writes_completes_the_fold_then_raises(monkeypatch, backend):
    y = model()
    want = forward_all(y)
    real = numpy_backend._multiply if backend == "numpy" else cupy_backend._download
    sent = []

    def interrupted(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(numpy_backend if backend == "numpy" else cupy_backend,
                        "_multiply" if backend == "numpy" else "_download", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        bnfold_gpu.fold(y, backend=backend)
    assert sent and signal.getsignal(signal.SIGINT) is handler
    assert bn_count(y) == 0   # consistently folded: rewired and every weight written
    assert rel_err(forward_all(y)[0], want[0]) < 1e-5


def test_fold_in_a_worker_thread():
    y = model()
    want = forward_all(y)
    out = []
    t = threading.Thread(target=lambda: out.append(bnfold_gpu.fold(y)))
    t.start()
    t.join()
    assert out and rel_err(forward_all(y)[0], want[0]) < 1e-5


# -- dtypes, overflow, non-finite maps ----------------------------------------------------------------
@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """Each backend by name; CuPy's on the emulated device."""
    if request.param == "cupy":
        request.getfixturevalue("emulated")
    return request.param


def _conv_bn(dtype=np.float32, with_bias=True, seed=0):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 3, 5, 5))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), with_bias=with_bias, name="c"),
                               name="bn", **BN)
    randomize_all(rng)
    feed(rng, x)
    if dtype != np.float32:
        for v in nn.get_parameters(grad_only=False).values():
            v.data.cast(dtype)
    return y


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_weight_is_refused_before_anything_is_written(dtype):
    y = _conv_bn()
    params = nn.get_parameters(grad_only=False)
    w = params["c/conv/W"]
    w.d = np.round(w.d * 10)
    w.data.cast(dtype)
    before = state(y)
    with pytest.raises(FoldError, match=r"bn/bn: 'c/conv/W' is int\d\d; a weight or bias of a fold "
                                        r"must be float16, float32 or float64"):
        bnfold_gpu.fold(y)
    assert_unchanged(before, y)


def test_integer_statistics_fold_where_exact():
    y = _conv_bn()
    params = nn.get_parameters(grad_only=False)
    for name in ("bn/bn/mean", "bn/bn/var"):
        params[name].d = np.round(params[name].d * 4) + (1 if name.endswith("var") else 0)
        params[name].data.cast(np.int32)
    want = forward_all(y)
    res = bnfold_gpu.fold(y)
    assert len(res.folded) == 1 and rel_err(forward_all(y)[0], want[0]) < 1e-5


def test_integer_statistic_past_2_to_the_53_is_refused():
    y = _conv_bn()
    mean = nn.get_parameters(grad_only=False)["bn/bn/mean"]
    mean.data.cast(np.int64)
    mean.data.get_data("rw").flat[0] = 2 ** 60 + 1
    before = state(y)
    with pytest.raises(FoldError, match="bn/bn: 'bn/bn/mean' holds the integer"):
        bnfold_gpu.fold(y)
    assert_unchanged(before, y)


def test_float16_weights_that_would_overflow_are_refused(backend):
    y = _conv_bn(np.float16)
    params = nn.get_parameters(grad_only=False)
    w = params["c/conv/W"].data.get_data("rw")
    w[2].flat[5] = 30000.0                       # channel 2: finite, but not once scaled by 3
    params["bn/bn/gamma"].data.get_data("rw").flat[2] = 3.0
    params["bn/bn/var"].data.get_data("rw").flat[2] = 1.0
    before = state(y)
    with pytest.raises(FoldError, match=r"bn/bn: the folded weight 'c/conv/W' would overflow "
                                        r"float16 \(channel 2: \|weight\| up to 3e\+04"):
        bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


def test_float16_weights_just_below_the_limit_fold(backend):
    # exact: 65504 is float16's largest value; a weight that lands on it still folds
    y = _conv_bn(np.float16)
    params = nn.get_parameters(grad_only=False)
    w = params["c/conv/W"].data.get_data("rw")
    w[1].flat[0] = 32752.0
    params["bn/bn/gamma"].data.get_data("rw").flat[1] = 2.0
    params["bn/bn/var"].data.get_data("rw").flat[1] = 1.0 - 1e-5   # scale 2 (eps 1e-5)
    res = bnfold_gpu.fold(y, backend=backend)
    assert len(res.folded) == 1
    assert params["c/conv/W"].d[1].flat[0] == np.float16(65504.0)


def test_float32_weights_with_extreme_statistics_are_refused(backend):
    y = _conv_bn()
    params = nn.get_parameters(grad_only=False)
    params["c/conv/W"].data.get_data("rw")[0].flat[0] = 1e30
    params["bn/bn/var"].data.get_data("rw").flat[0] = 0.0
    params["bn/bn/gamma"].data.get_data("rw").flat[0] = 1e9    # scale 1e9 / sqrt(1e-5)
    before = state(y)
    with pytest.raises(FoldError, match="bn/bn: the folded weight 'c/conv/W' would overflow float32"):
        bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


def test_a_scale_past_float32_is_refused_without_a_warning(backend):
    # gamma near float32's largest over a tiny variance: a scale float32 cannot hold (NumPy's cast
    # warned on stderr before the refusal)
    y = _conv_bn()
    params = nn.get_parameters(grad_only=False)
    params["bn/bn/var"].data.get_data("rw").flat[0] = 0.0
    params["bn/bn/gamma"].data.get_data("rw").flat[0] = 3e38
    before = state(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FoldError, match="would overflow float32"):
            bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


def test_float16_bias_that_would_overflow_is_refused(backend):
    y = _conv_bn(np.float16)
    params = nn.get_parameters(grad_only=False)
    params["bn/bn/beta"].data.get_data("rw").flat[3] = 60000.0
    params["bn/bn/mean"].data.get_data("rw").flat[3] = -30000.0
    params["bn/bn/gamma"].data.get_data("rw").flat[3] = 1.0
    params["bn/bn/var"].data.get_data("rw").flat[3] = 1.0
    before = state(y)
    with pytest.raises(FoldError, match=r"bn/bn: the folded bias 'c/conv/b' would overflow float16"):
        bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


@pytest.mark.parametrize("eps, words", [(float("nan"), "eps is not finite"),
                                        (-100.0, "variance \\+ eps is not positive")])
def test_nan_or_negative_eps_is_refused(backend, eps, words):
    nn.clear_parameters()
    x = nn.Variable((2, 3, 5, 5))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), eps=eps, name="bn", **BN)
    randomize_all(np.random.RandomState(0))
    before = state(y)
    with pytest.raises(FoldError, match=f"bn/bn: {words}"):
        bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


def test_scale_past_float64_is_refused(backend):
    nn.clear_parameters()
    x = nn.Variable((2, 3, 5, 5))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), eps=0.0, name="bn", **BN)
    randomize_all(np.random.RandomState(0))
    var = nn.get_parameters(grad_only=False)["bn/bn/var"]
    var.data.cast(np.float64)
    var.data.get_data("rw").flat[1] = 1e-320                          # subnormal: 1/sqrt is past float64
    nn.get_parameters(grad_only=False)["bn/bn/gamma"].data.get_data("rw").flat[1] = 1e200
    before = state(y)
    with pytest.raises(FoldError, match=r"bn/bn: its scale gamma / sqrt\(var \+ eps\) is not finite"):
        bnfold_gpu.fold(y, backend=backend)
    assert_unchanged(before, y)


def test_a_weight_that_was_already_inf_folds_as_inf():
    # not the fold's doing: a non-finite weight stays non-finite, and is no error
    y = _conv_bn()
    w = nn.get_parameters(grad_only=False)["c/conv/W"]
    w.data.get_data("rw")[0].flat[0] = np.inf
    res = bnfold_gpu.fold(y)
    assert len(res.folded) == 1 and np.isinf(w.d[0].flat[0])


# -- where new parameters are registered --------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, name):
        self.name_ = name

    def call(self, x):
        return F.relu(PF.batch_normalization(PF.convolution(x, 4, (3, 3), pad=(1, 1),
                                                            with_bias=False, name="conv"),
                                             name="bn", **BN))


class Net(nn.Module):
    def __init__(self):
        self.first = Block("first")
        self.second = Block("second")

    def call(self, x):
        return PF.affine(self.second(self.first(x)), 3, name="head")


def test_new_parameters_go_into_the_scope_of_a_module():
    nn.clear_parameters()
    net = Net()
    x = nn.Variable((2, 4, 6, 6))
    y = net(x)
    for m in (net, net.first, net.second):
        randomize_all(np.random.RandomState(1), m.parameter_scope)
    feed(np.random.RandomState(2), x)
    want = forward_all(y)
    assert nn.get_parameters(grad_only=False) == {}   # nothing in the global registry
    res = bnfold_gpu.fold(y)
    assert rel_err(forward_all(y)[0], want[0]) < 1e-5
    assert sorted(res.parameters) == ["@first/conv/conv/b", "@second/conv/conv/b"]
    assert not res.unregistered
    assert "b" in net.first.parameter_scope["conv"]["conv"]
    assert sorted(k for k in net.get_parameters(grad_only=False) if k.endswith("/b")) == \
        ["@first/conv/conv/b", "@second/conv/conv/b", "head/affine/b"]
    assert nn.get_parameters(grad_only=False) == {}   # still nothing registered globally


class TtsStyleModule:
    """A module as Sony's ``neu`` library writes them (Tacotron 2): its own parameter scope, entered
    around each call, outside the global registry."""

    def __init__(self):
        self.__dict__["_parameter_scope"] = {}

    def __call__(self, x):
        with nn.parameter_scope("", self._parameter_scope):
            h = PF.convolution(x, 5, (3, 3), with_bias=False, name="conv")
            return PF.batch_normalization(h, name="bn", **BN)


def test_fold_save_reload_of_a_module_scoped_model(tmp_path):
    from nnabla.utils.nnp_graph import NnpLoader
    from nnabla.utils.save import save
    nn.clear_parameters()
    module = TtsStyleModule()
    x = nn.Variable((2, 3, 7, 7))
    y = module(x)
    randomize_all(np.random.RandomState(3), module._parameter_scope)
    feed(np.random.RandomState(4), x)
    want = forward_all(y)[0]
    res = bnfold_gpu.fold(y)
    assert list(res.parameters) == ["conv/conv/b"] and not res.unregistered
    path = tmp_path / "folded.nnp"
    with nn.parameter_scope("", module._parameter_scope):   # how such a model is saved
        save(str(path), {"networks": [{"name": "n", "batch_size": 2, "outputs": {"y": y},
                                       "names": {"x": x}}]})
    scope = {}
    with nn.parameter_scope("", scope):
        net = NnpLoader(str(path)).get_network("n")
        net.inputs["x"].d = x.d
        net.outputs["y"].forward()
        got = net.outputs["y"].d.copy()
    assert "BatchNormalization" not in function_types(net.outputs["y"])
    assert rel_err(got, want) < 1e-5


def test_parameters_of_plain_variables_are_reported_unregistered():
    nn.clear_parameters()
    x = nn.Variable((2, 3, 5, 5))
    w = nn.Variable.from_numpy_array(np.random.RandomState(0).randn(4, 3, 3, 3).astype(np.float32))
    stats = [nn.Variable.from_numpy_array(a.astype(np.float32)) for a in
             (np.zeros((1, 4, 1, 1)), np.ones((1, 4, 1, 1)) * 2, np.ones((1, 4, 1, 1)) * 0.5,
              np.ones((1, 4, 1, 1)) * 3)]
    y = F.batch_normalization(F.convolution(x, w), *stats, batch_stat=False)
    res = bnfold_gpu.fold(y)
    assert len(res.folded) == 1 and res.unregistered == tuple(res.parameters)


# -- the user's process ---------------------------------------------------------------------------------
def test_fold_leaves_the_process_as_it_was():
    """In a fresh interpreter: after fold(), NNabla's modules are the real ones (no alias), so Variable
    operators honour the current context, ``import nnabla.utils.save as save`` works, and nothing else
    global changed."""
    script = textwrap.dedent("""
        import logging, signal, sys
        import numpy as np
        import nnabla as nn
        import nnabla.functions as F
        import nnabla.parametric_functions as PF
        import bnfold_gpu

        def snapshot():
            return (repr(nn.get_current_context()), (np.geterr(), np.getbufsize()),
                    (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
                    logging.getLogger().level, list(logging.getLogger().handlers),
                    logging.getLogger("nnabla").level, list(logging.getLogger("nnabla").handlers),
                    {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("nnabla", "nnabla_ext")})

        x = nn.Variable((2, 3, 5, 5))
        y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), batch_stat=False)
        before = snapshot()
        bnfold_gpu.fold(y)
        bnfold_gpu.fold(PF.batch_normalization(PF.affine(x, 4, name="a"), batch_stat=False,
                                               name="b2"), backend="numpy")
        h = PF.batch_normalization(F.relu(x), batch_stat=False, name="bf")   # a fork, forward
        res = bnfold_gpu.fold([PF.convolution(h, 2, (1, 1), name="f1"),
                               PF.convolution(F.slice(h, (0, 1, 0, 0), (2, 3, 5, 5)), 2, (1, 1),
                                              name="f2")], backend="numpy")
        assert len(res.folded) == 2 and not res.skipped
        after = snapshot()
        assert before[:7] == after[:7], (before[:7], after[:7])
        new = set(after[7]) - set(before[7])
        assert not [k for k in sys.modules if k.startswith(("nnabla.nnabla", "nnabla.nnabla_ext"))]
        assert all(before[7][k] is after[7][k] for k in before[7])
        assert all(after[7][k].__name__ == k for k in new), new

        # the file API and the command line, in this process: nothing global changes either, and
        # the current parameter scope is not touched
        import os, tempfile
        from nnabla.utils.save import save
        from bnfold_gpu import cli
        d = tempfile.mkdtemp()
        m = os.path.join(d, "m.nnp")
        y2 = PF.batch_normalization(PF.convolution(x, 2, (1, 1), name="c3"), batch_stat=False,
                                    name="b3")
        save(m, {"networks": [{"name": "net", "batch_size": 2, "outputs": {"y": y2},
                               "names": {"x": x}}]})
        before = snapshot()
        registry = dict(nn.get_parameters(grad_only=False))
        bnfold_gpu.fold_nnp(m, os.path.join(d, "o.nnp"), backend="numpy", verify=True)
        assert cli.main(["fold", m, "-o", os.path.join(d, "o2.nnp"), "-q", "--verify"]) == 0
        assert cli.main(["fold", os.path.join(d, "missing.nnp"), "-o", os.path.join(d, "o3.nnp"),
                         "-q"]) == 2
        after = snapshot()
        assert before[:7] == after[:7], (before[:7], after[:7])
        assert all(before[7][k] is after[7][k] for k in before[7])
        now = dict(nn.get_parameters(grad_only=False))
        assert now.keys() == registry.keys() and all(now[k] is registry[k] for k in now)
        import nnabla.utils.save as save
        assert save.save is sys.modules["nnabla.utils.save"].save
        half = nn.Context(["cpu:half"], "CpuCachedArray", "0")
        a, b = nn.Variable((2,)), nn.Variable((2,))
        with nn.context_scope(half):
            assert repr((a + b).parent.context) == repr((a * 2).parent.context) == repr(half)
        nn.set_default_context(half)
        assert repr((a - b).parent.context) == repr(half)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
