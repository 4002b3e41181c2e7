"""Models built in code with random weights and non-trivial BN statistics, for the demo, the
benchmark and the tests (nothing is downloaded)."""
import numpy as np
import nnabla as nn
import nnabla.functions as F
import nnabla.parametric_functions as PF


def _conv_bn(x, maps, kernel, stride=1, name="", relu=True):
    pad = kernel // 2
    h = PF.convolution(x, maps, (kernel, kernel), pad=(pad, pad), stride=(stride, stride),
                       with_bias=False, name=name + "/conv")
    h = PF.batch_normalization(h, batch_stat=False, name=name + "/bn")
    return F.relu(h) if relu else h


def _bottleneck(x, width, stride, name):
    out = width * 4
    h = _conv_bn(x, width, 1, 1, name + "/c1")
    h = _conv_bn(h, width, 3, stride, name + "/c2")
    h = _conv_bn(h, out, 1, 1, name + "/c3", relu=False)
    if stride != 1 or x.shape[1] != out:
        x = _conv_bn(x, out, 1, stride, name + "/shortcut", relu=False)
    return F.relu(F.add2(h, x))


def resnet50(x, width=64, classes=1000, blocks=(3, 4, 6, 3)):
    """ResNet-50 (v1.5: stride in the 3x3 conv) on NCHW input ``x``; ``width`` is the first stage's
    width (64 in the paper). Every conv is followed by a BN."""
    h = _conv_bn(x, width, 7, 2, "stem")
    h = F.max_pooling(h, (3, 3), (2, 2), pad=(1, 1))
    for stage, n in enumerate(blocks):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            h = _bottleneck(h, width * 2 ** stage, stride, f"l{stage}/b{b}")
    h = F.global_average_pooling(h)
    return PF.affine(h, classes, name="fc")


def randomize(params, seed=0):
    """Random weights (He scale) and BN statistics far from identity (mean != 0, var != 1),
    written into ``params`` (name -> Variable)."""
    rng = np.random.RandomState(seed)
    for name, v in params.items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "var":
            value = rng.uniform(0.5, 2.0, v.shape)
        elif leaf == "mean":
            value = rng.normal(0.0, 0.5, v.shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, v.shape)
        elif leaf in ("beta", "b"):
            value = rng.normal(0.0, 0.2, v.shape)
        else:
            fan_in = int(np.prod(v.shape[1:])) if v.ndim > 1 else v.shape[0]
            value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), v.shape)
        # NNabla keeps the dtype last written: float64 data would make a float64 model.
        v.d = value.astype(np.float32)


def build_resnet50(width=64, size=64, batch=1, seed=0, scope="resnet50"):
    """(input, output) of a fresh ResNet-50 with randomized weights and BN statistics, its parameters
    under ``scope``."""
    x = nn.Variable((batch, 3, size, size))
    with nn.parameter_scope(scope):
        y = resnet50(x, width)
        randomize(nn.get_parameters(grad_only=False), seed)
    x.d = np.random.RandomState(seed + 1).randn(*x.shape)
    return x, y
