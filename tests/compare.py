"""How a kernel's fold is held against the NumPy backend's (nnabla-free: the host and GPU tests share it)."""
import numpy as np

from bnfold_gpu.plan import OUTPUT_SIDE


def assert_same_fold(plan, got, want):
    """Folded weights and output-side biases bit for bit; BN -> layer biases, sums reduced in another
    order than NumPy's, to float64 rounding and then the dtype's."""
    for spec in plan.folds:
        g, w = got[spec.folded_weight], want[spec.folded_weight]
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), (spec.kind, spec.side, g.dtype)
        g, w = got[spec.folded_bias], want[spec.folded_bias]
        if spec.side == OUTPUT_SIDE:
            assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), (spec.kind, g.dtype)
        else:
            tol = 1e-3 if g.dtype == np.float16 else 1e-6
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol,
                                       err_msg=f"{spec.kind} {g.dtype}")
