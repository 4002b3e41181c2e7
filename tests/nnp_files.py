"""Small .nnp files for the CLI tests, made in the test: saved by nnabla.utils.save, laid out as
Neural Network Console saves them, and converted from ONNX models by NNabla's own importer."""

import numpy as np
import nnabla as nn
import nnabla.functions as F
import nnabla.parametric_functions as PF
from nnabla.utils.save import save

import nnabla_cli_server
from helpers import randomize_all


def _net(x, batch_stat):
    h = PF.convolution(x, 6, (3, 3), pad=(1, 1), with_bias=False, name="c1")
    h = F.relu(PF.batch_normalization(h, batch_stat=batch_stat, name="bn1"))
    h = PF.deconvolution(h, 6, (3, 3), pad=(1, 1), group=2, name="d1")
    h = PF.batch_normalization(h, batch_stat=batch_stat, name="bn2")
    h = PF.fused_batch_normalization(PF.convolution(h, 6, (1, 1), name="c2"), h,
                                     batch_stat=batch_stat, name="bn3")
    h = F.global_average_pooling(h)
    return PF.affine(h, 5, name="fc")


def console_like(path, parameter_format=".h5", seed=0):
    """Main (training: batch_stat=True), MainValidation and MainRuntime sharing every parameter, an
    executor on MainRuntime, as Neural Network Console lays a file out."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 3, 8, 8))
    y_train = _net(x, True)
    randomize_all(rng)
    xv = nn.Variable((2, 3, 8, 8))
    y_val = _net(xv, False)
    xr = nn.Variable((1, 3, 8, 8))
    y_run = _net(xr, False)
    contents = {
        "networks": [
            {"name": "Main", "batch_size": 2, "outputs": {"y": y_train}, "names": {"x": x}},
            {"name": "MainValidation", "batch_size": 2, "outputs": {"y": y_val}, "names": {"x": xv}},
            {"name": "MainRuntime", "batch_size": 1, "outputs": {"y": y_run}, "names": {"x": xr}},
        ],
        "executors": [{"name": "Runtime", "network": "MainRuntime", "data": ["x"], "output": ["y"]}],
    }
    save(str(path), contents, parameter_format=parameter_format)
    nn.clear_parameters()
    return path


def single(path, parameter_format=".protobuf", seed=1):
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    x = nn.Variable((2, 3, 8, 8))
    y = _net(x, False)
    randomize_all(rng)
    save(str(path), {"networks": [{"name": "net", "batch_size": 2, "outputs": {"y": y},
                                   "names": {"x": x}}],
                     "executors": [{"name": "run", "network": "net", "data": ["x"],
                                    "output": ["y"]}]}, parameter_format=parameter_format)
    nn.clear_parameters()
    return path


def shared_backbone(path, seed=2):
    """Network "classifier" (conv -> BN -> ReLU -> affine) and network "features" (the same conv,
    its raw output): the conv's weight is read by a network that folds and by one that does not."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)

    def conv(x):
        return PF.convolution(x, 5, (3, 3), pad=(1, 1), name="backbone")
    x = nn.Variable((2, 3, 8, 8))
    y = PF.affine(F.relu(PF.batch_normalization(conv(x), batch_stat=False, name="bn")), 4, name="fc")
    xf = nn.Variable((2, 3, 8, 8))
    yf = conv(xf)
    randomize_all(rng)
    save(str(path), {"networks": [
        {"name": "classifier", "batch_size": 2, "outputs": {"y": y}, "names": {"x": x}},
        {"name": "features", "batch_size": 2, "outputs": {"f": yf}, "names": {"x": xf}}],
        "executors": [{"name": "run", "network": "classifier", "data": ["x"], "output": ["y"]}]})
    nn.clear_parameters()
    return path


def bn_chains(path, seed=3):
    """BNs that a layer takes one per pass: conv -> bn1 -> bn2, relu -> bn3 -> bn4 -> conv, and
    relu -> bn5 -> affine -> bn6."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)

    def bn(h, name):
        return PF.batch_normalization(h, batch_stat=False, name=name)

    def model(x):   # no intermediate variable outlives the function
        h = bn(bn(PF.convolution(x, 4, (3, 3), pad=(1, 1), name="c1"), "bn1"), "bn2")
        h = PF.convolution(bn(bn(F.relu(h), "bn3"), "bn4"), 4, (1, 1), name="c2")
        return bn(PF.affine(bn(F.relu(h), "bn5"), 3, name="fc"), "bn6")
    x = nn.Variable((2, 3, 6, 6))
    y = model(x)
    randomize_all(rng)
    save(str(path), {"networks": [{"name": "n", "batch_size": 2, "outputs": {"y": y},
                                   "names": {"x": x}}]})
    nn.clear_parameters()
    return path


def moves(path, parameter_format=".h5", seed=4):
    """BNs that fold only by moving through other functions, in one network: Affine -> Reshape -> BN
    (a GAN generator's first block), Convolution -> Interpolate -> BN, an add of two convolutions ->
    BN, a constant multiply and add left by NNabla's SelfFoldingModifier, BN -> Affine -> BN, and a
    BN flattened into an Affine; an executor output in the middle."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    z = nn.Variable((2, 5))
    h = F.reshape(PF.affine(z, 4 * 3 * 3, name="fc0"), (2, 4, 3, 3))
    h = F.relu(PF.batch_normalization(h, batch_stat=False, name="bn0"))
    h = F.interpolate(PF.convolution(h, 4, (3, 3), pad=(1, 1), name="c1"), output_size=(6, 6),
                      mode="linear")
    h = F.relu(PF.batch_normalization(h, batch_stat=False, name="bn1"))
    h = PF.convolution(h, 3, (3, 3), pad=(1, 1), name="c2a") + PF.convolution(h, 3, (1, 1), name="c2b")
    feature = F.relu(PF.batch_normalization(h, batch_stat=False, name="bn2"))
    h = PF.convolution(feature, 3, (1, 1), with_bias=False, name="c3")
    scale = nn.parameter.get_parameter_or_create("fold3/scale", (1, 3, 1, 1))
    shift = nn.parameter.get_parameter_or_create("fold3/shift", (1, 3, 1, 1))
    h = F.relu(F.add2(F.mul2(h, scale), shift))
    h = PF.batch_normalization(F.reshape(h, (2, 3 * 36)), batch_stat=False, name="bn4")
    y = PF.batch_normalization(PF.affine(h, 4, name="fc5"), batch_stat=False, name="bn5")
    randomize_all(rng)
    save(str(path), {"networks": [{"name": "g", "batch_size": 2,
                                   "outputs": {"y": y, "feature": feature}, "names": {"z": z}}],
                     "executors": [{"name": "run", "network": "g", "data": ["z"],
                                    "output": ["y", "feature"]}]},
         parameter_format=parameter_format)
    nn.clear_parameters()
    return path


def onnx_model(path, variant, seed=0):
    """An ONNX model built with the onnx package: Conv->BN->Relu, then either ConvTranspose (groups
    2, no bias)->BN, or GlobalAveragePool->Flatten->Gemm (imported as Reshape+BatchMatmul+Add2). Both
    carry an unused initializer, which NNabla's importer keeps."""
    from onnx import helper, numpy_helper
    rng = np.random.RandomState(seed)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32), name)
    c = 4
    inits = [init("conv1_W", rng.randn(c, 3, 3, 3)), init("bn1_scale", rng.rand(c) + 0.5),
             init("bn1_bias", rng.randn(c)), init("bn1_mean", rng.randn(c)),
             init("bn1_var", rng.rand(c) + 0.5), init("unused_W", rng.randn(3, 2))]
    nodes = [helper.make_node("Conv", ["x", "conv1_W"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean",
                                                     "bn1_var"], ["b1"], epsilon=1e-3),
             helper.make_node("Relu", ["b1"], ["r1"])]
    if variant == "deconv":
        inits += [init("deconv_W", rng.randn(c, 2, 3, 3)), init("bn2_scale", rng.rand(4) + 0.5),
                  init("bn2_bias", rng.randn(4)), init("bn2_mean", rng.randn(4)),
                  init("bn2_var", rng.rand(4) + 0.5)]
        nodes += [helper.make_node("ConvTranspose", ["r1", "deconv_W"], ["d1"], group=2,
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", ["d1", "bn2_scale", "bn2_bias", "bn2_mean",
                                                          "bn2_var"], ["y"], epsilon=1e-5)]
        out_shape = [2, 4, 8, 8]
    else:
        inits += [init("fc_W", rng.randn(c, 5)), init("fc_b", rng.randn(5))]
        nodes += [helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
                  helper.make_node("Flatten", ["p"], ["f"]),
                  helper.make_node("Gemm", ["f", "fc_W", "fc_b"], ["y"])]
        out_shape = [2, 5]
    return _save_onnx(path, nodes, inits, [2, 3, 8, 8], out_shape)


def onnx_linear_models(path, variant, seed=0):
    """ONNX models of PyTorch's ``Linear -> BatchNorm1d`` head ("linear_bn": Gemm then
    BatchNormalization, which NNabla's importer makes Reshape -> BatchMatmul -> Reshape -> Add2 ->
    BatchNormalization; "linear_nobias_bn": the Linear without bias, no Add2), and of a BN after a residual add, flattened into a Linear ("residual_flatten":
    the BN folds forward into the BatchMatmul, its shift into the add of the Gemm's bias)."""
    from onnx import helper, numpy_helper
    rng = np.random.RandomState(seed)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32), name)

    def bn(name, c):
        return [init(f"{name}_scale", rng.rand(c) + 0.5), init(f"{name}_bias", rng.randn(c)),
                init(f"{name}_mean", rng.randn(c)), init(f"{name}_var", rng.rand(c) + 0.5)]

    def bn_node(name, x, y):
        return helper.make_node("BatchNormalization", [x] + [f"{name}_{k}" for k in
                                                              ("scale", "bias", "mean", "var")], [y])
    if variant == "bn_linear_nobias_bn":   # BatchNorm1d -> Linear(bias=False) -> BatchNorm1d
        inits = bn("bn0", 8) + [init("fc_W", rng.randn(6, 8))] + bn("bn", 6)
        inits += [init("fc2_W", rng.randn(6, 3))]
        nodes = [bn_node("bn0", "x", "n"),
                 helper.make_node("Gemm", ["n", "fc_W"], ["g"], transB=1),
                 bn_node("bn", "g", "b"), helper.make_node("Relu", ["b"], ["r"]),
                 helper.make_node("Gemm", ["r", "fc2_W"], ["y"])]
        in_shape, out_shape = [2, 8], [2, 3]
    elif variant in ("linear_bn", "linear_nobias_bn"):   # the latter: Linear(bias=False)
        bias = variant == "linear_bn"
        inits = [init("fc_W", rng.randn(6, 8))] + [init("fc_b", rng.randn(6))] * bias + bn("bn", 6)
        inits += [init("fc2_W", rng.randn(6, 3))]
        nodes = [helper.make_node("Gemm", ["x", "fc_W"] + ["fc_b"] * bias, ["g"], transB=1),
                 bn_node("bn", "g", "b"), helper.make_node("Relu", ["b"], ["r"]),
                 helper.make_node("Gemm", ["r", "fc2_W"], ["y"])]
        in_shape, out_shape = [2, 8], [2, 3]
    else:
        inits = [init("c1_W", rng.randn(4, 3, 3, 3)), init("c1_b", rng.randn(4))] + bn("bn", 4)
        inits += [init("fc_W", rng.randn(5, 4 * 6 * 6)), init("fc_b", rng.randn(5))]
        nodes = [helper.make_node("Conv", ["x", "c1_W", "c1_b"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("Add", ["r", "c"], ["a"]),
                 bn_node("bn", "a", "b"),
                 helper.make_node("Flatten", ["b"], ["f"]),
                 helper.make_node("Gemm", ["f", "fc_W", "fc_b"], ["y"], transB=1)]
        in_shape, out_shape = [2, 3, 6, 6], [2, 5]
    return _save_onnx(path, nodes, inits, in_shape, out_shape)


def _save_onnx(path, nodes, inits, in_shape, out_shape):
    """An opset-11 model of ``nodes`` from input x to output y, checked and saved at ``path``."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def nnabla_cli(*args):
    """NNabla's own converter (package nnabla-converter), as a user runs it: its command, kept running
    between calls (``nnabla_cli_server``: the same files, without its seconds of imports each time)."""
    status, printed = nnabla_cli_server.run(*args)
    assert status == 0, printed[-2000:]
    return printed


def _shared_layer_net(x, batch_stat, kind, last=True):
    if kind == "both_sides":      # a 1x1 convolution takes a BN on each side
        h = PF.batch_normalization(F.relu(x), batch_stat=batch_stat, name="bn_in")
        h = PF.convolution(h, 4, (1, 1), name="conv")
        return F.relu(PF.batch_normalization(h, batch_stat=batch_stat, name="bn_out") if last else h)
    # MobileNetV3's hard-swish: its "/ 6" folds into the depthwise convolution's input side, the
    # BN after it into its output side
    h = PF.convolution(x, 4, (1, 1), with_bias=False, name="pw")
    h = PF.batch_normalization(h, batch_stat=batch_stat, name="bn1")
    h = h * F.relu6(h + 3) / 6
    h = PF.depthwise_convolution(h, (3, 3), pad=(1, 1), with_bias=False, name="dw")
    return PF.batch_normalization(h, batch_stat=batch_stat, name="bn2") if last else h


def shared_layer(path, kind, main, parameter_format=".h5", seed=3):
    """Two networks over the same parameters, one layer of which folds on both of its sides in the
    second, MainRuntime. The first, Main, is the same network training (batch_stat=True), "plain"
    (the same folds), or "shorter": without the last BN, so that the layer folds on one side only."""
    nn.clear_parameters()
    rng = np.random.RandomState(seed)
    xa, xb = nn.Variable((2, 3, 5, 5)), nn.Variable((2, 3, 5, 5))
    ya = _shared_layer_net(xa, main == "training", kind, last=main != "shorter")
    yb = _shared_layer_net(xb, False, kind)
    randomize_all(rng)
    save(str(path), {"networks": [
        {"name": "Main", "batch_size": 2, "outputs": {"y": ya}, "names": {"x": xa}},
        {"name": "MainRuntime", "batch_size": 2, "outputs": {"y": yb}, "names": {"x": xb}}],
        "executors": [{"name": "Runtime", "network": "MainRuntime", "data": ["x"], "output": ["y"]}]},
        parameter_format=parameter_format)
    nn.clear_parameters()
    return path
