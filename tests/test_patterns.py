"""Maps moved through the functions they commute with, one pattern at a time: the folded graph
computes what the original did (random shapes, statistics far from identity, negative scales), in
place and into new parameters, on the NumPy backend and the emulated GPU backend; a map that cannot
move says which function stopped it and why; a second fold finds nothing more to fold."""
import warnings

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import nnabla.functions as F
import nnabla.parametric_functions as PF

import bnfold_gpu
from bnfold_gpu.graph import parameter_names
from helpers import bn_count, feed, forward_all, function_types, randomize_all, rel_err

BN = dict(batch_stat=False)


@pytest.fixture(params=["numpy", "cupy", "cupy-device"])
def backend(request, monkeypatch):
    """The NumPy backend; the GPU backend, its device emulated on the host: parameters in NNabla's
    CPU context (streamed through the device), or in its CUDA context (reached through DLPack and
    folded where they are, with every array of the fold on the device)."""
    if request.param == "numpy":
        return "numpy"
    import fake_cupy
    from bnfold_gpu.backends import cupy_backend
    fake = fake_cupy.make(request.getfixturevalue("host"))
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    if request.param == "cupy-device":
        import nnabla.utils.dlpack
        fake.from_dlpack = lambda capsule: np.from_dlpack(capsule).view(fake_cupy.ndarray)
        monkeypatch.setattr(cupy_backend, "on_device", lambda ctx: True)
        monkeypatch.setattr(nnabla.utils.dlpack, "to_dlpack",
                            lambda a, dtype=None, ctx=None: a.get_data("rw"))   # shares memory
        monkeypatch.setattr(cupy_backend, "_HostFold",
                            lambda *a: pytest.fail("took the staged path"))
    return "cupy"


def build(model, seed=0, positive=False, shift_free=()):
    """A fresh registry, ``model()`` -> (inputs, outputs), random parameters and inputs. ``positive``:
    every BN scale positive; ``shift_free``: BNs whose shift is made exactly 0 (beta = mean * scale)."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    inputs, outputs = model()
    randomize_all(rng)
    params = parameter_names()
    by_name = {n: v for v, n in params.items()}
    for name, var in by_name.items():
        if positive and name.endswith("/gamma"):
            var.d = np.abs(var.d)
    for bn in shift_free:   # shift beta - mean * scale exactly 0
        by_name[f"{bn}/bn/beta"].d = 0
        by_name[f"{bn}/bn/mean"].d = 0
    feed(rng, *inputs)
    return inputs, outputs


def check(outputs, backend="numpy", inplace=True, folded=None, kept=(), tol=1e-5, skip=()):
    """Fold; the outputs are unchanged, the BNs named in ``folded`` are gone, those in ``kept`` stay;
    folding the result again finds nothing."""
    before = forward_all(outputs)
    n_bn = bn_count(outputs)
    res = bnfold_gpu.fold(outputs, backend=backend, inplace=inplace, skip=skip)
    after = forward_all(res.outputs)
    for a, b in zip(after, before):
        assert a.shape == b.shape and rel_err(a, b) < tol, rel_err(a, b)
    if folded is not None:
        assert sorted(m for m in res.plan.folded_maps) == sorted(folded)
    assert sorted(s.bn for s in res.skipped) == sorted(kept)
    assert bn_count(res.outputs) == len(res.skipped) <= n_bn
    again = bnfold_gpu.plan(res.outputs, skip=skip)
    assert again.folds == () and [s.bn for s in again.skipped] == [s.bn for s in res.skipped]
    return res


INPLACE = [True, False]


# -- through shapes -------------------------------------------------------------------------------
@pytest.mark.parametrize("inplace", INPLACE)
def test_affine_reshape_bn(backend, inplace):
    # the WGAN generator's first block: a dense layer reshaped into channels, then a BN
    def model():
        x = nn.Variable((3, 5))
        h = F.reshape(PF.affine(x, 6 * 4 * 4, name="fc"), (3, 6, 4, 4))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Affine", "output")]
    assert function_types(res.outputs) == ["Affine", "Reshape", "ReLU"]


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_flatten_affine(backend, inplace, channel_last):
    # NNabla's importer turns Flatten -> Linear into Reshape -> Affine (or BatchMatmul); a
    # channel-last network flattens with the channels fastest
    def model():
        x = nn.Variable((2, 5, 3, 4))
        h = F.relu(x)
        if channel_last:
            h = F.transpose(h, (0, 2, 3, 1))
        h = PF.batch_normalization(h, axes=[3 if channel_last else 1], name="bn", **BN)
        return [x], PF.affine(F.reshape(h, (2, 60)), 7, name="fc")
    (x,), y = build(model, seed=1)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Affine", "input")]


@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_over_two_axes(backend, inplace):
    # NNabla's BN over axes [1, 2] transposes and reshapes its input and its statistics: the
    # statistics are the parameters behind those reshapes, one map over (C, H)
    def model():
        x = nn.Variable((2, 3, 4, 5))
        h = F.reshape(PF.affine(x, (3, 4), name="fc"), (2, 3, 4, 1))
        a = PF.batch_normalization(h, axes=[1, 2], name="bn", **BN)
        b = PF.batch_normalization(F.relu(x), axes=[1, 2], name="bn2", **BN)
        b = PF.affine(b, 6, name="fc2")
        c = PF.batch_normalization(PF.convolution(x, 4, (1, 1), name="c"), axes=[1, 2],
                                   name="bn3", **BN)
        return [x], [F.relu(a), b, F.relu(c)]
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn", "bn2/bn"], kept=["bn3/bn"])
    assert sorted((s.kind, s.side) for s in res.folded) == [("Affine", "input"),
                                                          ("Affine", "output")]
    assert "the map has a value for each element of axes 1..2, not one per output channel of " \
        "the Convolution (axis 1)" in res.skipped[0].reason


def test_bn_over_two_axes_in_a_file(tmp_path):
    from bnfold_gpu.nnp import read

    def model():
        x = nn.Variable((2, 3, 4, 5))
        h = F.reshape(PF.affine(x, (3, 4), name="fc"), (2, 3, 4, 1))
        return [x], F.relu(PF.batch_normalization(h, axes=[1, 2], name="bn", **BN))
    (x,), y = build(model)
    report = _folds_in_a_file(tmp_path, x, y)
    assert report["folded_count"] == 1
    out = read(str(tmp_path / "o.nnp"))   # the statistics' transposes and reshapes went with it
    assert [f.type for f in out.proto.network[0].function] == [
        "Affine", "Reshape", "Transpose", "Reshape", "Reshape", "Transpose", "ReLU"]
    assert not [n for n in out.params if n.startswith("bn/")]


def test_reshape_that_spreads_channels_stops_the_map():
    def model():
        x = nn.Variable((2, 6))
        h = F.reshape(PF.affine(x, 12, name="fc"), (2, 3, 4))   # channels of 4 over the last axis
        h = F.reshape(PF.batch_normalization(h, axes=[2], name="bn", **BN), (2, 2, 6))
        return [x], PF.affine(F.relu(h), 3, name="fc2")
    (x,), y = build(model)
    res = check(y, folded=["bn/bn"])    # backward through the first reshape is fine
    assert res.folded[0].side == "output"
    (x,), y = build(lambda: model2(), seed=2)
    res = check(y, kept=["bn/bn"])
    assert "Reshape: it spreads the channels over several axes" in res.skipped[0].reason


def model2():
    x = nn.Variable((2, 6, 2))
    h = PF.batch_normalization(F.relu(x), name="bn", **BN)
    h = F.reshape(h, (2, 4, 3))          # channels of 2 elements straddle the new axes
    return [x], PF.convolution(h, 3, (1,), name="c")


@pytest.mark.parametrize("inplace", INPLACE)
def test_transpose_keeps_the_channel(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = F.transpose(PF.convolution(x, 4, (3, 3), name="c"), (0, 2, 3, 1))
        return [x], PF.batch_normalization(h, axes=[3], name="bn", **BN)
    (x,), y = build(model)
    check(y, backend, inplace, folded=["bn/bn"])


# -- through spatial functions ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_conv_interpolate_bn(backend, inplace, mode):
    # WGAN's upsampling blocks
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = F.interpolate(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c"), output_size=(9, 7),
                          mode=mode)
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model)
    check(y, backend, inplace, folded=["bn/bn"])


@pytest.mark.parametrize("inplace", INPLACE)
def test_unpooling_and_global_average_pooling(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 4, 4))
        a = PF.batch_normalization(F.unpooling(PF.convolution(x, 4, (3, 3), name="c1"), (2, 2)),
                                   name="bn1", **BN)
        b = PF.batch_normalization(F.global_average_pooling(PF.convolution(x, 5, (1, 1), name="c2")),
                                   name="bn2", **BN)
        return [x], [F.relu(a), F.relu(b)]
    (x,), ys = build(model)
    check(ys, backend, inplace, folded=["bn1/bn", "bn2/bn"])


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_mean_over_space_is_a_global_pooling(backend, inplace, channel_last, keep_dims):
    # F.mean(h, axis=(2, 3)): ONNX's ReduceMean, and how many models write a global pooling;
    # backward into the convolution before it, and forward into the affine after it
    space = (1, 2) if channel_last else (2, 3)

    def model():
        x = nn.Variable((2, 5, 5, 3) if channel_last else (2, 3, 5, 5))
        if channel_last:   # NNabla's CPU convolution is channel-first: a dense layer then
            h = F.reshape(PF.affine(x, 5 * 5 * 4, name="c"), (2, 5, 5, 4))
        else:
            h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c")
        a = PF.batch_normalization(F.mean(h, axis=space, keepdims=keep_dims), name="bn1",
                                   axes=[3 if channel_last and keep_dims else 1], **BN)
        b = PF.batch_normalization(F.relu(x), name="bn2", axes=[3 if channel_last else 1], **BN)
        b = PF.affine(F.mean(b, axis=space, keepdims=keep_dims), 3, name="fc")
        return [x], [F.relu(a), b]
    (x,), ys = build(model)
    res = check(ys, backend, inplace, folded=["bn1/bn", "bn2/bn"])
    assert sorted((s.kind, s.side) for s in res.folded) == sorted(
        [("Affine", "input"), ("Affine" if channel_last else "Convolution", "output")])


def test_mean_or_sum_across_the_channels_stops_the_map():
    # a map of several channels cannot pass a mean or sum across them; a one-channel map (what
    # follows a mean or sum over the channels kept as an axis) is the same for every element and
    # passes a mean over any axes, but not a sum where it has a shift
    def model():
        x = nn.Variable((2, 3, 5, 5))
        a = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a = PF.convolution(F.mean(a, axis=1, keepdims=True), 2, (1, 1), name="c0")
        h = PF.convolution(x, 4, (3, 3), name="c")
        b = PF.batch_normalization(F.sum(h, axis=1, keepdims=True), name="bn2", **BN)
        h3 = PF.convolution(x, 4, (3, 3), name="c3")
        c = PF.batch_normalization(F.mean(h3, axis=(1, 2), keepdims=True), name="bn3", **BN)
        return [x], [a, b, c]
    _, ys = build(model)
    res = check(ys, kept=["bn/bn", "bn2/bn"], folded=["bn3/bn"])
    reasons = {s.bn: s.reason for s in res.skipped}
    assert "after it is Mean: it averages across the axes the channels span" in reasons["bn/bn"]
    assert "Sum: it sums across the axes the channels span" in reasons["bn2/bn"]


def test_sum_over_space_needs_a_map_without_shift(backend):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = F.sum(PF.convolution(x, 4, (1, 1), name="c"), axis=(2, 3))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model)
    res = check(y, backend, kept=["bn/bn"])
    assert "Sum: its map has a shift that is not zero, which a sum multiplies" in \
        res.skipped[0].reason
    (x,), y = build(model, shift_free=["bn"])
    check(y, backend, folded=["bn/bn"])


@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("mode", ["reflect", "repeat"])
def test_reflect_and_repeat_padding_copy_the_channel(backend, inplace, mode):
    # BN -> Pad(reflect) -> convolution, as ONNX exports of reflection-padded generators hold
    def model():
        x = nn.Variable((2, 3, 5, 6))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a = PF.convolution(F.pad(h, (1, 1, 2, 1), mode=mode), 4, (3, 3), name="c")
        b = PF.convolution(F.relu(x), 4, (3, 3), name="c2")
        b = F.pad(b, (1, 1, 1, 1), mode=mode)
        return [x], [a, F.relu(PF.batch_normalization(b, name="bn2", **BN))]
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn", "bn2/bn"])
    assert sorted((s.kind, s.side) for s in res.folded) == [("Convolution", "input"),
                                                          ("Convolution", "output")]


@pytest.mark.parametrize("inplace", INPLACE)
def test_broadcast_and_tile_along_other_axes(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 4, 4))
        g = F.mean(PF.convolution(x, 5, (3, 3), name="c"), axis=(2, 3), keepdims=True)
        a = F.relu(PF.batch_normalization(F.broadcast(g, (2, 5, 4, 4)), name="bn", **BN))
        h = F.tile(PF.batch_normalization(F.relu(x), name="bn2", **BN), (2, 1, 1, 2))
        b = PF.convolution(h, 4, (3, 3), name="c2")
        t = PF.batch_normalization(F.tile(F.relu(x), (3, 1, 1, 1, 1)), name="bn3", axes=[2],
                                   **BN)   # tile adds a leading axis
        t = PF.affine(F.reshape(t, (3 * 2, 3 * 4 * 4)), 2, name="fc")
        w = PF.batch_normalization(F.tile(F.relu(x), (1, 2, 1, 1)), name="bn4", **BN)
        return [x], [a, b, t, F.relu(w)]
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn", "bn2/bn", "bn3/bn"], kept=["bn4/bn"])
    assert "Tile: it repeats elements along the axes the channels span" in res.skipped[0].reason


def test_constant_padding_takes_a_map_without_shift():
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a = PF.convolution(F.pad(h, (1, 1, 1, 1)), 4, (3, 3), name="c")
        c = PF.batch_normalization(F.relu(x), name="bn3", **BN)
        c = PF.convolution(F.pad(c, (1, 1), constant_value=0.5), 4, (3, 3), name="c3")
        d = PF.batch_normalization(F.relu(x), name="bn4", **BN)
        d = PF.convolution(F.pad(d, (1, 1, 0, 0, 0, 0)), 4, (3, 3), name="c4")
        return [x], [a, c, d]
    _, ys = build(model)
    res = check(ys, kept=["bn/bn", "bn3/bn", "bn4/bn"])
    reasons = {s.bn: s.reason for s in res.skipped}
    assert "Pad: its map has a shift that is not zero, and the padding's zeros" in reasons["bn/bn"]
    assert "Pad: it pads with the constant 0.5, which the map would change" in reasons["bn3/bn"]
    assert "Pad: it pads along the axes the channels span" in reasons["bn4/bn"]
    _, ys = build(model, positive=True, shift_free=["bn"])
    check(ys, folded=["bn/bn"], kept=["bn3/bn", "bn4/bn"])


def test_a_reason_names_the_maps_its_bn_composes_with_not_itself():
    """Three BNs on the graph's input before a zero-padded convolution all stay: each moves
    forward, composing those after it, and the reason names those, not the BN itself. A chain going
    back names those before it."""
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = x
        for name in ("a", "b", "c"):
            h = PF.batch_normalization(h, name=name, **BN)
        y = PF.convolution(h, 4, (3, 3), pad=(1, 1), name="conv")
        z = PF.batch_normalization(PF.batch_normalization(F.relu(x), name="d", **BN), name="e", **BN)
        return [x], [y, F.max_pooling(z, (2, 2))]
    _, ys = build(model)
    res = check(ys, kept=["a/bn", "b/bn", "c/bn", "d/bn", "e/bn"])
    reasons = {s.bn: s.reason for s in res.skipped}
    assert "(the map it composes with b/bn, c/bn has a shift that is not zero)" in reasons["a/bn"]
    assert "(the map it composes with c/bn has a shift that is not zero)" in reasons["b/bn"]
    assert "(its map has a shift that is not zero)" in reasons["c/bn"]
    assert "the map it composes with d/bn" in reasons["e/bn"]


@pytest.mark.parametrize("kernel", [(1, 1, 2, 2), (1, 2, 2), (2, 1)])
def test_windows_one_wide_on_the_channels_leave_them_alone(backend, kernel):
    # ONNX's Upsample (opset 9) imports as Unpooling with kernel (1, 1, 2, 2); a pooling window of
    # 1 moved by 1 over the channels, alike
    def model():
        x = nn.Variable((2, 3, 4, 4))
        h = PF.convolution(x, 6, (3, 3), pad=(1, 1), name="c")
        a = PF.batch_normalization(F.unpooling(h, kernel), name="bn", **BN)
        p = F.max_pooling(PF.convolution(x, 5, (1, 1), name="c2"), (1, 2, 2))
        b = PF.batch_normalization(p, name="bn2", **BN)
        q = F.average_pooling(PF.convolution(x, 4, (1, 1), name="c3"), (2, 2, 2), (1, 2, 2))
        c = PF.batch_normalization(q, name="bn3", **BN)     # a window 2 wide over the channels
        return [x], [F.relu(a), F.relu(b), F.relu(c)]
    _, ys = build(model, positive=True)
    res = check(ys, backend, folded=["bn/bn", "bn2/bn"], kept=["bn3/bn"])
    assert "AveragePooling: it works along the axes the channels span" in res.skipped[0].reason


@pytest.mark.parametrize("pad, including_pad, folds", [((0, 0), True, True), ((1, 1), False, True),
                                                        ((1, 1), True, False)])
def test_average_pooling_folds_where_windows_sum_to_one(backend, pad, including_pad, folds):
    def model():
        x = nn.Variable((2, 3, 7, 7))
        h = F.average_pooling(PF.convolution(x, 4, (3, 3), name="c"), (3, 3), (2, 2), pad=pad,
                              including_pad=including_pad)
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model)
    if folds:
        check(y, backend, folded=["bn/bn"])
    else:
        res = check(y, backend, kept=["bn/bn"])
        assert "AveragePooling: its map has a shift that is not zero, and the windows average " \
               "in zero padding" in res.skipped[0].reason
        (x,), y = build(model, shift_free=["bn"])   # a map without shift passes the padding
        check(y, backend, folded=["bn/bn"])


def test_max_pooling_needs_a_nonnegative_scale(backend):
    def model():
        x = nn.Variable((2, 3, 7, 7))
        h = F.max_pooling(PF.convolution(x, 4, (3, 3), name="c"), (3, 3), (2, 2), pad=(1, 1))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model, seed=3)   # random signs: some scales are negative
    assert (nn.get_parameters()["bn/bn/gamma"].d < 0).any()
    res = check(y, backend, kept=["bn/bn"])
    assert "MaxPooling: its map has a negative scale, which turns the maximum into a minimum" in \
        res.skipped[0].reason
    (x,), y = build(model, seed=3, positive=True)
    check(y, backend, folded=["bn/bn"])


def test_sum_pooling_needs_a_map_without_shift(backend):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = F.sum_pooling(PF.convolution(x, 4, (1, 1), name="c"), (2, 2))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    (x,), y = build(model)
    res = check(y, backend, kept=["bn/bn"])
    assert "a sum over each window multiplies" in res.skipped[0].reason
    (x,), y = build(model, shift_free=["bn"])
    check(y, backend, folded=["bn/bn"])


def test_relu_passes_a_map_without_shift_and_with_positive_scale(backend):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = F.relu(PF.convolution(x, 4, (3, 3), name="c"))
        return [x], PF.convolution(PF.batch_normalization(h, name="bn", **BN), 2, (3, 3), pad=(1, 1),
                                   name="c2")
    (x,), y = build(model)
    res = check(y, backend, kept=["bn/bn"])   # backward: ReLU; forward: the padded convolution
    assert "ReLU: its map has a shift that is not zero" in res.skipped[0].reason
    assert "zero-pads" in res.skipped[0].reason
    (x,), y = build(model, positive=True, shift_free=["bn"])
    res = check(y, backend, folded=["bn/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "output")]


# -- joins ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("op", [F.add2, F.sub2])
@pytest.mark.parametrize("inplace", INPLACE)
def test_add_of_two_convolutions_then_bn(backend, inplace, op, with_bias):
    # the pix2pix discriminator's two-input stem: BN(a + b) = s*a + s*b + t
    def model():
        x1, x2 = nn.Variable((2, 3, 6, 6)), nn.Variable((2, 2, 6, 6))
        a = PF.convolution(x1, 4, (3, 3), pad=(1, 1), with_bias=with_bias[0], name="c1")
        b = PF.convolution(x2, 4, (1, 1), with_bias=with_bias[1], name="c2")
        return [x1, x2], F.leaky_relu(PF.batch_normalization(op(a, b), name="bn", **BN), 0.2)
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert sorted(s.kind for s in res.folded) == ["Convolution", "Convolution"]


@pytest.mark.parametrize("pooled_first", [False, True])
@pytest.mark.parametrize("op", [F.add2, F.sub2])
def test_add_of_a_pooled_branch_then_bn(backend, op, pooled_first):
    # BN(conv(x) + conv(pool(x))): the pooled branch (N, C, 1, 1) is broadcast over space, which
    # the map survives (its channels are not broadcast); either input takes the shift
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        b = PF.convolution(F.global_average_pooling(x), 4, (1, 1), with_bias=False, name="c2")
        h = op(b, a) if pooled_first else op(a, b)
        c = PF.convolution(x, 4, (1, 1), name="c3")
        w = op(c, F.reshape(PF.affine(F.relu(x), 6, name="fc"), (2, 1, 6, 1)))   # over channels
        return [x], [F.relu(PF.batch_normalization(h, name="bn", **BN)),
                     F.relu(PF.batch_normalization(w, name="bn2", **BN))]
    _, ys = build(model)
    res = check(ys, backend, folded=["bn/bn"], kept=["bn2/bn"])
    assert sorted(s.kind for s in res.folded) == ["Convolution", "Convolution"]
    assert "it broadcasts one input over the other along the axes the channels span" in \
        res.skipped[0].reason


def test_add_whose_branch_feeds_elsewhere_keeps_the_bn():
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        b = PF.convolution(x, 4, (1, 1), name="c2")
        return [x], [PF.batch_normalization(a + b, name="bn", **BN), F.relu(b)]
    _, ys = build(model)
    res = check(ys, kept=["bn/bn"])
    assert "input 1 of Add2 also feeds 1 other function input(s)" in res.skipped[0].reason


def test_a_value_added_or_joined_to_itself_says_so():
    # BN(h + h), BN(concatenate(h, h)) then a ReLU: h is read twice by one function
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        g = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c2")
        a = F.relu(PF.batch_normalization(h + h, name="bn", **BN))
        b = F.relu(PF.batch_normalization(F.concatenate(g, g, axis=1), name="bn2", **BN))
        return [x], [a, b]
    _, ys = build(model)
    res = check(ys, kept=["bn/bn", "bn2/bn"])
    reasons = {s.bn: s.reason for s in res.skipped}
    assert reasons["bn/bn"].startswith(
        "input 0 of Add2 is read 2 times, all by the same Add2 (its inputs 0, 1)")
    assert reasons["bn2/bn"].startswith(
        "input 0 of Concatenate is read 2 times, all by the same Concatenate (its inputs 0, 1)")


@pytest.mark.parametrize("inplace", INPLACE)
def test_concatenate_then_bn_splits_the_channels(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        b = PF.deconvolution(x, 2, (1, 1), name="d2")
        return [x], F.relu(PF.batch_normalization(F.concatenate(a, b, axis=1), name="bn", **BN))
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert sorted(s.kind for s in res.folded) == ["Convolution", "Deconvolution"]


@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_then_concatenate_then_convolution(backend, inplace):
    # forward: the map covers its input's part of the concatenation
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = PF.batch_normalization(F.relu(x), name="bn", **BN)
        return [x], PF.convolution(F.concatenate(F.relu(x + 1), a, axis=1), 4, (1, 1), name="c")
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "input")]


@pytest.mark.parametrize("kinds", [("bn", "bn"), ("scalar", "bn"), ("one-channel bn", "bn"),
                                   ("scalar", "scalar")])
@pytest.mark.parametrize("inplace", INPLACE)
def test_maps_on_each_input_of_a_concatenation_join_in_the_layer_after(backend, inplace, kinds):
    # each covers its own input's channels: the layer takes both, in one call
    def model():
        xs = [nn.Variable((2, 3, 4, 4)), nn.Variable((2, 2, 4, 4))]

        def mapped(x, kind, name):
            if kind == "bn":
                return PF.batch_normalization(F.relu(x), name=name, **BN)
            if kind == "scalar":
                return F.relu(x) * 2.0
            s = x.shape
            return F.reshape(PF.batch_normalization(F.reshape(F.relu(x), (s[0], 1) + s[1:]),
                                                    name=name, **BN), s)
        h = F.concatenate(*[mapped(x, k, f"bn{i}") for i, (x, k) in enumerate(zip(xs, kinds))],
                          axis=1)
        return xs, PF.convolution(h, 2, (1, 1), name="c")
    _, y = build(model)
    res = check(y, backend, inplace)
    assert len(res.folded) == 1 and len(res.plan.folded_maps) == 2


@pytest.mark.parametrize("inplace", INPLACE)
def test_slice_of_channels(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = F.slice(PF.convolution(x, 8, (3, 3), name="c"), (0, 2, 0, 0), (2, 7, 4, 4), (1, 2, 1, 1))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    _, y = build(model)
    check(y, backend, inplace, folded=["bn/bn"])


def _forked(channel_last):
    """A BN after a ReLU (it cannot go back), read by four functions: a layer, a slice of channels
    then a layer, a scale then a layer, a flatten then an Affine. Channel-last, the layers are
    Affines over the last axis (NNabla's CPU convolution is channel-first only)."""
    shape = (2, 6, 6, 3) if channel_last else (2, 3, 6, 6)
    axis = 3 if channel_last else 1
    x = nn.Variable(shape)
    h = PF.batch_normalization(F.relu(x), axes=[axis], name="bn", **BN)
    start, stop = [0] * 4, list(shape)
    start[axis] = 1

    def layer(v, n, k, name):
        if channel_last:
            return PF.affine(v, n, base_axis=3, name=name)
        return PF.convolution(v, n, (k, k), name=name)
    a = layer(h, 4, 1, "a")
    b = layer(F.slice(h, start, stop), 2, 3, "b")
    c = layer(F.mul_scalar(h, -1.5), 2, 2, "c")
    d = PF.affine(F.reshape(h, (2, 108)), 3, name="fc")
    return x, [F.relu(a), F.relu(b), c, d]


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_forking_into_several_layers(backend, inplace, channel_last):
    # forward, to every reader: each layer takes the map over the channels it reads
    def model():
        x, ys = _forked(channel_last)
        return [x], ys
    _, y = build(model)
    res = check(y, backend, inplace)
    assert sorted(res.plan.folded_maps)[1] == "bn/bn" and \
        sorted(res.plan.folded_maps)[0].startswith("MulScalar(-1.5)")
    assert sorted((s.kind, s.side) for s in res.folded) == (
        [("Affine", "input")] * 4 if channel_last else
        [("Affine", "input")] + [("Convolution", "input")] * 3)
    assert bn_count(res.outputs) == 0


def test_bn_forking_into_several_layers_in_a_file(tmp_path):
    def model():
        x, ys = _forked(False)
        return [x], F.concatenate(*[F.reshape(v, (2, -1)) for v in ys], axis=1)
    (x,), y = build(model)
    assert _folds_in_a_file(tmp_path, x, y)["folded_count"] == 1


@pytest.mark.parametrize("paths", ["twice", "reordered", "a BN on one, a BN after"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_reaching_one_layer_by_two_paths(backend, inplace, paths):
    # forward by both inputs of a concatenation into one layer: the paths join there, each over
    # its own channels (a BN after the join: composed by one path, passed by the other, applied
    # after both)
    def model():
        x = nn.Variable((2, 4, 6, 6))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a, b = F.slice(h, (0, 1, 0, 0), (2, 4, 6, 6)), F.slice(h, (0, 0, 0, 0), (2, 1, 6, 6))
        if paths == "twice":
            j = F.concatenate(h, h, axis=1)
        elif paths == "reordered":
            j = F.concatenate(a, b, axis=1)
        else:
            j = F.concatenate(PF.batch_normalization(a, name="bn1", **BN), b, axis=1)
            j = PF.batch_normalization(j, name="bn2", **BN)
        return [x], PF.convolution(j, 3, (1, 1), name="c")
    _, y = build(model)
    more = ["bn1/bn", "bn2/bn"] if "after" in paths else []
    res = check(y, backend, inplace, folded=["bn/bn"] + more)
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "input")]


@pytest.mark.parametrize("reader", ["sigmoid", "max pooling", "zero padding", "graph output",
                                    "outside the graph"])
def test_bn_forking_where_one_reader_stops_the_map_stays(backend, reader):
    # the map goes to every reader or to none; the reason names the reader that stops it
    held = []

    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a = PF.convolution(h, 4, (1, 1), name="a")
        if reader == "sigmoid":
            return [x], [a, F.sigmoid(h)]
        if reader == "max pooling":   # a negative scale (build makes some) turns max into min
            return [x], [a, PF.convolution(F.max_pooling(h, (2, 2)), 2, (1, 1), name="b")]
        if reader == "zero padding":
            return [x], [a, PF.convolution(h, 2, (3, 3), pad=(1, 1), name="b")]
        if reader == "graph output":
            return [x], [a, h]
        held.append(F.sigmoid(h))   # a function the caller holds, outside the graph folded
        return [x], [a, PF.convolution(h, 2, (1, 1), name="b")]
    _, y = build(model)
    res = check(y, backend, kept=["bn/bn"])
    why = res.skipped[0].reason
    expected = {"sigmoid": "its output feeds 2 function inputs, and reader 2 (Sigmoid) does not "
                           "take the map: the function after it is Sigmoid",
                "max pooling": "reader 2 (MaxPooling) does not take the map",
                "zero padding": "reader 2 (Convolution) does not take the map: the Convolution "
                                "after it zero-pads",
                "graph output": "its output is also a graph output",
                "outside the graph": "its output also feeds 1 function input(s) outside the graph",
                }[reader]
    assert expected in why, why


def _parts(parts, reader=None, bn_first=False):
    """A convolution's output (``bn_first``: then a BN) sliced into channel groups (``parts``:
    (start, stop, step)), a BN on each group but the last (a ReLU there), the groups concatenated;
    ``reader``: another slice (start, stop, step) read by a Sigmoid."""
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 8, (3, 3), pad=(1, 1), name="c")
    if bn_first:
        h = PF.batch_normalization(h, name="bn", **BN)
    cut = [F.slice(h, (0, a, 0, 0), (2, b, 6, 6), (1, k, 1, 1)) for a, b, k in parts]
    out = [PF.batch_normalization(p, name=f"bn{i}", **BN) for i, p in enumerate(cut[:-1])]
    ys = [F.relu(F.concatenate(*out, F.relu(cut[-1]), axis=1))]
    if reader is not None:
        a, b, k = reader
        ys.append(F.sigmoid(F.slice(h, (0, a, 0, 0), (2, b, 6, 6), (1, k, 1, 1))))
    return [x], ys


@pytest.mark.parametrize("parts", [((0, 3, 1), (3, 5, 1), (5, 8, 1)),
                                   ((0, 8, 2), (1, 8, 4), (3, 8, 4))])
@pytest.mark.parametrize("bn_first", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_layer_output_in_parts_each_with_its_bn(backend, inplace, parts, bn_first):
    # each BN goes back to the layer over its own channels (groups of adjacent channels, or
    # interleaved); the other parts read channels it leaves alone; the layer takes all in one call
    # (a BN before the parts first: each part's BN applies after it)
    _, y = build(lambda: _parts(parts, bn_first=bn_first))
    res = check(y, backend, inplace, folded=["bn0/bn", "bn1/bn"] + ["bn/bn"] * bn_first)
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "output")]


def test_layer_output_in_parts_each_with_its_bn_in_a_file(tmp_path):
    (x,), y = build(lambda: _parts(((0, 3, 1), (3, 5, 1), (5, 8, 1))))
    assert _folds_in_a_file(tmp_path, x, y[0])["folded_count"] == 2


@pytest.mark.parametrize("overlap", [True, False])
def test_layer_output_in_parts_read_elsewhere(backend, overlap):
    # another slice reading channels a BN changes keeps that BN; one reading others does not
    reader = (2, 3, 1) if overlap else (5, 7, 1)
    _, y = build(lambda: _parts(((0, 3, 1), (3, 5, 1), (5, 8, 1)), reader))
    res = check(y, backend, folded=["bn1/bn"] if overlap else ["bn0/bn", "bn1/bn"],
                kept=["bn0/bn"] if overlap else [])
    if overlap:
        assert "the input of Slice also feeds 3 other function input(s)" in res.skipped[0].reason


@pytest.mark.parametrize("join", ["concatenate", "reordered", "add", "bn on one part",
                                  "bn before and on one part"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_parts_of_a_layer_output_joined_again_then_bn(backend, inplace, join):
    # the BN after the join goes back to the layer by every part, each branch over its own
    # channels, the branches joining there (a BN before the parts: composed by one branch, passed
    # by the other); the parts must not overlap
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 6, (3, 3), pad=(1, 1), name="c")
        if join == "bn before and on one part":
            h = PF.batch_normalization(h, name="bn1", **BN)
        a = F.slice(h, (0, 0, 0, 0), (2, 3, 6, 6))
        b = F.slice(h, (0, 3, 0, 0), (2, 6, 6, 6))
        if join == "add":
            j = F.add2(a, b)
        elif join == "reordered":
            j = F.concatenate(b, a, axis=1)
        else:
            if join != "concatenate":
                a = PF.batch_normalization(a, name="bn0", **BN)
            j = F.concatenate(a, b, axis=1)
        return [x], F.relu(PF.batch_normalization(j, name="bn", **BN))
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"] + ["bn0/bn"] * ("one part" in join) +
                ["bn1/bn"] * ("before" in join))
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "output")]


@pytest.mark.parametrize("before", ["MulScalar", "BN over another axis"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_map_before_the_parts_of_a_layer_output(backend, inplace, before):
    # the first part's walk composes the map before the parts into the layer (a scalar's term
    # covers every channel; a BN over another axis widens the channels to two axes); the other
    # parts pass it and join there, in the same call
    def model():
        if before == "MulScalar":
            x = nn.Variable((2, 3, 6, 6))
            h = F.mul_scalar(PF.convolution(x, 8, (3, 3), name="c"), -2.0)
            cut = [((0, 0, 0, 0), (2, 4, 4, 4)), ((0, 4, 0, 0), (2, 8, 4, 4))]
            axes = [1]
        else:
            x = nn.Variable((2, 5))
            h = PF.batch_normalization(PF.affine(x, (4, 4), name="fc"), axes=[1], name="bnA", **BN)
            cut = [((0, 0, 0), (2, 4, 2)), ((0, 0, 2), (2, 4, 4))]
            axes = [2]
        return [x], [PF.batch_normalization(F.slice(h, a, b), axes=axes, name=f"b{i}", **BN)
                     for i, (a, b) in enumerate(cut)]
    _, y = build(model)
    res = check(y, backend, inplace)
    assert len(res.folded) == 1 and not res.skipped
    assert {"b0/bn", "b1/bn"} <= set(res.plan.folded_maps)


def test_overlapping_parts_joined_again_keep_the_bn(backend):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 6, (3, 3), pad=(1, 1), name="c")
        j = F.add2(F.slice(h, (0, 0, 0, 0), (2, 4, 6, 6)), F.slice(h, (0, 2, 0, 0), (2, 6, 6, 6)))
        return [x], F.relu(PF.batch_normalization(j, name="bn", **BN))
    _, y = build(model)
    res = check(y, backend, kept=["bn/bn"])
    assert "also feeds 1 other function input(s)" in res.skipped[0].reason


def _split_stack(groups, axis=1, bn_first=False):
    """A convolution's output (``bn_first``: then a BN) split along ``axis`` into every index and
    stacked back in ``groups`` (lists of indices), as older NNabla ONNX importers made an ONNX
    Split; a BN over the channels on each group but the last (a ReLU there), concatenated."""
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 8, (3, 3), pad=(1, 1), name="c")
    if bn_first:
        h = PF.batch_normalization(h, name="bn", **BN)
    outs = F.split(h, axis=axis)
    parts = [F.stack(*[outs[i] for i in g], axis=axis) for g in groups]
    done = [PF.batch_normalization(p, name=f"bn{i}", **BN) for i, p in enumerate(parts[:-1])]
    return [x], F.relu(F.concatenate(*done, F.relu(parts[-1]), axis=axis))


@pytest.mark.parametrize("bn_first", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_split_and_stack_of_channels_each_with_its_bn(backend, inplace, bn_first):
    # a Stack of consecutive outputs of a Split along the same axis is a slice of its input
    _, y = build(lambda: _split_stack([[0, 1, 2], [3, 4], [5, 6, 7]], bn_first=bn_first))
    res = check(y, backend, inplace, folded=["bn0/bn", "bn1/bn"] + ["bn/bn"] * bn_first)
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "output")]


def test_split_and_stack_of_channels_in_a_file(tmp_path):
    (x,), y = build(lambda: _split_stack([[0, 1, 2], [3, 4], [5, 6, 7]]))
    assert _folds_in_a_file(tmp_path, x, y)["folded_count"] == 2


@pytest.mark.parametrize("groups", [[[0, 1], [2, 3, 4], [5]], [[0, 1, 2, 3, 4, 5]],
                                    [[1, 0], [2, 3, 4, 5]]])
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_then_split_and_stack_of_channels_into_layers(backend, inplace, groups):
    # forward: each Stack of consecutive outputs in order is a slice of the BN's output, and its
    # layer takes the map over those channels; out of order, the BN stays
    def model():
        x = nn.Variable((2, 6, 5, 5))
        outs = F.split(PF.batch_normalization(F.relu(x), name="bn", **BN), axis=1)
        return [x], [PF.convolution(F.stack(*[outs[i] for i in g], axis=1), 2, (1, 1),
                                    name=f"c{j}") for j, g in enumerate(groups)]
    _, y = build(model)
    in_order = all(g == list(range(g[0], g[0] + len(g))) for g in groups)
    res = check(y, backend, inplace, folded=["bn/bn"] if in_order else [],
                kept=[] if in_order else ["bn/bn"])
    if in_order:
        assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "input")] * len(groups)
    else:
        assert "the function after it is Split: it removes an axis, and a Stack joins its " \
               "outputs other than as consecutive ones in order" in res.skipped[0].reason


@pytest.mark.parametrize("case", ["not in order", "along space"])
def test_split_and_stack_that_is_no_slice_of_the_channels_keeps_the_bn(backend, case):
    # out of order, the Stack is no slice; along another axis, the map covers what the other
    # outputs read
    if case == "not in order":
        groups, axis, why = [[1, 0, 2], [3, 4, 5, 6, 7]], 1, \
            "the function before it is Stack: it adds an axis, other than as consecutive outputs"
    else:
        groups, axis, why = [[0, 1, 2], [3, 4, 5]], 2, \
            "the Split before it has other outputs, which read what the map would change"
    _, y = build(lambda: _split_stack(groups, axis))
    res = check(y, backend, kept=["bn0/bn"])
    assert why in res.skipped[0].reason, res.skipped[0].reason


@pytest.mark.parametrize("scalar", ["MulScalar", "AddScalar", "Mul2", "one-channel BN"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_uniform_map_then_concatenate_covers_its_own_input_only(backend, inplace, scalar):
    # a map with one value for every element, moved forward through a concatenation: the other
    # input's channels take no map
    def model():
        x = nn.Variable((2, 4, 3, 3))
        h = F.relu(x)
        if scalar == "MulScalar":
            h = F.mul_scalar(h, -2.5)
        elif scalar == "AddScalar":
            h = F.add_scalar(h, 1.5)
        elif scalar == "Mul2":
            h = F.mul2(h, nn.parameter.get_parameter_or_create("k", (1, 1, 1, 1)))
        else:
            h = F.reshape(PF.batch_normalization(F.reshape(h, (2, 36, 1)), axes=[2], name="bn", **BN),
                          (2, 4, 3, 3))
        return [x], PF.convolution(F.concatenate(h, F.relu(-x), axis=1), 5, (1, 1), name="c")
    _, y = build(model)
    res = check(y, backend, inplace)
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "input")]


@pytest.mark.parametrize("inplace", INPLACE)
def test_one_channel_bn_through_reshape_and_transpose(backend, inplace):
    # a BN over an axis of size 1 is one map for every element: it moves as a scalar does
    def model():
        x = nn.Variable((2, 3, 3, 3))
        h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        h = F.reshape(F.transpose(h, (0, 2, 3, 1)), (2, 9, 4, 1))
        a = PF.batch_normalization(h, axes=[3], name="bn1", **BN)
        h = PF.batch_normalization(F.relu(F.reshape(a, (2, 4, 9, 1))), axes=[3], name="bn2", **BN)
        h = F.transpose(F.reshape(h, (2, 4, 3, 3)), (0, 1, 3, 2))
        return [x], PF.convolution(h, 4, (1, 1), name="c2")
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn1/bn", "bn2/bn"])
    assert sorted((s.kind, s.side) for s in res.folded) == [("Convolution", "input"),
                                                           ("Convolution", "output")]


def _onnx_linear(x, rows, name, bias_reader=None, beta=1.0):
    """A Linear as NNabla's ONNX importer builds it: Reshape -> BatchMatmul -> Reshape, then Add2
    of its bias, reshaped (``beta`` != 1: first scaled by MulScalar(beta), an ONNX Gemm's beta)."""
    w = nn.parameter.get_parameter_or_create(f"{name}_W", (x.shape[1], rows))
    b = nn.parameter.get_parameter_or_create(f"{name}_b", (rows,))
    h = F.batch_matmul(F.reshape(x, (1,) + x.shape), F.reshape(w, (1,) + w.shape))
    bias = b if beta == 1.0 else F.mul_scalar(b, beta)
    return F.add2(F.reshape(h, (x.shape[0], rows)), F.reshape(bias, (1, rows))), b


@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("rank, chain", [(2, False), (3, False), (2, True)])
def test_onnx_linear_without_bias_then_bn_gets_a_bias(backend, inplace, rank, chain):
    # PyTorch's Linear(bias=False) -> BatchNorm1d (projection heads) as NNabla's ONNX importer
    # builds it: the product takes the BN's scale, and the BN becomes the add of a new bias (of
    # two BNs in a row, the last, with the shift of both)
    def model():
        x = nn.Variable((4, 5))
        w = nn.parameter.get_parameter_or_create("p_W", (5, 6))
        h = F.batch_matmul(F.reshape(x, (1, 4, 5)), F.reshape(w, (1, 5, 6)))
        h = F.reshape(h, (4, 6) if rank == 2 else (4, 6, 1))
        if chain:
            h = PF.batch_normalization(h, name="bn0", **BN)
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"] + ["bn0/bn"] * chain)
    assert function_types(res.outputs) == ["Reshape", "Reshape", "BatchMatmul", "Reshape", "Add2",
                                           "ReLU"]
    params = nn.get_parameters(grad_only=False)
    assert "bn/bn/bias" in params and params["bn/bn/bias"].shape == (1, 6) + (1,) * (rank - 2)


@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("after", [None, "bn", "scale", "shift"])
def test_bn_then_onnx_linear_without_bias_gets_a_bias(backend, inplace, transpose_b, after):
    # BatchNorm1d -> Linear(bias=False): the matrix takes the scale, and an add of a new bias
    # (W t) follows the product; with a BN after the Linear too, that BN becomes the add, its bias
    # holding both shifts; a scale after it scales the new bias too; all in one call. A shift
    # after it would need the same new bias: the BN before stays (a second call finds no more)
    def model():
        x = nn.Variable((4, 5))
        w = nn.parameter.get_parameter_or_create("p_W", (6, 5) if transpose_b else (5, 6))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        h = F.batch_matmul(F.reshape(h, (1, 4, 5)), F.reshape(w, (1,) + w.shape),
                           transpose_b=transpose_b)
        h = F.reshape(h, (4, 6))
        if after == "bn":
            h = PF.batch_normalization(h, name="bn2", **BN)
        elif after == "scale":
            h = F.mul_scalar(h, -1.5)
        elif after == "shift":
            h = F.add_scalar(h, 0.5)
        return [x], F.relu(h)
    _, y = build(model)
    if after == "shift":
        res = check(y, backend, inplace, kept=["bn/bn"])
        assert "a map after it needs one too" in res.skipped[0].reason
        return
    folded = ["bn/bn"] + {None: [], "bn": ["bn2/bn"], "scale": ["MulScalar(-1.5) #6"]}[after]
    res = check(y, backend, inplace, folded=folded)
    adds = function_types(res.outputs).count("Add2")
    assert adds == 1


@pytest.mark.parametrize("scalar", [(1,), ()])
def test_onnx_linear_with_one_bias_value_keeps_the_bn_and_folds_the_rest(backend, scalar):
    # a Gemm whose bias is one value for all outputs ((1,) or 0-d): its add cannot take a shift
    # per output, so the BN after it stays (and the one before the next Linear); the others fold
    def model():
        x = nn.Variable((4, 5))
        w = nn.parameter.get_parameter_or_create("g_W", (5, 6))
        b = nn.parameter.get_parameter_or_create("g_b", scalar)
        h = F.batch_matmul(F.reshape(x, (1, 4, 5)), F.reshape(w, (1, 5, 6)))
        h = F.add2(F.reshape(h, (4, 6)), F.reshape(b, (1, 1)))
        a = PF.batch_normalization(h, name="bn", **BN)
        c = PF.batch_normalization(PF.affine(x, 3, name="fc"), name="bn2", **BN)
        return [x], [F.relu(a), F.relu(c)]
    _, ys = build(model)
    res = check(ys, backend, folded=["bn2/bn"], kept=["bn/bn"])
    assert "the add after the BatchMatmul adds one value to all its outputs, not one per output" \
        in res.skipped[0].reason


@pytest.mark.parametrize("beta", [2.0, -0.5])
@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("bns", ["after", "before", "both"])
def test_onnx_gemm_with_beta_and_bns(backend, inplace, beta, bns):
    # the add reads beta * b: a BN's shift goes into b divided by beta (after the Gemm: its own;
    # before: the matrix times it), the MulScalar stays
    def model():
        x = nn.Variable((3, 5))
        h = F.relu(x)
        if bns != "after":
            h = PF.batch_normalization(h, name="bn0", **BN)
        y, _ = _onnx_linear(h, 4, "fc", beta=beta)
        if bns != "before":
            y = PF.batch_normalization(y, name="bn", **BN)
        return [x], F.relu(y)
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn0/bn"] * (bns != "after") +
                ["bn/bn"] * (bns != "before"))
    assert ("BatchMatmul", "output") in [(s.kind, s.side) for s in res.folded] or bns == "before"
    assert function_types(res.outputs).count("MulScalar") == 1


def test_onnx_gemm_with_beta_and_no_bn_is_left_as_it_was():
    def model():
        x = nn.Variable((3, 5))
        return [x], F.relu(_onnx_linear(x, 4, "fc", beta=3.0)[0])
    _, y = build(model)
    assert bnfold_gpu.plan(y).folds == ()


@pytest.mark.parametrize("inplace", INPLACE)
def test_add_of_a_scaled_stored_constant_is_a_map(backend, inplace):
    # conv -> Add2(h, MulScalar(c, 3)) -> BN: the add is a map of shift 3 * c, composed
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 4, (3, 3), name="c")
        c = nn.parameter.get_parameter_or_create("k", (1, 4, 1, 1))
        h = F.add2(h, F.mul_scalar(c, 3.0))
        return [x], F.relu(PF.batch_normalization(h, name="bn", **BN))
    _, y = build(model)
    res = check(y, backend, inplace)
    assert [(s.kind, s.side) for s in res.folded] == [("Convolution", "output")]
    assert sorted(res.plan.folded_maps) == ["Add2(3 * k)", "bn/bn"]


@pytest.mark.parametrize("bias_read_elsewhere", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_onnx_linear_then_bn_rewires_its_reshaped_bias(backend, inplace, bias_read_elsewhere):
    # the map's shift goes into the bias behind its Reshape: a folded copy of the bias (inplace=False,
    # or a bias another function reads) must be what the rebuilt Reshape reads
    def model():
        x = nn.Variable((3, 8))
        h, b = _onnx_linear(x, 6, "fc")
        outputs = [PF.batch_normalization(h, name="bn", **BN)]
        if bias_read_elsewhere:
            outputs.append(F.mul_scalar(b, 2.0))
        return [x], outputs
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn"])
    copied = not inplace or bias_read_elsewhere
    assert ("fc_b_folded" in res.parameters) == copied


@pytest.mark.parametrize("bn_after", [False, True])
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_then_two_onnx_linears(backend, inplace, bn_after):
    # the first Linear's bias add takes the BN's shift and stays that Linear's bias: one call folds
    # everything, a second finds nothing
    def model():
        x = nn.Variable((3, 8))
        h = PF.batch_normalization(F.relu(x), name="bn1", **BN)
        h, _ = _onnx_linear(h, 6, "fc1")
        h, _ = _onnx_linear(h, 5, "fc2")
        return [x], PF.batch_normalization(h, name="bn2", **BN) if bn_after else h
    _, y = build(model)
    before = forward_all(y)
    res = bnfold_gpu.fold(y, backend=backend, inplace=inplace)
    assert rel_err(forward_all(res.outputs)[0], before[0]) < 1e-5
    assert bn_count(res.outputs) == 0 and not res.skipped
    again = bnfold_gpu.plan(res.outputs, inplace=inplace)
    assert again.folds == () and not again.skipped


@pytest.mark.parametrize("rows", [6, 1])
@pytest.mark.parametrize("between", [None, "MulScalar", "Mul2", "BN"])
def test_onnx_linears_keep_their_biases(backend, between, rows):
    # an ONNX Linear's bias add is part of the Linear, not a map to move into the next one: a plain
    # MLP folds nothing, and a map between two Linears folds into the first (its matrix and bias);
    # a Linear of one output has a bias of one value, added to all its rows
    def model():
        x = nn.Variable((3, 8))
        h, _ = _onnx_linear(F.relu(x), rows, "fc1")
        if between == "MulScalar":
            h = F.mul_scalar(h, -1.7)
        elif between == "Mul2":
            h = F.mul2(h, nn.parameter.get_parameter_or_create("s", (1, rows)))
        elif between == "BN":
            h = PF.batch_normalization(h, name="bn", **BN)
        h, _ = _onnx_linear(h, 5, "fc2")
        h, _ = _onnx_linear(h, 4, "fc3")
        return [x], h
    _, y = build(model)
    params = {k: v.d.copy() for k, v in nn.get_parameters(grad_only=False).items()}
    before = forward_all(y)
    res = bnfold_gpu.fold(y, backend=backend)
    assert rel_err(forward_all(res.outputs)[0], before[0]) < 1e-5
    if between is None:
        assert res.folded == () and res.parameters == {}
        for k, v in nn.get_parameters(grad_only=False).items():
            assert np.array_equal(v.d, params[k]), k
    else:
        assert {s.weight for s in res.plan.folds} - {None} == {"fc1_W"}
    assert bnfold_gpu.plan(res.outputs).folds == ()
    assert function_types(res.outputs).count("Add2") == 3


@pytest.mark.parametrize("after", ["BN", "Mul2", "MulScalar"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_onnx_linear_of_one_output_then_a_map(backend, inplace, after):
    # the bias add holds one value, the map one channel: both uniform, the shift stays in the add
    def model():
        x = nn.Variable((2, 4))
        h, _ = _onnx_linear(x, 1, "fc")
        if after == "BN":
            return [x], PF.batch_normalization(h, name="bn", **BN)
        if after == "Mul2":
            return [x], F.mul2(h, nn.parameter.get_parameter_or_create("k", (1, 1)))
        return [x], F.mul_scalar(h, -3.0)
    _, y = build(model)
    res = check(y, backend, inplace)
    assert len(res.plan.folded_maps) == 1


@pytest.mark.parametrize("layer", ["Convolution", "Affine", "ONNX Linear"])
@pytest.mark.parametrize("after", ["MulScalar", "Mul2"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_layer_without_bias_between_a_bn_and_a_scale(backend, inplace, layer, after):
    # the BN's shift gives the layer a bias, which the scale after the layer scales too
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        if layer == "Convolution":
            h = PF.convolution(h, 4, (1, 1), with_bias=False, name="c")
            shape = (1, 4, 1, 1)
        elif layer == "Affine":
            h = PF.affine(h, 4, with_bias=False, name="fc")
            shape = (1, 4)
        else:
            h, _ = _onnx_linear(F.reshape(h, (2, 75)), 4, "fc")
            shape = (1, 4)
        if after == "MulScalar":
            return [x], F.mul_scalar(h, -1.75)
        return [x], F.mul2(h, nn.parameter.get_parameter_or_create("k", shape))
    _, y = build(model)
    res = check(y, backend, inplace)
    assert len(res.plan.folded_maps) == 2


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("inplace", INPLACE)
def test_pointwise_deconvolution_takes_a_shift(backend, inplace, with_bias):
    # a 1x1 deconvolution of stride 1 gives each output one input through its whole kernel: the
    # map's shift goes into its bias as into a convolution's; a 2x2 stride-2 one sums different
    # taps per output and keeps a BN with a shift
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        a = PF.deconvolution(h, 4, (1, 1), with_bias=with_bias, name="d")
        b = PF.deconvolution(PF.batch_normalization(F.relu(x), name="bn2", **BN), 4, (2, 2),
                             stride=(2, 2), name="d2")
        return [x], [a, b]
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn"], kept=["bn2/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Deconvolution", "input")]
    assert "adds each input through different kernel taps (or none) at different outputs" in \
        res.skipped[0].reason


@pytest.mark.parametrize("inplace", INPLACE)
def test_weights_sharing_one_array_are_not_rescaled_in_place(backend, inplace):
    # two variables over one array (w2.data = w.data): the layer without a BN keeps its weights
    def model():
        x = nn.Variable((2, 3, 6, 6))
        y1 = PF.batch_normalization(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="a"), name="bn",
                                    **BN)
        w = nn.get_parameters()["a/conv/W"]
        w2 = nn.Variable(w.shape)
        w2.data = w.data
        return [x], [y1, F.convolution(x, w2, None, pad=(1, 1))]
    _, ys = build(model)
    res = check(ys, backend, inplace, folded=["bn/bn"])
    assert "a/conv/W_folded" in res.parameters
    assert "shared" in res.folded[0].note


# -- maps that compose, layers on both sides --------------------------------------------------------
@pytest.mark.parametrize("inplace", INPLACE)
def test_bn_affine_bn_in_one_call(backend, inplace):
    def model():
        x = nn.Variable((2, 5))
        h = PF.batch_normalization(F.relu(x), name="bn1", **BN)
        return [x], PF.batch_normalization(PF.affine(h, 4, name="fc"), name="bn2", **BN)
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn1/bn", "bn2/bn"])
    assert [(s.bn, s.side) for s in res.folded] == [("bn1/bn", "input"), ("bn2/bn", "output")]


@pytest.mark.parametrize("inplace", INPLACE)
def test_conv_bn_relu_free_bn_chain_into_both_sides(backend, inplace):
    # conv -> BN -> BN -> conv -> BN -> BN: each layer takes what is next to it, both sides
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 4, (3, 3), name="c1")
        h = PF.batch_normalization(PF.batch_normalization(h, name="bn1", **BN), name="bn2", **BN)
        h = PF.convolution(F.relu(h), 5, (1, 1), with_bias=False, name="c2")
        h = PF.batch_normalization(PF.batch_normalization(h, name="bn3", **BN), name="bn4", **BN)
        return [x], h
    _, y = build(model)
    check(y, backend, inplace, folded=["bn1/bn", "bn2/bn", "bn3/bn", "bn4/bn"])


@pytest.mark.parametrize("inplace", INPLACE)
def test_fused_bn_composes_with_the_bn_before_it(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.batch_normalization(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c"), name="bn1", **BN)
        z = F.relu(x[:, :1] * 2.0)
        return [x], PF.fused_batch_normalization(h, F.broadcast(z, (2, 4, 6, 6)), name="bn2", **BN)
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn1/bn", "bn2/bn"])
    assert function_types(res.outputs).count("ReLU") == 2


@pytest.mark.parametrize("scale, folds", [(1.75, True), (-1.75, False)])
@pytest.mark.parametrize("inplace", INPLACE)
def test_scale_after_a_fused_bn_passes_its_relu(backend, inplace, scale, folds):
    # relu(BN(x)) * s == relu(s * BN(x)) for s >= 0: both fold into the layer, the ReLU stays
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.fused_batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
        return [x], F.mul_scalar(h, scale)
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn", "MulScalar(1.75) #2"] if folds else ["bn/bn"])
    assert function_types(res.outputs) == ["Convolution", "ReLU"] + ([] if folds else ["MulScalar"])


def _folds_in_a_file(tmp_path, x, y, fmt=".h5"):
    """``y`` saved as a .nnp file and folded by ``bnfold fold --verify``; returns the report."""
    import json
    from nnabla.utils.save import save
    from bnfold_gpu import cli
    path, out, report = tmp_path / "m.nnp", tmp_path / "o.nnp", tmp_path / "r.json"
    save(str(path), {"networks": [{"name": "net", "batch_size": 2, "outputs": {"y": y},
                                   "names": {"x": x}}],
                     "executors": [{"name": "runtime", "network": "net", "data": ["x"],
                                    "output": ["y"]}]}, parameter_format=fmt)
    assert cli.main([str(a) for a in ("fold", path, "-o", out, "--verify", "--report", report,
                                      "-q")]) == 0
    return json.loads(report.read_text())


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_scale_after_a_fused_bn_in_a_file(tmp_path, fmt):
    # the scale's output is the executor's: the fused BN's ReLU writes it
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.fused_batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
        return [x], F.mul_scalar(h, 1.75)
    (x,), y = build(model)
    report = _folds_in_a_file(tmp_path, x, y, fmt)
    assert report["networks"]["net"]["folded"] and report["verify"]["outputs"]


@pytest.mark.parametrize("group, with_bias", [(2, True), (3, False)])
@pytest.mark.parametrize("inplace", INPLACE)
def test_grouped_pointwise_deconvolution_takes_a_shift(backend, inplace, group, with_bias):
    # each output of a grouped 1x1 deconvolution of stride 1 sums the inputs of its own group: the
    # shift goes into its bias group by group
    def model():
        x = nn.Variable((2, 6, 5, 5))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        return [x], PF.deconvolution(h, 4 * group, (1, 1), group=group, with_bias=with_bias,
                                     name="d")
    _, y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert [(s.kind, s.side) for s in res.folded] == [("Deconvolution", "input")]


@pytest.mark.parametrize("group", [1, 3])
def test_pointwise_deconvolution_and_mean_in_a_file(tmp_path, group):
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = PF.deconvolution(PF.batch_normalization(F.relu(x), name="bn", **BN), 6, (1, 1),
                             group=group, with_bias=False, name="d")
        h = PF.batch_normalization(F.mean(PF.convolution(h, 3, (3, 3), name="c"), axis=(2, 3)),
                                   name="bn2", **BN)
        return [x], F.relu(h)
    (x,), y = build(model)
    report = _folds_in_a_file(tmp_path, x, y)
    assert report["folded_count"] == 2 and report["kept_count"] == 0


@pytest.mark.parametrize("scalar", ["MulScalar", "one-channel BN"])
def test_uniform_map_then_concatenate_in_a_file(tmp_path, scalar):
    def model():
        x = nn.Variable((2, 4, 3, 3))
        h = F.relu(x)
        if scalar == "MulScalar":
            h = F.mul_scalar(h, -2.5)
        else:
            h = F.reshape(PF.batch_normalization(F.reshape(h, (2, 36, 1)), axes=[2], name="bn", **BN),
                          (2, 4, 3, 3))
        return [x], PF.convolution(F.concatenate(h, F.relu(-x), axis=1), 5, (1, 1), name="c")
    (x,), y = build(model)
    assert _folds_in_a_file(tmp_path, x, y)["verify"]["outputs"]


@pytest.mark.parametrize("inplace", INPLACE)
def test_self_folding_modifier_leftovers(backend, inplace):
    # what NNabla's SelfFoldingModifier leaves: Mul2 and Add2 by per-channel parameters; and scalars
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.convolution(x, 4, (3, 3), with_bias=False, name="c")
        s = nn.parameter.get_parameter_or_create("fold/scale", (1, 4, 1, 1))
        t = nn.parameter.get_parameter_or_create("fold/shift", (1, 4, 1, 1))
        h = F.add2(F.mul2(h, s), t)
        h = F.relu(h) * 0.5 + 0.25
        return [x], PF.convolution(h, 2, (1, 1), name="c2")
    _, y = build(model)
    res = check(y, backend, inplace)
    assert sorted(m.split(" #")[0] for m in res.plan.folded_maps) == [
        "Add2(fold/shift)", "AddScalar(0.25)", "Mul2(fold/scale)", "MulScalar(0.5)"]
    assert function_types(res.outputs) == ["Convolution", "ReLU", "Convolution"]


@pytest.mark.parametrize("fmt", [".h5", ".protobuf"])
def test_constants_behind_reshapes_leave_the_file_with_their_maps(tmp_path, fmt):
    # a per-channel constant stored flat and reshaped in the graph (as ONNX's importer feeds
    # initializers): once its multiply is folded, its reshape and the parameter go too
    from bnfold_gpu.nnp import read

    def model():
        x = nn.Variable((2, 3, 6, 6))
        k = nn.parameter.get_parameter_or_create("k", (3,))
        t = nn.parameter.get_parameter_or_create("t", (3,))
        h = F.add2(F.mul2(F.relu(x), F.reshape(k, (1, 3, 1, 1))), F.reshape(t, (1, 3, 1, 1)))
        return [x], PF.convolution(h, 2, (1, 1), name="c")
    (x,), y = build(model)
    report = _folds_in_a_file(tmp_path, x, y, fmt)
    assert len(report["networks"]["net"]["folded"]) == 1
    out = read(str(tmp_path / "o.nnp"))
    assert [f.type for f in out.proto.network[0].function] == ["ReLU", "Convolution"]
    assert "c/conv/W" in out.params and not {"k", "t"} & set(out.params)


@pytest.mark.parametrize("shared", ["statistic", "weight", "constant"])
def test_running_statistics_a_training_bn_updates_are_not_constants(backend, shared):
    # a BN on batch statistics updates its running mean and variance as the graph runs: a BN
    # reading one as a statistic, a layer as its weight or a multiply as its constant keeps it
    def model():
        x = nn.Variable((2, 3, 6, 6))
        t = PF.batch_normalization(x, batch_stat=True, name="train")
        mean = nn.get_parameters(grad_only=False)["train/bn/mean"]
        h = PF.convolution(t, 3, (3, 3), pad=(1, 1), name="c")
        if shared == "statistic":
            beta, gamma = (nn.Variable.from_numpy_array(np.full((1, 3, 1, 1), v, np.float32))
                           for v in (0.3, -1.5))
            var = nn.Variable.from_numpy_array(np.full((1, 3, 1, 1), 2.0, np.float32))
            h = F.batch_normalization(h, beta, gamma, mean, var, batch_stat=False)
        elif shared == "weight":   # a 1x1 convolution of 3 channels into 1: weight (1, 3, 1, 1)
            h = F.convolution(PF.batch_normalization(F.relu(h), name="bn", **BN), mean, None)
        else:
            h = F.mul2(h, mean)
        return [x], F.relu(PF.convolution(h, 2, (1, 1), name="c2"))
    (x,), y = build(model)
    values = {k: v.d.copy() for k, v in nn.get_parameters(grad_only=False).items()}

    def run(out):
        for k, v in nn.get_parameters(grad_only=False).items():
            if k in values:
                v.d = values[k]
        out.forward()
        return out.d.copy()
    before = run(y)
    res = bnfold_gpu.fold(y, backend=backend, inplace=False)
    assert rel_err(run(res.outputs), before) < 1e-5
    if shared == "constant":
        assert not res.plan.folded_maps
    else:
        assert any("a running statistic that the BatchNormalization train/bn (batch_stat=True) "
                   "updates" in s.reason for s in res.skipped)


def test_a_bn_applied_twice_is_counted_twice(backend):
    # one BN module on two branches (siamese towers; ONNX nodes sharing initializers): two BNs
    def model():
        x = nn.Variable((2, 3, 5, 5))
        a = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c1"), name="bn", **BN)
        b = PF.batch_normalization(PF.convolution(x, 4, (1, 1), name="c2"), name="bn", **BN)
        c = PF.batch_normalization(F.relu(PF.convolution(x, 4, (1, 1), name="c3")), name="bn",
                                   **BN)
        return [x], [F.relu(a), F.relu(b), F.relu(c)]
    _, ys = build(model)
    planned = bnfold_gpu.plan(ys)
    assert planned.folded_bns == ("bn/bn", "bn/bn (2)")
    assert [s.bn for s in planned.skipped] == ["bn/bn (3)"]
    res = check(ys[:2], backend, folded=["bn/bn", "bn/bn (2)"])
    assert len(res.plan.folded_bns) == 2
    _, ys = build(model)   # naming the module keeps every use of it
    assert [s.bn for s in bnfold_gpu.plan(ys, skip=["bn/bn"]).skipped] == [
        "bn/bn", "bn/bn (2)", "bn/bn (3)"]
    assert [s.bn for s in bnfold_gpu.plan(ys, skip=["bn/bn (2)"]).skipped] == [
        "bn/bn (2)", "bn/bn (3)"]


def test_a_bn_named_like_a_second_use_keeps_a_name_of_its_own():
    # statistics literally named 'bn (2)/...' beside a BN 'bn' applied twice: three names
    nn.clear_parameters()
    x = nn.Variable((4, 5))

    def stats(prefix):
        return [nn.parameter.get_parameter_or_create(f"{prefix}/{k}", (1, 6))
                for k in ("beta", "gamma", "mean", "var")]
    ys = [F.relu(F.batch_normalization(PF.affine(x, 6, name=f"fc{k}"), *stats(prefix),
                                       batch_stat=False))
          for k, prefix in enumerate(["bn", "bn", "bn (2)"])]
    randomize_all(np.random.RandomState(0))
    assert sorted(bnfold_gpu.plan(ys).folded_bns) == ["bn", "bn (2)", "bn (3)"]


def test_a_parameter_without_values_is_named():
    nn.clear_parameters()
    x = nn.Variable((2, 3, 6, 6))
    k = nn.parameter.get_parameter_or_create("k", (1, 3, 1, 1))   # no initializer, never set
    y = PF.convolution(F.mul2(F.relu(x), k), 2, (1, 1), name="c")
    with pytest.raises(bnfold_gpu.FoldError, match="parameter 'k' holds no values"):
        bnfold_gpu.fold(y)
    assert function_types(y) == ["ReLU", "Mul2", "Convolution"]


def test_a_data_input_is_not_a_constant():
    # Mul2 by an unregistered variable: a value fed at run time, not a parameter to fold
    nn.clear_parameters()
    x, gate = nn.Variable((2, 3, 6, 6)), nn.Variable((1, 4, 1, 1))
    y = F.mul2(PF.convolution(x, 4, (3, 3), name="c"), gate)
    randomize_all(np.random.RandomState(0))
    feed(np.random.RandomState(1), x, gate)
    res = check(y, folded=[])
    assert "Mul2" in function_types(res.outputs)


@pytest.mark.parametrize("inplace", INPLACE)
def test_padded_convolution_and_deconvolution_take_a_map_without_shift(backend, inplace):
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = PF.convolution(PF.batch_normalization(F.relu(x), name="bn1", **BN), 4, (3, 3),
                           pad=(1, 1), name="c")
        b = PF.deconvolution(PF.batch_normalization(F.relu(x), name="bn2", **BN), 2, (3, 3),
                             name="d")
        return [x], [a, b]
    _, ys = build(model)
    res = check(ys, backend, inplace, kept=["bn1/bn", "bn2/bn"])
    assert all("shift that is not zero" in s.reason for s in res.skipped)
    _, ys = build(model, shift_free=["bn1", "bn2"])
    res = check(ys, backend, inplace, folded=["bn1/bn", "bn2/bn"])
    assert sorted((s.kind, s.side) for s in res.folded) == [("Convolution", "input"),
                                                           ("Deconvolution", "input")]


def test_skip_patterns_keep_those_bns():
    def model():
        x = nn.Variable((2, 3, 6, 6))
        h = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c1"), name="block1/bn", **BN)
        h = PF.batch_normalization(PF.convolution(F.relu(h), 4, (3, 3), name="c2"), name="block2/bn",
                                   **BN)
        return [x], h
    _, y = build(model)
    res = check(y, skip=["block2/*"], kept=["block2/bn/bn"], folded=["block1/bn/bn"])
    assert res.skipped[0].reason == "skipped on request (matches 'block2/*')"
    _, y = build(model)
    check(y, skip="block1/bn/bn", kept=["block1/bn/bn"], folded=["block2/bn/bn"])


def test_a_skip_pattern_that_matches_no_bn_warns_and_folds_the_rest():
    def model():
        x = nn.Variable((2, 3, 6, 6))
        return [x], PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c1"), name="block1/bn",
                                           **BN)
    _, y = build(model)
    with pytest.warns(bnfold_gpu.SkipPatternWarning,
                      match=r"skip pattern 'blok1/\*' matches no BN of the graph \(their names are "
                            r"like 'block1/bn/bn'\)"):
        plan = bnfold_gpu.plan(y, skip=["blok1/*", "block1/*"])
    assert [s.bn for s in plan.skipped] == ["block1/bn/bn"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a pattern that matches: nothing said
        res = bnfold_gpu.fold(y, backend="numpy", skip="block1/bn/bn")
    assert [s.bn for s in res.skipped] == ["block1/bn/bn"]
    with pytest.warns(bnfold_gpu.SkipPatternWarning, match="'nothing' matches no BN of the graph"):
        res = bnfold_gpu.fold(y, backend="numpy", skip="nothing")
    assert res.folded and not res.skipped


# -- corners of moves and layers ------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["max", "average", "average without the padding", "sum"])
def test_pooling_with_windows_wholly_in_the_padding(backend, pooling):
    # pad >= kernel: NNabla's max pooling computes the windows that cover no input from memory
    # outside them (another channel's, another sample's), so a map moved across would change
    # those outputs: it stops there. Sum and average give them 0 (0 / 0 without the padding
    # counted): exact under their own conditions (a map without shift), so those fold.
    def model():
        x = nn.Variable((2, 3, 4, 4))
        h = PF.convolution(x, 4, (1, 1), name="c")
        if pooling == "max":
            h = F.max_pooling(h, (2, 2), stride=(2, 2), pad=(2, 2))
        elif pooling.startswith("average"):
            h = F.average_pooling(h, (2, 2), stride=(2, 2), pad=(2, 2),
                                  including_pad=pooling == "average")
        else:
            h = F.sum_pooling(h, (2, 2), stride=(2, 2), pad=(2, 2))
        return [x], PF.batch_normalization(h, name="bn", **BN)
    (x,), y = build(model, positive=True, shift_free=["bn"])   # every other condition is met
    if pooling != "max":
        before = forward_all([y])[0]
        res = bnfold_gpu.fold(y, backend=backend)
        np.testing.assert_allclose(forward_all(res.outputs)[0], before, rtol=1e-5, atol=1e-6)
        assert res.plan.folded_maps == ("bn/bn",)
        return
    res = bnfold_gpu.fold(y, backend=backend)
    assert not res.folded and len(res.skipped) == 1
    assert "some of its windows lie wholly in the padding (kernel 2, pad 2)" in \
        res.skipped[0].reason


@pytest.mark.parametrize("inplace", INPLACE)
def test_a_quotient_by_a_constant_holding_zero_stays_and_the_rest_folds(backend, inplace, tmp_path):
    # a Div2 whose constant has a 0 is no map (1 / 0): it stays, a BN after it says why, and the
    # other folds go on (it used to make the whole fold fail, with no way to skip it)
    def model():
        x = nn.Variable((2, 3, 6, 6))
        k = nn.parameter.get_parameter_or_create("k/const", (1, 4, 1, 1))
        a = PF.batch_normalization(F.div2(PF.convolution(x, 4, (3, 3), name="c"), k), name="bn0",
                                   **BN)
        b = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c2"), name="bn", **BN)
        m = F.mul2(PF.convolution(x, 4, (1, 1), name="c3"),
                   nn.parameter.get_parameter_or_create("m/const", (1, 4, 1, 1)))
        return [x], [a, b, m]
    _, ys = build(model)
    params = nn.get_parameters(grad_only=False)
    params["k/const"].d = np.array([1.5, 0.0, -2.0, 3.0]).reshape(1, 4, 1, 1)
    params["m/const"].d = np.array([1.5, np.inf, -2.0, 3.0]).reshape(1, 4, 1, 1)
    before = forward_all(ys)
    res = bnfold_gpu.fold(ys, backend=backend, inplace=inplace)
    for a, b in zip(forward_all(res.outputs), before):   # inf where the graph divides by 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b[np.isfinite(b)]).max())
    assert res.plan.folded_maps == ("bn/bn",) and [s.bn for s in res.skipped] == ["bn0/bn"]
    assert "Div2, which stays: Div2(k/const): it divides by zero" in res.skipped[0].reason
    assert function_types(res.outputs).count("Mul2") == 1   # non-finite constant: stays too


@pytest.mark.parametrize("case", ["depthwise", "depthwise divisor 3, padded", "cropping",
                                  "grouped, cropping"])
@pytest.mark.parametrize("inplace", INPLACE)
def test_pointwise_deconvolutions_that_crop_or_are_depthwise_take_a_shift(backend, inplace, case):
    # a 1x1 stride-1 (depthwise) deconvolution gives each output exactly one input of each of its
    # channels, a padding only cropping the output: the shift goes into the bias (a depthwise
    # one with divisor d sums d consecutive inputs per output)
    def model():
        x = nn.Variable((2, 6, 5, 5))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        pad = (1, 1) if "padded" in case or "cropping" in case else None
        if case.startswith("depthwise"):
            return [x], PF.depthwise_deconvolution(h, (1, 1), divisor=3 if "3" in case else 1,
                                                   pad=pad, name="d")
        return [x], PF.deconvolution(h, 4, (1, 1), pad=pad, group=2 if "grouped" in case else 1,
                                     name="d")
    (x,), y = build(model)
    res = check(y, backend, inplace, folded=["bn/bn"])
    assert [s.side for s in res.folded] == ["input"]


@pytest.mark.parametrize("inplace", INPLACE)
def test_a_one_channel_map_passes_functions_working_along_axis_1(backend, inplace):
    # a one-channel BN is the same map for every element: any axis holds it, not just axis 1,
    # so a mean over the channels, or a reflect padding of a channel-last tensor's rows, does not
    # stop it; a sum over the channels still does where it has a shift
    def model():
        x = nn.Variable((2, 3, 6, 6))
        a = F.mean(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c"), axis=1, keepdims=True)
        a = PF.batch_normalization(a, name="bn", **BN)
        t = F.transpose(PF.convolution(x, 1, (3, 3), name="c2"), (0, 2, 3, 1))   # (2, 4, 4, 1)
        b = PF.batch_normalization(F.pad(t, (1, 1, 1, 1, 0, 0), mode="reflect"), axes=[3],
                                   name="bn2", **BN)
        s = F.sum(PF.convolution(x, 4, (1, 1), name="c3"), axis=1, keepdims=True)
        c = PF.batch_normalization(s, name="bn3", **BN)
        return [x], [F.relu(a), F.relu(b), F.relu(c)]
    _, ys = build(model, seed=2)
    res = check(ys, backend, inplace, folded=["bn/bn", "bn2/bn"], kept=["bn3/bn"])
    assert sorted(s.kind for s in res.folded) == ["Convolution", "Convolution"]


def test_the_summary_counts_constant_maps_apart_from_bns():
    x = nn.Variable((2, 3, 6, 6))
    h = F.mul_scalar(PF.convolution(x, 4, (3, 3), name="c"), 0.5)
    y = F.add_scalar(PF.convolution(h, 4, (3, 3), name="c2"), 0.25)
    table = str(bnfold_gpu.plan(y))
    assert table.splitlines()[-1] == ("0 folded, 0 left in the graph; also folded: 2 multiplies "
                                      "or adds by a constant")


@pytest.mark.parametrize("divisor", [2, 3])
def test_a_depthwise_deconvolution_without_bias_gets_one_per_output(backend, divisor):
    # its outputs are its inputs / divisor: the new bias that takes the shift has that many
    def model():
        x = nn.Variable((2, 6, 4, 4))
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        return [x], PF.depthwise_deconvolution(h, (1, 1), divisor=divisor, with_bias=False,
                                               name="d")
    (x,), y = build(model)
    res = check(y, backend, folded=["bn/bn"])
    assert [tuple(s.bias_shape) for s in res.folded] == [(6 // divisor,)]


@pytest.mark.parametrize("op", ["sub2", "add2"])
def test_a_subtracted_constant_never_holds_a_shift(backend, op):
    # after a Linear without bias (Reshape -> BatchMatmul -> Reshape), an add of a stored constant
    # holds the shift of the maps after it (c * s + t); a subtraction's cannot (it would need
    # c * s - t), so the map after it stays there
    def model():
        x = nn.Variable((4, 5))
        w = nn.parameter.get_parameter_or_create("W", (5, 3))
        c = nn.parameter.get_parameter_or_create("c", (1, 3))
        m = F.reshape(F.batch_matmul(F.reshape(x, (1, 4, 5)), F.reshape(w, (1, 5, 3))), (4, 3))
        h = F.sub2(m, c) if op == "sub2" else F.add2(m, c)
        return [x], F.add_scalar(h, 1.25)
    (x,), y = build(model)
    res = check(y, backend)
    assert function_types(res.outputs).count("AddScalar") == (1 if op == "sub2" else 0)


def test_a_zero_dimensional_value_stops_a_uniform_map():
    x = nn.Variable((4,))
    y = F.mul_scalar(F.split(x, axis=0)[0], 2.0)     # one number, no axis
    out = PF.affine(F.tile(y, [3]), 2, base_axis=0, name="fc")
    build(lambda: ([x], out))
    p = bnfold_gpu.plan(out)
    assert p.folds == () and p.skipped == ()


def test_a_scalar_that_is_not_finite_stays_and_the_rest_folds(backend):
    def model():
        x = nn.Variable((2, 3, 5, 5))
        h = F.relu(F.mul_scalar(PF.convolution(x, 4, (3, 3), name="c"), float("inf")))
        g = F.add_scalar(PF.convolution(x, 4, (3, 3), name="c3"), float("nan"))
        z = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c2"), name="bn", **BN)
        return [x], [h, g, z]
    _, ys = build(model)
    res = bnfold_gpu.fold(ys, backend=backend)
    assert res.plan.folded_maps == ("bn/bn",)
    assert function_types(res.outputs).count("MulScalar") == 1
    assert function_types(res.outputs).count("AddScalar") == 1
