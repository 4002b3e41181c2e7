"""fold() on every graph shape it must handle: folded output == original output on random inputs with
randomized BN statistics, or the BN left in place with a reason."""
import warnings

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
import nnabla.functions as F
import nnabla.parametric_functions as PF
from hypothesis import given, settings, strategies as st, HealthCheck

import bnfold_gpu
from helpers import (assert_fold_exact, bn_count, feed, forward_all, function_types, randomize_all,
                     rel_err, snapshot)

BN = dict(batch_stat=False)


def prepare(rng, outputs, *inputs):
    randomize_all(rng)
    feed(rng, *inputs)
    return outputs


# -- layer -> BN ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn(rng, with_bias):
    x = nn.Variable((2, 3, 9, 9))
    h = PF.convolution(x, 8, (3, 3), pad=(1, 1), stride=(2, 2), with_bias=with_bias, name="c")
    y = F.relu(PF.batch_normalization(h, name="bn", **BN))
    res = assert_fold_exact(prepare(rng, y, x))
    assert [(r.bn, r.kind) for r in res.folded] == [("bn/bn", "Convolution")]
    assert res.skipped == () and bn_count(res.outputs) == 0
    assert res.backend == "numpy"
    assert ("c/conv/b" in nn.get_parameters(grad_only=False)) and res.outputs is y


def test_deconv_bn_groups(rng):
    x = nn.Variable((2, 6, 5, 5))
    h1 = PF.deconvolution(x, 4, (3, 3), stride=(2, 2), name="d1")
    h2 = PF.deconvolution(x, 9, (3, 2), group=3, pad=(1, 0), dilation=(2, 1), with_bias=False,
                          name="d3")
    y = [PF.batch_normalization(h1, name="bn1", **BN), PF.batch_normalization(h2, name="bn3", **BN)]
    res = assert_fold_exact(prepare(rng, y, x))
    assert sorted(r.kind for r in res.folded) == ["Deconvolution", "Deconvolution"]
    assert bn_count(res.outputs) == 0


def test_depthwise(rng):
    x = nn.Variable((2, 4, 7, 7))
    h1 = PF.depthwise_convolution(x, (3, 3), multiplier=2, pad=(1, 1), name="dw")
    h2 = PF.depthwise_deconvolution(x, (3, 3), divisor=2, name="dd")
    y = [PF.batch_normalization(h1, name="bn1", **BN), PF.batch_normalization(h2, name="bn2", **BN)]
    res = assert_fold_exact(prepare(rng, y, x))
    assert len(res.folded) == 2 and bn_count(res.outputs) == 0


@pytest.mark.parametrize("out, axis", [(7, 1), ((3, 5), 1), ((3, 5), 2)])
def test_affine_bn(rng, out, axis):
    x = nn.Variable((4, 3, 2, 2))
    h = PF.affine(x, out, name="fc")
    y = PF.batch_normalization(h, axes=[axis], name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert [r.kind for r in res.folded] == ["Affine"]


def test_affine_without_bias_base_axis_2(rng):
    x = nn.Variable((2, 3, 4, 5))
    h = PF.affine(x, 6, base_axis=2, with_bias=False, name="fc")
    y = PF.batch_normalization(h, axes=[2], name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert len(res.folded) == 1 and "bias created" in res.folded[0].note


@pytest.mark.parametrize("no_scale, no_bias", [(True, False), (False, True), (True, True)])
def test_bn_without_scale_or_bias(rng, no_scale, no_bias):
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 5, (3, 3), name="c")
    y = PF.batch_normalization(h, no_scale=no_scale, no_bias=no_bias, name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert len(res.folded) == 1
    spec = res.folded[0]
    assert (spec.gamma is None) == no_scale and (spec.beta is None) == no_bias


@pytest.mark.parametrize("residual", [True, False])
def test_fused_bn_keeps_add_and_relu(rng, residual):
    x = nn.Variable((2, 4, 6, 6))
    z = nn.Variable((2, 4, 6, 6)) if residual else None
    h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c")
    y = PF.fused_batch_normalization(h, z, name="bn", **BN)
    prepare(rng, y, *([x, z] if residual else [x]))
    res = assert_fold_exact(y)
    assert res.folded[0].bn_type == "FusedBatchNormalization"
    types = function_types(res.outputs)
    assert "FusedBatchNormalization" not in types and "ReLU" in types
    assert ("Add2" in types) == residual


def test_eps_and_extreme_stats(rng):
    x = nn.Variable((2, 3, 5, 5))
    y = PF.batch_normalization(PF.convolution(x, 4, (1, 1), name="c"), eps=1e-3, name="bn", **BN)
    prepare(rng, y, x)
    var = nn.get_parameters(grad_only=False)["bn/bn/var"]
    var.d = np.array([0.0, 1e-6, 50.0, 3.0], np.float32).reshape(var.shape)  # zero variance is fine with eps
    res = assert_fold_exact(y)
    assert res.folded[0].eps == pytest.approx(1e-3)


# -- BN -> layer ----------------------------------------------------------------------------------
def test_bn_before_unpadded_conv_and_affine(rng):
    x = nn.Variable((2, 4, 6, 6))
    b1 = PF.batch_normalization(x, name="bn1", **BN)
    h = PF.convolution(b1, 6, (3, 3), group=2, name="c")      # no padding: exact
    b2 = PF.batch_normalization(F.relu(h), name="bn2", **BN)
    y = PF.affine(b2, 3, name="fc")
    res = assert_fold_exact(prepare(rng, y, x))
    assert sorted((r.bn, r.kind, r.side) for r in res.folded) == [
        ("bn1/bn", "Convolution", "input"), ("bn2/bn", "Affine", "input")]
    assert bn_count(res.outputs) == 0


def test_bn_before_depthwise_and_channel_last_conv_weights(rng):
    x = nn.Variable((2, 3, 6, 6))
    h = PF.depthwise_convolution(PF.batch_normalization(x, name="bn", **BN), (3, 3), multiplier=2,
                                 name="dw")
    res = assert_fold_exact(prepare(rng, h, x))
    assert [(r.kind, r.side) for r in res.folded] == [("DepthwiseConvolution", "input")]


def test_bn_before_padded_conv_is_skipped(rng):
    x = nn.Variable((2, 3, 6, 6))
    y = PF.convolution(PF.batch_normalization(x, name="bn", **BN), 4, (3, 3), pad=(1, 1), name="c")
    res = assert_fold_exact(prepare(rng, y, x))
    assert res.folded == () and "pads" in res.skipped[0].reason
    assert bn_count(res.outputs) == 1


def test_output_side_preferred_between_two_layers(rng):
    x = nn.Variable((2, 3, 6, 6))
    h = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c1"), name="bn", **BN)
    y = PF.convolution(h, 5, (1, 1), name="c2")
    res = assert_fold_exact(prepare(rng, y, x))
    assert [(r.bn, r.side) for r in res.folded] == [("bn/bn", "output")]


# -- must not change results ----------------------------------------------------------------------
def test_forked_layer_output_is_left(rng):
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c")
    y = F.add2(PF.batch_normalization(h, name="bn", **BN), F.sigmoid(h))
    res = assert_fold_exact(prepare(rng, y, x))
    assert res.folded == () and "also feeds" in res.skipped[0].reason


@pytest.mark.parametrize("inplace", [True, False])
def test_fused_bn_whose_residual_is_the_layer_output_is_left(rng, inplace):
    # relu(BN(h) + h): one function reads h twice, so h is forked although only one function uses it
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c")
    y = PF.fused_batch_normalization(h, h, name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x), inplace=inplace)
    assert res.folded == () and "its input is read 2 times, all by the same " \
        "FusedBatchNormalization (its inputs 0, 5)" in res.skipped[0].reason


def test_layer_output_that_is_a_graph_output(rng):
    x = nn.Variable((2, 3, 6, 6))
    h = PF.convolution(x, 4, (3, 3), name="c")
    y = [h, PF.batch_normalization(h, name="bn", **BN)]
    res = assert_fold_exact(prepare(rng, y, x))
    assert res.folded == () and "graph output" in res.skipped[0].reason


@pytest.mark.parametrize("inplace", [True, False])
def test_weight_that_is_also_a_graph_output_is_not_rescaled(rng, inplace):
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
    prepare(rng, y, x)
    w = nn.get_parameters()["c/conv/W"]
    w_before, y_before = w.d.copy(), forward_all(y)[0]
    res = bnfold_gpu.fold([y, w], inplace=inplace)   # the caller reads the weight itself
    assert rel_err(forward_all(res.outputs[0])[0], y_before) < 1e-5
    assert np.array_equal(w.d, w_before) and res.folded[0].folded_weight != "c/conv/W"
    assert "weight shared" in res.folded[0].note


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("layer", ["conv", "affine"])
def test_weights_tied_by_reusing_a_parametric_function_name(rng, inplace, layer):
    # NNabla's usual way to tie weights: each call under the same name gets its own handle of the
    # parameter, whose function_references list only that call's function
    def tied(h):
        if layer == "conv":
            return PF.convolution(h, 3, (3, 3), pad=(1, 1), name="tied")
        return PF.affine(h, 3, name="tied")
    x = nn.Variable((2, 3, 6, 6) if layer == "conv" else (2, 3))
    y = tied(F.relu(PF.batch_normalization(tied(x), name="bn", **BN)))
    prepare(rng, y, x)
    before = snapshot()
    res = assert_fold_exact(y, inplace=inplace)
    assert len(res.folded) == 1 and "weight and bias shared" in res.folded[0].note
    w = "tied/conv/W" if layer == "conv" else "tied/affine/W"
    assert res.folded[0].folded_weight != w
    assert all(np.array_equal(v, snapshot()[k]) for k, v in before.items())   # none rescaled


def test_tied_weights_fold_into_copies(rng):
    x = nn.Variable((2, 3, 6, 6))
    w = nn.parameter.get_parameter_or_create("shared/W", (4, 3, 3, 3))
    y = F.add2(PF.batch_normalization(F.convolution(x, w, pad=(1, 1)), name="bn1", **BN),
               PF.batch_normalization(F.convolution(x, w, pad=(1, 1)), name="bn2", **BN))
    prepare(rng, y, x)
    w_before = w.d.copy()
    res = assert_fold_exact(y)
    assert len(res.folded) == 2
    assert np.array_equal(w.d, w_before)  # the shared weight itself is never rescaled
    names = {r.folded_weight for r in res.folded}
    assert len(names) == 2 and "shared/W" not in names
    assert all(n in nn.get_parameters(grad_only=False) for n in names)
    assert all("shared" in r.note for r in res.folded)


def test_batch_stat_bn_is_left(rng):
    x = nn.Variable((4, 3, 6, 6))
    h = PF.convolution(x, 4, (3, 3), name="c")
    y = PF.batch_normalization(h, batch_stat=True, name="bn")
    prepare(rng, y, x)
    res = bnfold_gpu.fold(y)
    assert res.folded == () and "batch_stat" in res.skipped[0].reason
    assert bn_count(res.outputs) == 1


def test_bn_over_a_non_channel_axis_is_left(rng):
    x = nn.Variable((2, 3, 5, 5))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), axes=[2], name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert res.folded == () and "channel axis" in res.skipped[0].reason


def test_a_layer_absorbs_a_bn_on_each_side_in_one_fold(rng):
    # bn1 -> affine -> bn2: bn2 folds into the affine's outputs and bn1 into its inputs, one call
    def model(x):
        return PF.batch_normalization(PF.affine(PF.batch_normalization(F.relu(x), name="bn1", **BN),
                                                3, name="fc"), name="bn2", **BN)
    x = nn.Variable((2, 4))
    y = model(x)
    prepare(rng, y, x)
    before = snapshot()
    res = assert_fold_exact(y)
    assert [(r.bn, r.side) for r in res.folded] == [("bn1/bn", "input"), ("bn2/bn", "output")]
    assert not res.skipped and bn_count(res.outputs) == 0
    assert set(nn.get_parameters(grad_only=False)) == set(before)   # nothing between the two kept


@pytest.mark.parametrize("inplace", [True, False])
def test_bns_in_a_row_compose_into_one_fold(rng, inplace):
    # conv -> bn1 -> bn2 and bn3 -> bn4 -> conv: each pair is one map, folded in one call
    def model(x):   # built in a function, as models are: no intermediate variable outlives it
        h = PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1")
        h = PF.batch_normalization(PF.batch_normalization(h, name="bn1", **BN), name="bn2", **BN)
        h = PF.batch_normalization(PF.batch_normalization(F.relu(h), name="bn3", **BN), name="bn4", **BN)
        return PF.convolution(h, 2, (1, 1), name="c2")
    x = nn.Variable((2, 3, 6, 6))
    y = model(x)
    prepare(rng, y, x)
    res = assert_fold_exact(y, inplace=inplace)
    assert sorted((r.bn, r.side) for r in res.folded) == [("bn1/bn+bn2/bn", "output"),
                                                         ("bn3/bn+bn4/bn", "input")]
    assert res.skipped == () and bn_count(res.outputs) == 0
    assert sorted(res.plan.folded_maps) == ["bn1/bn", "bn2/bn", "bn3/bn", "bn4/bn"]


def test_functions_a_fold_replaces_are_freed_when_it_returns(rng):
    # not kept until the next garbage collection: they would hold their output buffers, and count
    # as consumers of their inputs in a later fold
    import gc

    def model(x):
        a = F.relu(x)
        return a, PF.convolution(PF.batch_normalization(a, name="bn", **BN), 2, (1, 1), name="c")
    x = nn.Variable((2, 3, 6, 6))
    a, y = model(x)
    prepare(rng, y, x)
    gc.disable()
    try:
        res = assert_fold_exact(y)
        assert [r.side for r in res.folded] == ["input"]
        assert [f.info.type_name for f in a.function_references] == ["Convolution"]
    finally:
        gc.enable()


def test_bn_with_no_adjacent_layer_is_left(rng):
    x = nn.Variable((2, 3, 5, 5))
    y = F.sigmoid(PF.batch_normalization(F.tanh(x), name="bn", **BN))
    res = assert_fold_exact(prepare(rng, y, x))
    assert res.folded == ()
    reason = res.skipped[0].reason
    assert "Tanh" in reason and "Sigmoid" in reason


# -- names, outputs, modes ------------------------------------------------------------------------
def test_unscoped_onnx_style_names_never_collide(rng):
    x = nn.Variable((2, 3, 6, 6))
    for name, shape in [("conv1_W", (4, 3, 3, 3)), ("bn1_scale", (1, 4, 1, 1)),
                        ("bn1_bias", (1, 4, 1, 1)), ("bn1_mean", (1, 4, 1, 1)),
                        ("bn1_var", (1, 4, 1, 1)), ("conv1_b", (7,))]:   # conv1_b: an unrelated one
        nn.parameter.get_parameter_or_create(name, shape)
    p = nn.get_parameters(grad_only=False)
    h = F.convolution(x, p["conv1_W"])
    y = F.batch_normalization(h, p["bn1_bias"], p["bn1_scale"], p["bn1_mean"], p["bn1_var"],
                              batch_stat=False)
    prepare(rng, y, x)
    unrelated = p["conv1_b"].d.copy()
    res = assert_fold_exact(y)
    assert res.folded[0].bn == "bn1_mean"
    assert res.folded[0].folded_bias not in ("conv1_b",)
    assert np.array_equal(nn.get_parameters(grad_only=False)["conv1_b"].d, unrelated)


@pytest.mark.parametrize("inplace", [True, False])
def test_fold_called_inside_another_parameter_scope(rng, inplace):
    # the graph's parameters are under "s", the call inside parameter_scope("other"): they are
    # found and named from the root, the new ones registered beside them, prune takes the BN's out
    x = nn.Variable((2, 3, 6, 6))
    with nn.parameter_scope("s"):
        y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), with_bias=False, name="c"),
                                   name="bn", **BN)
    prepare(rng, y, x)
    with nn.parameter_scope("other"):
        assert [s.bn for s in bnfold_gpu.plan(y, skip=["s/bn/bn"]).skipped] == ["s/bn/bn"]
        res = assert_fold_exact(y, inplace=inplace, prune=True)
        assert nn.get_parameters(grad_only=False) == {}
    assert [r.bn for r in res.folded] == ["s/bn/bn"] and res.unregistered == ()
    names = sorted(nn.get_parameters(grad_only=False))
    assert names == (["s/c/conv/W", "s/c/conv/b"] if inplace else
                     ["s/c/conv/W_folded", "s/c/conv/b_folded"])


@pytest.mark.parametrize("inplace", [True, False])
def test_parameters_that_are_plain_variables(rng, inplace):
    # weights and statistics not in the parameter registry: folded all the same; what the fold
    # creates is returned, not registered
    def var(*shape, low=None):
        v = rng.uniform(0.5, 2.0, shape) if low else rng.normal(0.5, 1.0, shape)
        return nn.Variable.from_numpy_array(v.astype(np.float32))
    x = var(2, 3, 6, 6)
    w = var(4, 3, 3, 3)
    y = F.batch_normalization(F.convolution(x, w), var(1, 4, 1, 1), var(1, 4, 1, 1),
                              var(1, 4, 1, 1), var(1, 4, 1, 1, low=True), batch_stat=False)
    w_before = w.d.copy()
    res = assert_fold_exact(y, inplace=inplace)
    assert len(res.folded) == 1 and res.folded[0].note == "bias created"
    assert nn.get_parameters(grad_only=False) == {}
    assert res.folded[0].folded_bias in res.parameters
    assert np.array_equal(w.d, w_before) != inplace


def test_inplace_false_leaves_everything_untouched(rng):
    x = nn.Variable((2, 3, 6, 6))
    y = F.relu(PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN))
    prepare(rng, y, x)
    before_params, before_out = snapshot(), forward_all(y)
    res = assert_fold_exact(y, inplace=False)
    assert res.outputs is not y and bn_count(y) == 1 and bn_count(res.outputs) == 0
    after = snapshot()
    for name, value in before_params.items():
        assert np.array_equal(after[name], value), name
    assert rel_err(forward_all(y)[0], before_out[0]) == 0.0
    assert set(res.parameters) == {res.folded[0].folded_weight, res.folded[0].folded_bias}


def test_plan_is_a_dry_run(rng):
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
    prepare(rng, y, x)
    before = snapshot()
    p = bnfold_gpu.plan(y)
    assert [s.bn for s in p.folds] == ["bn/bn"] and "bn/bn" in p.table()
    assert bn_count(y) == 1 and snapshot().keys() == before.keys()
    assert all(np.array_equal(snapshot()[k], v) for k, v in before.items())


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf, "signalling NaN"])
def test_bad_variance_raises_and_changes_nothing(rng, bad):
    x = nn.Variable((2, 3, 6, 6))
    h1 = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c1"), name="bn1", **BN)
    y = PF.batch_normalization(PF.convolution(h1, 4, (3, 3), name="c2"), name="bn2", **BN)
    prepare(rng, y, x)
    var = nn.get_parameters(grad_only=False)["bn2/bn/var"]
    v = var.d.copy()
    if bad == "signalling NaN":    # NumPy warns as it merely casts one
        v.view(np.uint32).flat[2] = 0x7FA00000
    else:
        v.flat[2] = bad
    var.d = v
    before = snapshot()
    # said once, as a FoldError: no warning, nor the FloatingPointError the caller's setting asks
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        with pytest.raises(bnfold_gpu.FoldError, match="bn2/bn: variance"):
            bnfold_gpu.fold(y)
        assert np.geterr() == dict(divide="raise", over="raise", under="raise", invalid="raise")
    after = snapshot()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k], equal_nan=True) for k in before)
    assert bn_count(y) == 2


def test_unknown_backend(rng):
    x = nn.Variable((1, 3, 4, 4))
    y = PF.batch_normalization(PF.convolution(x, 2, (1, 1), name="c"), name="bn", **BN)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        bnfold_gpu.fold(y, backend="tpu")
    with pytest.raises(TypeError):
        bnfold_gpu.fold("y")
    with pytest.raises(TypeError, match=r"outputs\[0\] must be an nnabla.Variable, not list"):
        bnfold_gpu.fold([[y]])


def test_bad_arguments_are_said_and_change_nothing(rng, tmp_path):
    x = nn.Variable((1, 3, 4, 4))
    y = PF.batch_normalization(PF.convolution(x, 2, (1, 1), name="c"), name="bn", **BN)
    prepare(rng, y, x)
    before, types = snapshot(), function_types(y)
    cases = [(dict(outputs={"y": y, "z": 3}), r"outputs\['z'\] must be an nnabla.Variable, not int"),
             (dict(skip=[3]), r"skip patterns are BN names or glob patterns \(str\), not int \(3\)"),
             (dict(skip=4.5), "skip must be a BN name or glob pattern, or a list of them, not float"),
             (dict(inplace="no"), r"inplace must be True or False, not str \('no'\)"),
             (dict(prune=1), "prune must be True or False, not int")]
    for kwargs, words in cases:
        outputs = kwargs.pop("outputs", y)
        for call in (bnfold_gpu.fold, bnfold_gpu.plan):
            if call is bnfold_gpu.plan and "prune" in kwargs:
                continue
            with pytest.raises(TypeError, match=words):
                call(outputs, **kwargs)
    assert function_types(y) == types and set(snapshot()) == set(before)
    assert all(np.array_equal(v, before[k]) for k, v in snapshot().items())
    res = bnfold_gpu.fold(y, skip=None, inplace=np.bool_(True))   # None: no pattern
    assert [r.bn for r in res.folded] == ["bn/bn"]
    for kwargs, words in ((dict(tolerance=-1), "tolerance -1: a tolerance is a finite number >= 0"),
                          (dict(atol=float("nan")), "atol nan: a tolerance is"),
                          (dict(atol=None), "atol None: a tolerance is"),
                          (dict(tolerance=True), "tolerance True: a tolerance is"),
                          (dict(seed=-5), "seed -5: a seed is an integer from 0 to 2\\*\\*32 - 1"),
                          (dict(verify="yes"), "verify must be True or False"),
                          (dict(skip=[None]), "skip patterns are BN names"),
                          (dict(skip=b"bn"), "not bytes"),
                          (dict(verify=True, inputs=5), "inputs must be a dict"),
                          (dict(verify=True, inputs=["x"]), "inputs must be a dict")):
        with pytest.raises((TypeError, ValueError), match=words):
            bnfold_gpu.fold_nnp(tmp_path / "missing.nnp", tmp_path / "out.nnp", **kwargs)
    for args, words in (((5, tmp_path / "out.nnp"), "src must be a path"),
                        ((tmp_path / "m.nnp", 5), "dst must be a path"),
                        ((b"m.nnp", b"out.nnp"), "src must be a path .*not bytes")):
        with pytest.raises(TypeError, match=words):
            bnfold_gpu.fold_nnp(*args)
    for kwargs, words in ((dict(batch_size="2"), "batch_size must be an integer or None, not str"),
                          (dict(batch_size=2.5), "batch_size must be an integer"),
                          (dict(batch_size=True), "batch_size must be an integer"),
                          (dict(with_report="yes"), "with_report must be True or False"),
                          (dict(network=3), "network must be a network's name")):
        with pytest.raises(TypeError, match=words):
            bnfold_gpu.load(tmp_path / "missing.nnp", **kwargs)
    with pytest.raises(TypeError, match="path must be a path"):
        bnfold_gpu.load(5)
    assert not list(tmp_path.iterdir())


# -- randomized shapes (hypothesis, derandomized: the same examples on every run) -----------------
@settings(derandomize=True, max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["conv", "deconv"]), groups=st.integers(1, 3),
       cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3), s=st.integers(1, 2),
       d=st.integers(1, 2), pad=st.integers(0, 1), ndim=st.sampled_from([1, 2]),
       with_bias=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_random_conv_shapes(kind, groups, cin, cout, k, s, d, pad, ndim, with_bias, seed):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, cin * groups) + (7,) * ndim)
    layer = PF.convolution if kind == "conv" else PF.deconvolution
    h = layer(x, cout * groups, (k,) * ndim, pad=(pad,) * ndim, stride=(s,) * ndim,
              dilation=(d,) * ndim, group=groups, with_bias=with_bias, name="l")
    y = PF.batch_normalization(h, name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert len(res.folded) == 1


@settings(derandomize=True, max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       out=st.lists(st.integers(1, 4), min_size=1, max_size=2), seed=st.integers(0, 2 ** 31 - 1),
       data=st.data())
def test_random_affine_shapes(shape, out, seed, data):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    base_axis = data.draw(st.integers(1, len(shape) - 1))
    x = nn.Variable(tuple(shape))
    h = PF.affine(x, tuple(out), base_axis=base_axis, name="fc")
    axis = data.draw(st.integers(base_axis, h.ndim - 1))
    y = PF.batch_normalization(h, axes=[axis], name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x))
    assert len(res.folded) == 1


# -- channel-last (NNabla's CPU cannot run it: check weights against the channel-first twin) -------
def _twin_fold(rng, kind, groups, side):
    """Fold the same layer built channel-first and channel-last; return both folded (W, b)."""
    c_in, c_out, k = 2 * groups, 3 * groups, (3, 2)
    layer = PF.convolution if kind == "conv" else PF.deconvolution
    results = []
    values = None
    for channel_last in (False, True):
        nn.clear_parameters()
        shape = (2, 5, 6, c_in) if channel_last else (2, c_in, 5, 6)
        axis = 3 if channel_last else 1
        x = nn.Variable(shape)
        if side == "output":
            h = layer(x, c_out, k, group=groups, channel_last=channel_last, name="l")
            y = PF.batch_normalization(h, axes=[axis], name="bn", **BN)
        else:
            b = PF.batch_normalization(x, axes=[axis], name="bn", **BN)
            y = layer(b, c_out, k, group=groups, channel_last=channel_last, name="l")
        params = nn.get_parameters(grad_only=False)
        w = params[[n for n in params if n.endswith("/W")][0]]
        if values is None:
            randomize_all(rng)
            values = {n: v.d.copy() for n, v in params.items()}
            w_cf = values[[n for n in params if n.endswith("/W")][0]]
        for n, v in params.items():
            v.d = np.moveaxis(values[n], 1, -1) if (channel_last and v == w) else values[n].reshape(v.shape)
        res = bnfold_gpu.fold(y)
        assert len(res.folded) == 1, res.skipped
        spec = res.folded[0]
        params = nn.get_parameters(grad_only=False)
        results.append((params[spec.folded_weight].d.copy(), params[spec.folded_bias].d.copy()))
    return w_cf, values, results


@pytest.mark.parametrize("kind, groups, side", [("conv", 1, "output"), ("conv", 2, "output"),
                                                ("deconv", 1, "output"), ("deconv", 2, "output"),
                                                ("conv", 2, "input")])
def test_channel_last_matches_channel_first_twin(rng, kind, groups, side):
    w, values, ((w_cf, b_cf), (w_cl, b_cl)) = _twin_fold(rng, kind, groups, side)
    assert np.array_equal(np.moveaxis(w_cf, 1, -1), w_cl)
    np.testing.assert_allclose(b_cl, b_cf, rtol=1e-6)
    # and against the definition, in float64
    g, m = values["bn/bn/gamma"].reshape(-1), values["bn/bn/mean"].reshape(-1)
    v, beta = values["bn/bn/var"].reshape(-1), values["bn/bn/beta"].reshape(-1)
    scale = g / np.sqrt(v.astype(np.float64) + 1e-5)
    if side == "output" and kind == "conv":
        expected = w * scale.reshape(-1, 1, 1, 1)
    elif side == "output":   # deconv (I, O/g, k...): output channel = group * O/g + j
        i_per_g, o_per_g = w.shape[0] // groups, w.shape[1]
        ch = (np.arange(w.shape[0])[:, None] // i_per_g) * o_per_g + np.arange(o_per_g)[None, :]
        expected = w * scale[ch][:, :, None, None]
    else:                    # conv input side: input channel = group(o) * I/g + j
        o_per_g, i_per_g = w.shape[0] // groups, w.shape[1]
        ch = (np.arange(w.shape[0])[:, None] // o_per_g) * i_per_g + np.arange(i_per_g)[None, :]
        expected = w * scale[ch][:, :, None, None]
    np.testing.assert_allclose(w_cf, expected, rtol=1e-6)
    b = values[[n for n in values if n.endswith("/b")][0]].astype(np.float64)
    if side == "output":
        expected_b = (b - m) * scale + beta
    else:                    # the BN's shift pushed through the weights: b + sum(w * shift[channel])
        shift = beta - m * scale
        expected_b = b + (w * shift[ch][:, :, None, None]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(b_cf, expected_b, rtol=1e-5, atol=1e-6)


def test_fold_through_the_gpu_backend_emulated(rng, host, monkeypatch):
    """fold(backend='cupy') end to end, the device emulated on the host (parameters in NNabla's CPU
    context take the staged path)."""
    import fake_cupy
    from bnfold_gpu.backends import cupy_backend
    monkeypatch.setattr(cupy_backend, "cupy", fake_cupy.make(host))
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    x = nn.Variable((2, 4, 6, 6))
    h = PF.batch_normalization(PF.deconvolution(x, 6, (3, 3), group=2, name="d"), name="bn1", **BN)
    h = PF.convolution(PF.batch_normalization(F.relu(h), name="bn2", **BN), 5, (1, 1), name="c")
    y = PF.fused_batch_normalization(h, name="bn3", **BN)
    res = assert_fold_exact(prepare(rng, y, x), backend="cupy")
    assert res.backend == "cupy" and len(res.folded) == 3 and not res.skipped   # c on both sides


def test_fold_of_parameters_in_a_cuda_context_emulated(rng, host, monkeypatch):
    """Parameters in NNabla's CUDA context are reached through nnabla.utils.dlpack.to_dlpack(data,
    ctx=ctx) and cupy.from_dlpack, and rescaled where they are (the device path). Emulated: the
    context reports cuDNN, to_dlpack exports the host array (after checking how it is called), and
    the fake CuPy wraps it without a copy."""
    import fake_cupy
    import nnabla.utils.dlpack
    from bnfold_gpu.backends import cupy_backend
    fake = fake_cupy.make(host)
    fake.from_dlpack = lambda capsule: np.from_dlpack(capsule).view(fake_cupy.ndarray)
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    cuda_ctx = nn.Context(["cudnn:float", "cuda:float", "cpu:float"], "CudaCachedArray", "0")
    monkeypatch.setattr(nn, "get_current_context", lambda: cuda_ctx)
    exported = []

    def to_dlpack(a, dtype=None, ctx=None):
        assert isinstance(a, nn.NdArray) and dtype is None and ctx is cuda_ctx
        view = a.get_data("rw")   # supports __dlpack__, shares the parameter's memory
        exported.append(view.ctypes.data)
        return view

    monkeypatch.setattr(nnabla.utils.dlpack, "to_dlpack", to_dlpack)
    monkeypatch.setattr(cupy_backend, "_HostFold", lambda *a: pytest.fail("took the staged path"))
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
    prepared = prepare(rng, y, x)
    w = nn.get_parameters()["c/conv/W"]
    w_memory = w.data.get_data("r").ctypes.data
    res = assert_fold_exact(prepared, backend="cupy")
    assert res.backend == "cupy" and len(res.folded) == 1
    assert w_memory in exported   # the weight itself was handed over, and rescaled in place


@settings(derandomize=True, max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["conv", "deconv"]), groups=st.integers(1, 3), seed=st.integers(0, 999))
def test_random_channel_last_twins(kind, groups, seed):
    rng = np.random.RandomState(seed)
    w, values, ((w_cf, b_cf), (w_cl, b_cl)) = _twin_fold(rng, kind, groups, "output")
    assert np.array_equal(np.moveaxis(w_cf, 1, -1), w_cl)
    np.testing.assert_allclose(b_cl, b_cf, rtol=1e-6)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(groups=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3),
       s=st.integers(1, 2), d=st.integers(1, 2), depthwise=st.booleans(), with_bias=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_random_bn_before_unpadded_conv(groups, cin, cout, k, s, d, depthwise, with_bias, seed):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, cin * groups, 7, 7))
    b = PF.batch_normalization(x, name="bn", **BN)
    if depthwise:
        y = PF.depthwise_convolution(b, (k, k), stride=(s, s), dilation=(d, d), multiplier=cout,
                                     with_bias=with_bias, name="l")
    else:
        y = PF.convolution(b, cout * groups, (k, k), stride=(s, s), dilation=(d, d), group=groups,
                           with_bias=with_bias, name="l")
    res = assert_fold_exact(prepare(rng, y, x))
    assert [r.side for r in res.folded] == ["input"]


def test_inplace_false_on_every_kind_of_fold(rng):
    """Output side, input side and fused BNs folded into a copy of the graph; the original graph
    and its parameters are unchanged and still compute what they did."""
    x = nn.Variable((2, 4, 6, 6))
    z = nn.Variable((2, 5, 8, 8))
    h = PF.batch_normalization(PF.deconvolution(x, 6, (3, 3), group=2, name="d"), name="bn1", **BN)
    h = PF.convolution(PF.batch_normalization(F.relu(h), name="bn2", **BN), 5, (3, 3), name="c")
    y = [PF.fused_batch_normalization(PF.convolution(F.relu(h), 5, (1, 1), pad=(1, 1), name="c2"), z,
                                      name="bn3", **BN), F.sigmoid(h)]
    prepare(rng, y, x, z)
    before_params, before_out = snapshot(), forward_all(y)
    res = assert_fold_exact(y, inplace=False)
    assert len(res.folded) == 3 and bn_count(res.outputs) == 0 and bn_count(y) == 3
    after = snapshot()
    assert all(np.array_equal(after[k], v) for k, v in before_params.items())
    for a, b in zip(forward_all(y), before_out):
        assert np.array_equal(a, b)


def test_inplace_rescales_the_same_memory(rng):
    """No second copy of the weights: the folded layer uses the very parameter, in the same memory."""
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
    prepare(rng, y, x)
    w = nn.get_parameters(grad_only=False)["c/conv/W"]
    address = w.data.get_data("r").ctypes.data
    before = w.d.copy()
    res = assert_fold_exact(y)
    assert res.folded[0].folded_weight == "c/conv/W" and res.parameters == {}
    assert w.data.get_data("r").ctypes.data == address and not np.array_equal(w.d, before)
    assert res.outputs.parent.inputs[1] == w


@settings(derandomize=True, max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       out=st.lists(st.integers(1, 4), min_size=1, max_size=2), with_bias=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1), data=st.data())
def test_random_bn_before_affine(shape, out, with_bias, seed, data):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    base_axis = data.draw(st.integers(1, len(shape) - 1))
    axis = data.draw(st.integers(base_axis, len(shape) - 1))
    x = nn.Variable(tuple(shape))
    b = PF.batch_normalization(x, axes=[axis], name="bn", **BN)
    y = PF.affine(b, tuple(out), base_axis=base_axis, with_bias=with_bias, name="fc")
    res = assert_fold_exact(prepare(rng, y, x))
    assert [(r.kind, r.side) for r in res.folded] == [("Affine", "input")]


@pytest.mark.parametrize("cuda_context", [False, True])
def test_auto_backend_goes_by_where_the_parameters_are(rng, monkeypatch, host, cuda_context):
    """A device answers: parameters in NNabla's CUDA context fold on it; parameters in host memory
    fold with NumPy, where they are."""
    import fake_cupy
    import nnabla.utils.dlpack
    from bnfold_gpu import folding
    from bnfold_gpu.backends import cupy_backend
    fake = fake_cupy.make(host)
    monkeypatch.setattr(cupy_backend, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: None)
    if cuda_context:   # the device emulated on the host, reached as NNabla's CUDA arrays would be
        fake.from_dlpack = lambda capsule: np.from_dlpack(capsule).view(fake_cupy.ndarray)
        monkeypatch.setattr(folding, "cuda_context", lambda ctx: True)
        monkeypatch.setattr(cupy_backend, "on_device", lambda ctx: True)
        monkeypatch.setattr(nnabla.utils.dlpack, "to_dlpack",
                            lambda a, dtype=None, ctx=None: a.get_data("rw"))
    x = nn.Variable((2, 3, 6, 6))
    y = PF.batch_normalization(PF.convolution(x, 4, (3, 3), name="c"), name="bn", **BN)
    res = assert_fold_exact(prepare(rng, y, x), backend="auto")
    assert res.backend == ("cupy" if cuda_context else "numpy")


# -- graphs deeper than Python's recursion limit ----------------------------------------------------
@pytest.mark.parametrize("direction", ["back through concatenations", "forward through forks"])
def test_branches_nested_deeper_than_the_recursion_limit(rng, direction):
    # every level branches: the walk follows its branches from a list, so the depth is no limit
    # (here 400 levels under a recursion limit of 300, which keeps the graph small)
    import sys
    levels = 400
    x = nn.Variable((1, 2, 2, 2))
    if direction.startswith("back"):
        h = PF.convolution(x, 2, (1, 1), name="c")
        for i in range(levels):   # one channel from a new layer, one from the nest so far
            h = F.concatenate(PF.convolution(x, 1, (1, 1), name=f"c{i}"),
                              F.slice(h, (0, 0, 0, 0), (1, 1, 2, 2)), axis=1)
        y = PF.batch_normalization(h, name="bn", **BN)
        kinds = [("Convolution", "output")] * (levels + 1)
    else:
        h = PF.batch_normalization(F.relu(x), name="bn", **BN)
        outs = []
        for i in range(levels):   # each level read by a layer and by the next level
            outs.append(PF.convolution(h, 1, (1, 1), name=f"c{i}"))
            h = F.reshape(h, (1, 2, 2, 2))
        y = F.concatenate(*outs, PF.convolution(h, 1, (1, 1), name="last"), axis=1)
        kinds = [("Convolution", "input")] * (levels + 1)
    prepare(rng, y, x)
    before = forward_all(y)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    try:
        res = bnfold_gpu.fold(y)
    finally:
        sys.setrecursionlimit(limit)
    assert rel_err(forward_all(res.outputs)[0], before[0]) < 1e-5
    assert sorted((r.kind, r.side) for r in res.folded) == kinds and not res.skipped


def test_a_reason_names_where_the_walk_stopped_past_a_concatenation():
    # the map stops at a MaxPooling on one input of a Concatenate, not right before the BN: the
    # reason says which input, and that it comes from the MaxPooling
    nn.clear_parameters()
    rng = np.random.default_rng(0)
    x = nn.Variable((2, 4, 8, 8))
    a = PF.convolution(x, 4, (1, 1), name="a")
    c = F.concatenate(a, F.max_pooling(F.relu(x), (3, 3), stride=(1, 1), pad=(1, 1)), axis=1)
    y = PF.affine(F.relu(PF.batch_normalization(c, batch_stat=False, name="bn")), 3, name="fc")
    for name, p in nn.get_parameters(grad_only=False).items():
        if name.endswith(("var", "gamma")):
            p.d = rng.uniform(0.5, 2, p.shape) * (-1 if name.endswith("gamma") else 1)
        else:
            p.d = rng.normal(size=p.shape)
    (kept,) = bnfold_gpu.plan(y).skipped
    assert kept.reason.startswith("input 1 of Concatenate comes from MaxPooling: its map has a "
                                  "negative scale"), kept.reason
