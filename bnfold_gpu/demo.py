"""`make demo`: fold a ResNet-50 built in code, check it, and time it beside NNabla's converter."""
import argparse
import time

import numpy as np

import bnfold_gpu
from .cli import quiet_nnabla_info


def nnabla_converter_seconds(width: int, size: int) -> float:
    """Time NNabla's own BatchNormalizationFoldingModifier on a fresh twin of the model."""
    import nnabla as nn
    from nnabla.experimental.graph_converters import (BatchNormalizationFoldingModifier,
                                                      GraphConverter)
    from .models import build_resnet50
    nn.clear_parameters()
    _, y = build_resnet50(width, size)
    with nn.parameter_scope("resnet50"):
        t = time.perf_counter()
        GraphConverter(BatchNormalizationFoldingModifier()).convert(y)
        return time.perf_counter() - t


def save_model(path: str, width: int, size: int) -> int:
    """The demo's ResNet-50, unfolded, as an .nnp file with one network and an executor."""
    import nnabla as nn
    from nnabla.utils.save import save
    from .models import build_resnet50
    nn.clear_parameters()
    x, y = build_resnet50(width, size)
    with nn.parameter_scope("resnet50"):
        save(path, {"networks": [{"name": "resnet50", "batch_size": 1, "outputs": {"y": y},
                                  "names": {"x": x}}],
                    "executors": [{"name": "runtime", "network": "resnet50", "data": ["x"],
                                   "output": ["y"]}]})
    print(f"saved ResNet-50 (width {width}, {size}x{size} input) to {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=64,
                    help="channels of the first stage (64: ResNet-50's own, 94 MB of weights)")
    ap.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    ap.add_argument("--save", metavar="PATH.nnp",
                    help="save the unfolded model as an .nnp file (for `bnfold`) instead of running "
                         "the demo")
    args = ap.parse_args(argv)
    quiet_nnabla_info()
    import nnabla as nn
    from .models import build_resnet50
    if args.save:
        return save_model(args.save, args.width, args.size)

    nn.clear_parameters()
    x, y = build_resnet50(args.width, args.size)
    y.forward(clear_buffer=True)
    before = y.d.copy()
    res = bnfold_gpu.fold(y)
    res.outputs.forward(clear_buffer=True)
    err = float(np.abs(res.outputs.d - before).max() / np.abs(before).max())

    print(res.plan.table())
    print()
    n_bytes = res.plan.bytes_rescaled()
    print(f"ResNet-50 (width {args.width}, {args.size}x{args.size} input), "
          f"{n_bytes / 1e6:.1f} MB of weights rescaled, backend {res.backend}")
    print(f"folded vs original output: max relative error {err:.2e}")
    ours = res.seconds["total"]
    theirs = nnabla_converter_seconds(args.width, args.size)
    print(f"bnfold_gpu.fold:                   {ours * 1e3:8.1f} ms  "
          + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in res.seconds.items() if k != "total"))
    print(f"NNabla BatchNormalizationFolding:  {theirs * 1e3:8.1f} ms  ({theirs / ours:.0f}x slower)")
    ok = err < 1e-5 and not res.skipped
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
