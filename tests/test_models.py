"""Whole models: a ResNet-50 built in code, and a file made by NNabla's ONNX importer."""
from pathlib import Path

import numpy as np
import pytest

nn = pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")
from nnabla.utils.nnp_graph import NnpLoader

import bnfold_gpu
from bnfold_gpu.models import build_resnet50
from helpers import bn_count, forward_all, rel_err

DATA = Path(__file__).parent / "data"


def test_resnet50_folds_every_bn():
    x, y = build_resnet50(width=16, size=32, batch=2)
    before = forward_all(y)[0]
    assert bn_count(y) == 53
    res = bnfold_gpu.fold(y)
    assert len(res.folded) == 53 and res.skipped == ()
    assert bn_count(res.outputs) == 0
    assert rel_err(forward_all(res.outputs)[0], before) < 1e-5


def test_onnx_imported_lone_bn_stays_correct():
    nnp = NnpLoader(str(DATA / "sony_onnxref_batch_norm.nnp"))
    net = nnp.get_network("batch_norm_net", batch_size=2)
    y = net.outputs["out_data_1"]
    res = bnfold_gpu.fold(y)
    assert res.folded == ()
    assert "no layer before it" in res.skipped[0].reason
    out = forward_all(res.outputs)[0]
    expected = np.load(DATA / "sony_onnxref_batch_norm.nnabla_output.npy")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
