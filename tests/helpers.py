"""Shared by the nnabla tests: random BN statistics far from identity, and fold-vs-original checks."""
import numpy as np

import bnfold_gpu
from bnfold_gpu.graph import parameter_names


def randomize_all(rng, scope=None):
    """Random values in every registered parameter; variances positive and far from 1, means far
    from 0, so an identity BN cannot hide a bug."""
    for var, name in parameter_names(scope).items():
        shape = var.shape
        if name.endswith("var"):
            var.d = rng.uniform(0.3, 3.0, shape).astype(np.float32)
        elif name.endswith("mean"):
            var.d = rng.normal(0.5, 1.0, shape).astype(np.float32)
        elif name.endswith("gamma"):
            var.d = rng.uniform(0.5, 2.0, shape).astype(np.float32) * rng.choice([-1, 1], shape)
        else:
            var.d = rng.normal(0.0, 1.0, shape).astype(np.float32)


def feed(rng, *inputs):
    for x in inputs:
        x.d = rng.normal(0.0, 1.0, x.shape).astype(np.float32)


def forward_all(outputs):
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for o in outs:
        o.forward(clear_buffer=False)
    return [o.d.copy() for o in outs]


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def assert_fold_exact(outputs, tol=1e-5, **kwargs):
    """Fold ``outputs``; the folded graph's outputs equal the original's on the same inputs."""
    before = forward_all(outputs)
    res = bnfold_gpu.fold(outputs, **kwargs)
    after = forward_all(res.outputs)
    for a, b in zip(after, before):
        assert a.shape == b.shape
        assert rel_err(a, b) < tol, rel_err(a, b)
    return res


def function_types(outputs):
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    types = []
    seen = set()

    def add(f):
        if f not in seen:
            seen.add(f)
            types.append(f.info.type_name)
    for o in outs:
        o.visit(add)
    return types


def bn_count(outputs):
    return sum(t in ("BatchNormalization", "FusedBatchNormalization") for t in function_types(outputs))


def snapshot(scope=None):
    return {name: var.d.copy() for var, name in parameter_names(scope).items()}
