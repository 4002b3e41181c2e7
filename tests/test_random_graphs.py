"""fold() on random compositions of layers, BNs, activations, residual adds, forks, tied weights and
extra graph outputs: whatever it folds, the folded graph computes what the original did, and every BN
is either folded or kept with a reason. The single-pattern tests (test_fold.py) say what must fold;
these say that no combination of patterns folds wrongly."""
import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import nnabla.functions as F
import nnabla.parametric_functions as PF
from hypothesis import HealthCheck, given, settings, strategies as st

import bnfold_gpu
from helpers import bn_count, feed, forward_all, randomize_all, rel_err


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def random_graph(rng, base_axis=1, made=None, onnx_linear=True):
    """A random graph from one input of (2,)*base_axis + (C, 7, 7); returns (input, outputs).
    ``made`` (a list) receives every variable made on the way. ``onnx_linear=False``: no ONNX-style
    Linear, whose reshapes to a batch of 1 ``nnabla.utils.save`` refuses (files from NNabla's ONNX
    importer are written by the importer)."""
    x = nn.Variable((2,) * base_axis + (int(rng.randint(1, 5)), 7, 7))
    axis = base_axis
    made = [] if made is None else made
    made.append(x)
    extra_outputs = []
    convs = {}                          # (in, out, k, groups) -> name, to tie weights
    for i in range(int(rng.randint(2, 9))):
        h = made[rng.randint(len(made))] if rng.rand() < 0.4 else made[-1]
        c = h.shape[axis]
        r = rng.rand()
        name = f"l{i}"
        if r < 0.3:
            g = int(rng.choice(_divisors(c)))
            out, k = g * int(rng.randint(1, 4)), int(rng.randint(1, 4))
            pad = int(rng.randint(0, 2))
            k = min(k, h.shape[-1] + 2 * pad)        # an output of at least 1x1
            key = (c, out, k, g)
            if key in convs and rng.rand() < 0.3:
                name = convs[key]       # the same parameters: a tied weight
            convs.setdefault(key, name)
            h = PF.convolution(h, out, (k, k), pad=(pad, pad), group=g, base_axis=base_axis,
                               with_bias=rng.rand() < 0.5, name=name)
        elif r < 0.42:
            g = int(rng.choice(_divisors(c)))
            k = 1 if rng.rand() < 0.3 else 2     # 1x1: takes a shift on its input, grouped or not
            h = PF.deconvolution(h, g * int(rng.randint(1, 3)), (k, k), group=g, base_axis=base_axis,
                                 with_bias=rng.rand() < 0.5, name=name)
            h = h[..., ::2, ::2] if h.shape[-1] > 12 else h
        elif r < 0.5:
            pad = max(int(rng.randint(0, 2)), 3 - h.shape[-1])   # room for the 3x3 kernel
            if rng.rand() < 0.6:
                h = PF.depthwise_convolution(h, (3, 3), pad=(pad, pad), base_axis=base_axis,
                                             multiplier=int(rng.randint(1, 3)),
                                             with_bias=rng.rand() < 0.5, name=name)
            elif h.shape[-1] < 16:
                h = PF.depthwise_deconvolution(h, (2, 2), divisor=int(rng.choice([1, 2][:1 + (c % 2 == 0)])),
                                               base_axis=base_axis, with_bias=rng.rand() < 0.5,
                                               name=name)
        elif r < 0.68:
            h = PF.batch_normalization(h, axes=[axis], batch_stat=False, no_scale=rng.rand() < 0.2,
                                       no_bias=rng.rand() < 0.2, name=name)
        elif r < 0.78:
            z = [None, h, made[rng.randint(len(made))]][rng.randint(3)]   # z = h: relu(BN(h) + h)
            z = z if z is None or z.shape == h.shape else None
            h = PF.fused_batch_normalization(h, z, axes=[axis], batch_stat=False, name=name)
        elif r < 0.82:
            h = F.relu(h)
        elif r < 0.88:
            other = made[rng.randint(len(made))]
            if other.shape == h.shape:
                h = h + other
        elif r < 0.93 and h is not x:
            extra_outputs.append(h)     # an intermediate result is also a graph output
            continue
        else:
            h = _mover(rng, h, axis, made, name, onnx_linear)
        made.append(h)
    y = made[-1]
    if rng.rand() < 0.6:
        y = PF.affine(y, int(rng.randint(1, 5)), base_axis=base_axis, with_bias=rng.rand() < 0.5,
                      name="fc")
        if rng.rand() < 0.6:
            y = PF.batch_normalization(y, axes=[base_axis], batch_stat=False, name="fc_bn")
    outputs = [o for o in [y] + extra_outputs[:2] if o is not x]
    return x, outputs or [F.relu(x)]


def _mover(rng, h, axis, made, name, onnx_linear=True):
    """A function a map moves through (or not, by its statistics), a constant multiply or add, two
    layers added, one value read by two layers or in two parts, a BN of one channel (one map for
    every element, as a scalar's; also after a mean over the channels), an ONNX Linear,
    a mean or sum over space, a padding, a tile, a BN over two axes, or a slice of channels."""
    kind = rng.randint(11)
    c = h.shape[axis]
    if kind == 0:   # the spatial axes merged and split again
        flat = F.reshape(h, h.shape[:axis + 1] + (h.shape[-2] * h.shape[-1],))
        return F.reshape(flat, h.shape)
    if kind == 1 and base_axis_ok(h, axis):
        return F.interpolate(h, output_size=(h.shape[-2] + 1, h.shape[-1] + 2),
                             mode=["nearest", "linear"][rng.randint(2)])
    if kind == 2 and h.shape[-1] >= 3:
        pad = int(rng.randint(0, 2))
        pooling = [F.average_pooling, F.max_pooling][rng.randint(2)]
        extra = {"including_pad": bool(rng.rand() < 0.5)} if pooling is F.average_pooling else {}
        return pooling(h, (2, 2), (1, 1), pad=(pad, pad), **extra)
    if kind == 3:
        other = made[rng.randint(len(made))]
        if other.shape[:axis] + other.shape[axis + 1:] == h.shape[:axis] + h.shape[axis + 1:]:
            return F.concatenate(h, other, axis=axis)
        return h
    if kind == 4:   # constants as NNabla's SelfFoldingModifier leaves them
        shape = (1,) * axis + (c, 1, 1)
        const = nn.parameter.get_parameter_or_create(f"{name}/const", shape)
        return F.mul2(h, const) if rng.rand() < 0.5 else F.add2(h, const)
    if kind == 5:
        return h * float(rng.uniform(0.5, 2)) if rng.rand() < 0.5 else h + float(rng.randn())
    if kind == 6:   # two layers on one input, added: a map after the add splits between them, a
        # map before the fork goes to both (where neither zero-pads)
        out = int(rng.randint(1, 4))
        k = int(rng.choice([1, 3]))
        a = PF.convolution(h, out, (1, 1), base_axis=axis, name=f"{name}a")
        b = PF.convolution(h, out, (k, k), pad=(k // 2, k // 2), base_axis=axis,
                           with_bias=rng.rand() < 0.5, name=f"{name}b")
        return a + b
    if kind == 7 and rng.rand() < 0.4:   # a mean over the channels, a one-channel BN on it, spread
        # back over the channels: the BN's map, the same for every element, passes both
        m = F.mean(h, axis=axis, keepdims=True)
        m = PF.batch_normalization(m, axes=[axis], batch_stat=False, name=name)
        return F.broadcast(m, h.shape) + h if rng.rand() < 0.5 else F.broadcast(m, h.shape)
    if kind == 7:
        one = F.reshape(h, h.shape + (1,))
        bn = PF.batch_normalization(one, axes=[len(h.shape)], batch_stat=False, name=name)
        return F.reshape(bn, h.shape)
    if kind == 8 and onnx_linear:   # a Linear over the channels as NNabla's ONNX importer builds it, between transposes
        out = int(rng.randint(1, 5))
        perm = [a for a in range(len(h.shape)) if a != axis] + [axis]
        t = F.transpose(h, perm)
        w = nn.parameter.get_parameter_or_create(f"{name}_W", (c, out))
        rows = int(np.prod(t.shape[:-1]))
        m = F.batch_matmul(F.reshape(t, (1, rows, c)), F.reshape(w, (1, c, out)))
        m = F.reshape(m, t.shape[:-1] + (out,))
        if rng.rand() < 0.7:
            b = nn.parameter.get_parameter_or_create(f"{name}_b", (out,))
            if rng.rand() < 0.3:   # an ONNX Gemm's beta
                b = F.mul_scalar(b, float(rng.choice([-0.5, 2.0])))
            m = F.add2(m, F.reshape(b, (1,) * (len(t.shape) - 1) + (out,)))
        return F.transpose(m, [perm.index(a) for a in range(len(perm))])
    if kind == 10 and c >= 2 and rng.rand() < 0.5:   # in two parts, a BN on the first
        cut = int(rng.randint(1, c))
        start, stop = [0] * len(h.shape), list(h.shape)
        stop[axis] = cut
        first = PF.batch_normalization(F.slice(h, start, stop), axes=[axis], batch_stat=False,
                                       name=name)
        start[axis], stop[axis] = cut, c
        return F.concatenate(first, F.slice(h, start, stop), axis=axis)
    if kind == 10:   # one value read by two layers, one through a slice of channels: a map
        # before the fork goes to both (a BN after a ReLU: it does not go back)
        if rng.rand() < 0.7:
            h = PF.batch_normalization(F.relu(h), axes=[axis], batch_stat=False, name=name)
        start = [0] * len(h.shape)
        start[axis] = int(rng.randint(0, c))
        a = PF.convolution(h, int(rng.randint(1, 4)), (1, 1), base_axis=axis,
                           with_bias=rng.rand() < 0.5, name=f"{name}a")
        b = PF.convolution(F.slice(h, start, h.shape), int(rng.randint(1, 4)), (1, 1),
                           base_axis=axis, with_bias=rng.rand() < 0.5, name=f"{name}b")
        return F.concatenate(a, b, axis=axis)
    r = rng.rand() if kind == 9 else 1.0
    if r < 0.35 and len(h.shape) > axis + 1:   # ONNX's ReduceMean over space
        space = tuple(range(axis + 1, len(h.shape)))[-int(rng.randint(1, 3)):]
        return (F.mean if rng.rand() < 0.7 else F.sum)(h, axis=space, keepdims=True)
    if r < 0.6 and len(h.shape) > axis + 1 and h.shape[-1] >= 2:
        mode = ["constant", "reflect", "repeat"][rng.randint(3)]
        return F.pad(h, (int(rng.randint(0, 2)), 1), mode=mode)
    if r < 0.7 and len(h.shape) > axis + 1:   # copies along the last axis
        reps = [1] * (len(h.shape) - 1) + [2]
        return F.tile(h, reps)
    if r < 0.8 and len(h.shape) > axis + 1:   # a BN over the channel and the next axis
        return PF.batch_normalization(h, axes=[axis, axis + 1], batch_stat=False, name=name)
    start = [0] * len(h.shape)
    stop = list(h.shape)
    start[axis] = int(rng.randint(0, c))
    return F.slice(h, start, stop)


def base_axis_ok(h, axis):
    return len(h.shape) == axis + 3   # interpolate takes the last two axes as spatial


def check_random_fold(seed, base_axis=1, backend="numpy"):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x, outputs = random_graph(rng, base_axis)
    randomize_all(rng)
    feed(rng, x)
    before = forward_all(outputs)
    n_bn = bn_count(outputs)
    res = bnfold_gpu.fold(outputs, inplace=rng.rand() < 0.7, backend=backend)
    after = forward_all(res.outputs)
    for a, b in zip(after, before):
        assert a.shape == b.shape and rel_err(a, b) < 1e-4, (seed, rel_err(a, b))
    assert len(res.plan.folded_bns) + len(res.skipped) == n_bn
    assert bn_count(res.outputs) == len(res.skipped)
    assert all(s.reason for s in res.skipped)
    again = bnfold_gpu.plan(res.outputs)     # one call folds all there is
    assert again.folds == () and len(again.skipped) == len(res.skipped), (seed, again.folds)
    return res


@settings(max_examples=60, deadline=None, derandomize=True)   # the same graphs on every run
@given(seed=st.integers(0, 2 ** 31 - 1), base_axis=st.sampled_from([1, 1, 2]))
def test_random_graphs_fold_exactly(seed, base_axis):
    check_random_fold(seed, base_axis)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_random_graphs_through_the_gpu_backend_emulated(host, monkeypatch, seed):
    import fake_cupy
    from bnfold_gpu.backends import cupy_backend
    monkeypatch.setattr(cupy_backend, "cupy", fake_cupy.make(host))
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    assert check_random_fold(seed, backend="cupy").backend == "cupy"


def test_the_generator_makes_every_kind_of_fold_and_skip():
    """The random graphs above reach every fold kind and side and the main reasons to keep a BN
    (so a generator that drifted into trivial graphs would show here)."""
    kinds, reasons, fused, forks = set(), [], 0, 0
    for seed in range(300):
        res = check_random_fold(seed)
        kinds.update((r.kind, r.side) for r in res.folded)
        inputs = [r.bn for r in res.folded if r.side == "input"]
        forks += len(inputs) > len(set(inputs))   # a map that went to several layers' inputs
        fused += sum(r.bn_type == "FusedBatchNormalization" for r in res.folded)
        reasons += [r.reason for r in res.skipped]
    assert {("Convolution", "output"), ("Convolution", "input"), ("Deconvolution", "output"),
            ("Deconvolution", "input"),
            ("DepthwiseConvolution", "output"), ("DepthwiseConvolution", "input"),
            ("DepthwiseDeconvolution", "output"), ("Affine", "output"), ("Affine", "input")} <= kinds
    assert fused > 0 and forks > 0
    for why in ("also feeds", "graph output", "no layer before it", "the function before it is ReLU",
                "zero-pads", "whose add and ReLU stop the map"):
        assert any(why in r for r in reasons), why


def random_parts_graph(rng):
    """One value (a layer's output, a BN's after it, or a BN's after a ReLU, which only moves
    forward) read by up to four functions: slices of its channels (adjacent, interleaved,
    overlapping) or the value whole, each followed by a BN, a ReLU, a layer (1x1, or zero-padded
    3x3), a BN then a layer, or a max pooling then a layer; the results concatenated along the
    channels (then maybe a BN) or each a graph output."""
    x = nn.Variable((2, 3, 5, 5))
    r = rng.rand()
    if r < 0.7:
        h = PF.convolution(x, int(rng.randint(2, 7)), (3, 3), pad=(1, 1),
                           with_bias=rng.rand() < 0.5, name="c")
        if r < 0.3:   # then a BN: the parts' maps cannot compose with it and leave it for others
            h = PF.batch_normalization(h, batch_stat=False, name="bn")
    else:
        h = PF.batch_normalization(F.relu(x), batch_stat=False, name="bn")
    c = h.shape[1]
    n = int(rng.randint(1, min(c, 4) + 1))
    kind = rng.randint(3)
    if kind == 0:    # adjacent groups
        cuts = [0] + sorted(rng.choice(np.arange(1, c), n - 1, replace=False).tolist()) + [c]
        cut = [(cuts[i], cuts[i + 1], 1) for i in range(n)]
    elif kind == 1:  # interleaved groups
        cut = [(i, c, n) for i in range(n)]
    else:            # anything, overlapping or whole
        cut = []
        for _ in range(n):
            start = int(rng.randint(0, c))
            cut.append(None if rng.rand() < 0.2 else
                       (start, int(rng.randint(start + 1, c + 1)), int(rng.choice([1, 2, 3]))))
    ys = []
    for i, part in enumerate(cut):
        v = h
        if part is not None:
            start, stop, step = part
            v = F.slice(h, (0, start, 0, 0), (2, stop, 5, 5), (1, step, 1, 1))
        op = rng.randint(5)
        if op in (0, 3):
            v = PF.batch_normalization(v, batch_stat=False, name=f"bn{i}")
        if op == 1:
            v = F.relu(v)
        if op == 4:
            v = F.max_pooling(v, (2, 2), (1, 1))
        if op in (2, 3, 4):
            k = int(rng.choice([1, 3]))
            v = PF.convolution(v, int(rng.randint(1, 4)), (k, k), pad=(k // 2, k // 2),
                               name=f"l{i}")
        ys.append(v)
    if rng.rand() < 0.5 and len(ys) > 1 and all(y.shape[2:] == ys[0].shape[2:] for y in ys):
        j = F.concatenate(*ys, axis=1)
        if rng.rand() < 0.5:   # a BN after the join: back by every part at once
            j = PF.batch_normalization(j, batch_stat=False, name="bnj")
        return x, [F.relu(j)]
    return x, ys


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_random_values_read_in_parts_fold_exactly(host, monkeypatch, backend):
    """Random forks and channel groups: a map moves forward to every reader or stays, and back to a
    layer whose other readers take channels it leaves alone; exact, in one call, every BN folded
    or kept with a reason."""
    if backend == "cupy":
        import fake_cupy
        from bnfold_gpu.backends import cupy_backend
        monkeypatch.setattr(cupy_backend, "cupy", fake_cupy.make(host))
        monkeypatch.setattr(cupy_backend, "_MODULES", {})
    forks = parts = 0
    for seed in range(60):
        nn.clear_parameters()
        rng = np.random.RandomState(seed)
        x, outputs = random_parts_graph(rng)
        randomize_all(rng)
        feed(rng, x)
        before = forward_all(outputs)
        n_bn = bn_count(outputs)
        res = bnfold_gpu.fold(outputs, inplace=rng.rand() < 0.7, backend=backend)
        for a, b in zip(forward_all(res.outputs), before):
            assert a.shape == b.shape and rel_err(a, b) < 1e-4, (seed, rel_err(a, b))
        assert len(res.plan.folded_bns) + len(res.skipped) == n_bn == \
            bn_count(res.outputs) + len(res.plan.folded_bns)
        assert all(s.reason for s in res.skipped)
        again = bnfold_gpu.plan(res.outputs)
        assert again.folds == () and len(again.skipped) == len(res.skipped), (seed, again.folds)
        forks += any(r.bn == "bn/bn" and r.side == "input" for r in res.folded)
        parts += any("+" in r.bn and r.side == "output" for r in res.folded)
    assert forks and parts   # both kinds of move happen


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_in_a_file_fold_and_verify(tmp_path, seed):
    """The same random graphs saved as .nnp, twice over the same parameters: network "a" whole and
    network "b" ending at an intermediate result (so some of "a"'s folded weights are also read
    where they must not change). ``bnfold fold --verify`` runs both against the original."""
    import json
    from nnabla.utils.save import save
    from bnfold_gpu import cli
    nn.clear_parameters()
    x, outputs = random_graph(np.random.RandomState(seed), onnx_linear=False)
    randomize_all(np.random.RandomState(seed + 1))
    made = []
    x_b, _ = random_graph(np.random.RandomState(seed), made=made,   # reuses "a"'s parameters
                          onnx_linear=False)
    rng = np.random.RandomState(seed + 2)
    middle = [v for v in made if v.parent is not None]
    networks = [{"name": "a", "batch_size": 2, "outputs": {f"y{i}": y for i, y in enumerate(outputs)},
                 "names": {"x": x}}]
    if middle:
        networks.append({"name": "b", "batch_size": 2, "names": {"x": x_b},
                         "outputs": {"m": middle[rng.randint(len(middle))]}})
    path, out, report = tmp_path / "m.nnp", tmp_path / "o.nnp", tmp_path / "r.json"
    save(str(path), {"networks": networks}, parameter_format=[".h5", ".protobuf"][seed % 2])
    nn.clear_parameters()
    argv = ["fold", path, "-o", out, "--verify", "--report", report, "--quiet"]
    assert cli.main([str(a) for a in argv]) == 0
    rep = json.loads(report.read_text())
    if any(n["folded"] for n in rep["networks"].values()):
        assert {r["network"] for r in rep["verify"]["outputs"]} == {n["name"] for n in networks}
