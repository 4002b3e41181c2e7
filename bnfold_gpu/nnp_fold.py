"""Fold an .nnp file into another: what ``bnfold fold`` does, as a function that returns a report.

read -> plan -> fold -> write beside the target -> verify (optional) -> rename into place. Every stage that can fail
runs before the rename, so the target is either the complete folded file or exactly as it was. The
:class:`Report` says what was done; the command line prints it and saves it as JSON.

Importing this module does not import nnabla; calling :func:`fold_nnp` does.
"""
import math
import numbers
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import _atomic, _safe_points
from ._scope_lock import SCOPE_LOCK
from .backends import get_backend
from .backends.common import FoldError
from .plan import check_flag, check_path, skip_patterns, warn_unmatched_skips
from . import __version__

SCHEMA_VERSION = 1   # of Report.to_json(); raised when a field changes meaning or goes away

# --verify's default largest relative error. Folding rounds each folded weight to its dtype: float32
# folds differ from the unfolded network by about 1e-6, float16 folds (11-bit mantissa) by about
# 7e-4 on small networks.
DEFAULT_TOLERANCE = 1e-4
FLOAT16_TOLERANCE = 5e-3


class VerificationFailed(Exception):
    """--verify found an output of the folded file differing past the tolerance; nothing was
    written. ``report`` says which."""

    def __init__(self, message: str, report: "Report"):
        super().__init__(message)
        self.report = report


class VerificationImpossible(Exception):
    """--verify cannot run the original file where it runs (NNabla's current context lacks a
    function it needs); nothing was written. ``report`` says why."""

    def __init__(self, message: str, report: "Report"):
        super().__init__(message)
        self.report = report


@dataclass
class NetworkReport:
    """One network of the file: the BNs folded and those kept, each with why."""
    name: str
    uses_batch_statistics: bool            # has a BN with batch_stat=True
    folded: List[dict] = field(default_factory=list)     # one record per layer side a map folds into
    skipped: List[dict] = field(default_factory=list)
    note: Optional[str] = None             # why it was not planned (e.g. "no outputs")
    bns_folded: int = 0

    @property
    def folded_count(self) -> int:
        """BNs folded."""
        return self.bns_folded

    @property
    def kept_count(self) -> int:
        return len(self.skipped)

    @property
    def has_bn(self) -> bool:
        return bool(self.folded or self.skipped)

    def to_json(self) -> dict:
        return {"uses_batch_statistics": self.uses_batch_statistics,
                "folded_count": self.folded_count, "kept_count": self.kept_count,
                "folded": self.folded, "skipped": self.skipped, "note": self.note}


@dataclass
class VerifyReport:
    """What --verify compared: one record per network output (``network``, ``output``, ``max_abs``,
    ``max_rel``, ``passed``; ``error`` when the folded network did not run)."""
    tolerance: float
    atol: float
    seed: int
    inputs: Dict[str, str]                 # network input -> where its data came from
    networks: List[str]
    outputs: List[dict] = field(default_factory=list)

    @property
    def failures(self) -> List[dict]:
        return [r for r in self.outputs if not r["passed"]]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {"tolerance": self.tolerance, "atol": self.atol, "seed": self.seed,
                "inputs": self.inputs, "networks": self.networks, "outputs": self.outputs}


@dataclass
class Report:
    """What a fold did. ``output`` is the file written, None when nothing was (``not_written`` says
    why); ``seconds`` holds read, plan, fold, write, verify (only when verifying) and total."""
    input: str
    requested_output: str
    output: Optional[str] = None
    not_written: Optional[str] = None
    backend: Optional[str] = None
    bytes_rescaled: int = 0
    networks: List[NetworkReport] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    verify: Optional[VerifyReport] = None
    schema_version: int = SCHEMA_VERSION
    version: str = __version__

    @property
    def n_folded(self) -> int:
        return sum(n.folded_count for n in self.networks)

    @property
    def n_kept(self) -> int:
        return sum(n.kept_count for n in self.networks)

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "tool": "bnfold", "version": self.version,
                "input": self.input, "output": self.output,
                "requested_output": self.requested_output, "not_written": self.not_written,
                "backend": self.backend, "bytes_rescaled": self.bytes_rescaled,
                "folded_count": self.n_folded, "kept_count": self.n_kept,
                "seconds": self.seconds,
                "networks": {n.name: n.to_json() for n in self.networks},
                "verify": self.verify.to_json() if self.verify else None}


def network_reports(fp) -> List[NetworkReport]:
    """The :class:`NetworkReport` of each network of a FilePlan (of ``nnp.plan_file``)."""
    return [NetworkReport(
        n.name, n.training,
        [{"bn": s.bn, "bns": list(s.bns), "maps": list(s.maps), "into": s.kind, "side": s.side,
          "weight": s.weight, "folded_weight": s.folded_weight, "folded_bias": s.folded_bias,
          "note": s.note}
         for s in fp.folds.get(n.name, [])],
        [{"bn": s.bn, "reason": s.reason} for s in (n.plan.skipped if n.plan else [])],
        n.error, len(n.plan.folded_bns) if n.plan else 0) for n in fp.networks]


class _Silent:
    """The progress of a caller that shows none."""

    def step(self, label):
        pass

    def add_steps(self, n):
        pass

    def expect(self, nbytes):
        pass

    def extend(self, nbytes):
        pass

    def advance(self, nbytes):
        pass


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file: through symlinks and hard links, or (one missing)
    resolving to the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def fold_nnp(src, dst=None, *, backend: str = "auto", verify: bool = False,
             tolerance: Optional[float] = None, atol: float = 0.0, seed: int = 0,
             inputs=None, in_place: bool = False, skip=(), progress=None) -> Report:
    """Fold every BN of the .nnp file ``src`` that folds exactly, and write the result to ``dst``
    (or over ``src`` with ``in_place``). Returns the :class:`Report`. ``skip``: BN names or glob
    patterns to leave in place.

    ``dst`` is written as a new file beside it, renamed into place only when complete (and, with
    ``verify``, verified): a symlink is written through (its target gets the folded file), an
    existing file keeps its owner, group (where permitted) and mode, other hard links to it keep
    the original. ``verify`` runs every network of both files on the same inputs (``inputs``:
    {network input name: array, or the path of a .npy file}; seeded random values for the rest) and
    compares every output the networks have or their executors declare: an output passes if its max
    abs error is at most ``atol`` or its max relative error at most ``tolerance`` (default: 1e-4,
    5e-3 when a folded weight is float16).

    Raises NnpError (bad input, or the output cannot be written), FoldError, VerificationFailed or
    VerificationImpossible, with nothing written; ValueError/RuntimeError for an unusable backend.
    ``progress`` (optional) receives ``add_steps(n)``, ``step(label)`` and per-byte
    ``expect``/``extend``/``advance`` calls."""
    from . import nnp as N
    clock = _Stages()
    src = check_path("src", src)
    if dst is not None:
        dst = check_path("dst", dst)
    verify, in_place, skip = check_flag("verify", verify), check_flag("in_place", in_place), \
        skip_patterns(skip)
    for name, value in (("tolerance", tolerance), ("atol", atol)):
        if value is None and name == "tolerance":   # the default, by the weights' dtype
            continue
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and
                                           math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {value!r:.40}: a tolerance is a finite number >= 0")
    if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2 ** 32):
        raise ValueError(f"seed {seed!r:.40}: a seed is an integer from 0 to 2**32 - 1")
    out, target = _output(src, dst, in_place)
    get_backend(backend, on_device=False)   # an unusable backend is said before a file is read
    given = _load_inputs(inputs)
    _atomic.remove_stale(os.path.dirname(target), keep=[src])
    progress = progress or _Silent()
    report = Report(src, out, seconds=clock.seconds)

    progress.add_steps(1)
    progress.step(f"reading {src}")
    with clock("read"):
        f = N.read(src, progress)
    if given:
        _check_inputs(src, f.proto, given)
    if verify:
        N.check_verify_memory(src, f.proto)
    n_nets = len(f.proto.network)
    verify_steps = 2 + 2 * n_nets if verify else 0   # corrected once the networks to run are known
    progress.add_steps(n_nets + 2 + verify_steps)     # planning each network, folding, writing
    original = (src, N.structure(f.proto)) if verify else None   # before the rewrite
    fp, report.backend, report.bytes_rescaled = _fold(f, backend, progress, clock, skip)
    report.networks = network_reports(fp)
    if tolerance is None:
        tolerance = FLOAT16_TOLERANCE if any(
            f.params[s.folded_weight].value.dtype.itemsize <= 2 for s in fp.unique
            if s.folded_weight in f.params) else DEFAULT_TOLERANCE

    progress.step("writing")
    pending = None
    try:
        with clock("write"):   # leaving it is a safe point: Ctrl-C there discards the written file
            try:
                _atomic.check_room(out, os.path.dirname(target), _space_needed(f), size_words)
            except _atomic.TargetError as e:
                raise N.NnpError(str(e)) from None
            pending = N.write_temp(f, target, progress)
        clock.seconds["write_sync"] = pending.sync_seconds   # part of "write": made durable
        f.params.clear()   # written; --verify loads both files, so hold no third copy of the weights
        if verify:
            # every network that can run, folded or not: one that folds nothing may still read a
            # parameter that another network's fold rewrote
            nets = [n.name for n in fp.networks if n.plan is not None] if fp.unique else []
            progress.add_steps((2 + 2 * len(nets) if nets else 0) - verify_steps)
            report.verify = VerifyReport(tolerance, atol, seed,
                                         {k: label for k, (_, label) in given.items()}, nets)
            with clock("verify"):
                _verify(report, original, (pending.path, f.proto), given, progress)
        _safe_points.check()
        clock.seconds["total"] = clock.total()
        report.output = out        # set before the rename: nothing after it can fail
        try:
            pending.commit()
        except OSError as e:
            report.output = None
            raise N.NnpError(f"{out}: cannot replace it: {_atomic.reason(e)}; nothing written") \
                from None
    except BaseException:
        if pending is not None:
            pending.discard()
        raise
    return report


def load(path, network: Optional[str] = None, *, batch_size: Optional[int] = None,
         backend: str = "auto", skip=(), with_report: bool = False):
    """The networks of the .nnp file ``path``, folded in memory, as NNabla's ``NnpLoader`` hands
    them: an ``NnpNetwork`` (``.inputs``, ``.outputs``, ``.variables``) for ``network``, or a dict of
    every network's by name when it is None; ``batch_size`` as ``get_network`` takes it. Like
    ``NnpLoader.get_network``, each network's parameters (the folded ones, not the folded BNs') are
    set in the current parameter scope, so ``nnabla.utils.save`` then writes the folded model. No
    file is written. ``with_report``: returns (networks, :class:`Report`) instead.

    Raises NnpError (a file that cannot be read, an unknown network) or FoldError, having set no
    parameter."""
    import nnabla as nn
    from . import nnp as N
    clock = _Stages()
    src = check_path("path", path)
    skip = skip_patterns(skip)
    with_report = check_flag("with_report", with_report)
    if network is not None and not isinstance(network, str):
        raise TypeError(f"network must be a network's name (str) or None, not "
                        f"{type(network).__name__}")
    get_backend(backend, on_device=False)
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, numbers.Integral)):
        raise TypeError(f"batch_size must be an integer or None, not {type(batch_size).__name__} "
                        f"({batch_size!r:.40})")
    if batch_size is not None and not 1 <= batch_size <= N.MAX_BATCH:
        raise ValueError(f"batch_size must be from 1 to {N.MAX_BATCH}, not {batch_size}")
    with clock("read"):
        f = N.read(src)
    names = f.network_names()
    if network is not None and network not in names:
        raise N.NnpError(f"{src}: no network named '{network}' (it has: {', '.join(names)})")
    wanted = [network] if network is not None else names
    fp, used_backend, nbytes = _fold(f, backend, _Silent(), clock, skip)
    report = Report(src, "", not_written="loaded in memory", backend=used_backend,
                    bytes_rescaled=nbytes, networks=network_reports(fp), seconds=clock.seconds)
    with clock("build"):
        _, built = N.build_networks(src, f.proto, set(wanted), parsed=True, values=f.params,
                                    batch_size=batch_size)
    with SCOPE_LOCK:   # into the caller's scope, not one a file read in another thread made current
        for name in wanted:   # what NnpLoader.get_network does once a network is built
            for key, v in built[name][1].proto_network.parameters.items():
                nn.parameter.set_parameter(key, v.variable_instance)
    clock.seconds["total"] = clock.total()
    nets = {name: built[name][1] for name in wanted}
    result = nets[network] if network is not None else nets
    return (result, report) if with_report else result


class _Stages:
    """Seconds spent per stage (a stage run twice adds up); leaving one is a safe point for Ctrl-C."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: Dict[str, float] = {}

    def total(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def __call__(self, name):
        since = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since
        _safe_points.check()


def _output(src: str, dst, in_place: bool):
    """(the output as named, the file to write) for fold_nnp's arguments; NnpError, before any work,
    for an output that could not be written."""
    from . import nnp as N
    if dst is None and not in_place:
        raise N.NnpError("give an output file, or in-place folding (--in-place; in_place=True "
                         "from Python) to replace the input")
    out = src if dst is None else os.fspath(dst)
    if dst is not None and not in_place and os.path.exists(src) and same_file(src, out):
        raise N.NnpError(f"{out}: the output is the input; ask for in-place folding (--in-place; "
                         f"in_place=True from Python) to replace it")
    try:
        target = _atomic.check_target(out)
    except _atomic.TargetError as e:
        raise N.NnpError(str(e)) from None
    if dst is not None and not out.lower().endswith(".nnp"):
        raise N.NnpError(f"{out}: bnfold writes .nnp files; give an output name ending in .nnp")
    return out, target


def _fold(f, backend, progress, clock, skip=()):
    """Plan and fold ``f`` in memory. Returns (the FilePlan, backend name, bytes rescaled)."""
    from . import nnp as N
    from .folding import _relative_imports_fail_fast   # NNabla's failing imports, failed at once
    skip = skip_patterns(skip)
    with _relative_imports_fail_fast():
        with clock("plan"):
            fp = N.plan_file(f, progress, skip=skip)
        warn_unmatched_skips(skip, [n.plan for n in fp.networks if n.plan is not None], "the file")
        progress.step("folding")
        with clock("fold"):
            try:
                name, nbytes = N.fold_parameters(f, fp, backend)
            except FoldError as e:   # named by BN and array: the file first, as every refusal
                raise FoldError(f"{f.path}: {e}") from None
            N.rewrite_proto(f, fp)
    return fp, name, nbytes


def _verify(report, original, folded, given, progress) -> None:
    """Fill ``report.verify.outputs``; VerificationImpossible or VerificationFailed (with the report,
    saying why nothing was written) unless every output passes."""
    from . import nnp as N
    v = report.verify
    try:
        records = N.verify(original, folded, v.networks, seed=v.seed, progress=progress,
                           inputs={k: value for k, (value, _) in given.items()})
    except N.VerifyImpossible as e:
        report.not_written = f"cannot verify: {e}"
        raise VerificationImpossible(f"{report.input}: cannot verify: {e}; "
                                     f"{report.requested_output} not written", report) from None
    for r in records:
        r["passed"] = _passes(r, v.tolerance, v.atol)
    v.outputs = records
    if not v.passed:
        why = _failure_words(v.failures, v.tolerance, v.atol)
        report.not_written = f"verification failed: {why}"
        raise VerificationFailed(f"verification failed: {why}; {report.requested_output} not "
                                 f"written", report)


def _passes(record, tolerance, atol) -> bool:
    # written so that NaN fails
    return bool(record["max_abs"] <= atol or record["max_rel"] <= tolerance)


def _failure_words(failures, tolerance, atol) -> str:
    worst = max(failures, key=lambda r: (r["max_rel"], r["max_abs"]))
    if worst.get("error"):
        return f"the folded network '{worst['network']}' does not run: {worst['error']}"
    bound = f"> {tolerance:g}" + (f", and by {worst['max_abs']:.2e} (absolute) > {atol:g}"
                                  if atol else "")
    return (f"network '{worst['network']}' output '{worst['output']}' differs by "
            f"{worst['max_rel']:.2e} (relative) {bound}")


def _space_needed(f) -> int:
    """Bytes the output's folder must have free to write ``f``: the output (its parameters are
    written once, in place, whatever their format)."""
    params = sum(p.value.nbytes for p in f.params.values())
    others = sum(len(v) for v in f.raw.values()) + 3 * f.proto.ByteSize()   # text is wordier
    if f.param_member is None:
        return others + 4 * params      # parameters as decimal text in the network definition
    from . import nnp as N
    if N._is_h5_params(f.param_member):   # HDF5's structure: about 1.5 kB a dataset
        return others + params + 4096 * (len(f.params) + 1)
    return others + params + 64 * len(f.params)   # each parameter's name, shape and flag


def size_words(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _load_inputs(inputs) -> Dict[str, tuple]:
    """{name: (array, where it came from)} of ``fold_nnp``'s ``inputs``; a path is read as .npy."""
    import numpy as np
    from . import nnp as N
    loaded = {}
    if inputs is not None and not hasattr(inputs, "items"):
        raise TypeError(f"inputs must be a dict of input name -> array or .npy path, not "
                        f"{type(inputs).__name__}")
    for name, value in (inputs or {}).items():
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            loaded[name] = (_read_npy(path), path)
        else:
            loaded[name] = (np.asarray(value), "an array")
        if loaded[name][0].dtype.kind not in "biuf":
            raise N.NnpError(f"input '{name}': {loaded[name][1]} holds {loaded[name][0].dtype} "
                             f"values; a network input takes numbers")
    return loaded


def _read_npy(path: str):
    import stat
    import numpy as np
    from . import nnp as N
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise N.NnpError(f"{path}: no such file") from None
    except OSError as e:
        raise N.NnpError(f"{path}: {_atomic.reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise N.NnpError(f"{path}: not a regular file")
    try:
        value = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise N.NnpError(f"{path}: not a .npy file NumPy can read ({N._one_line(e)})") from None
    if not isinstance(value, np.ndarray):
        raise N.NnpError(f"{path}: holds several arrays (.npz); give one .npy file per input")
    return value


def _check_inputs(src, proto, given) -> None:
    """Each given input is an input of some network, of the shape that network declares."""
    from . import nnp as N
    found = set()
    for net in proto.network:
        produced = {o for fn in net.function for o in fn.output}
        for v in net.variable:
            if v.name not in given or v.name in produced or v.type == "Parameter":
                continue
            found.add(v.name)
            shape = tuple(net.batch_size if d < 0 else d for d in v.shape.dim)
            value, label = given[v.name]
            if math.prod(shape) and tuple(value.shape) != shape:
                raise N.NnpError(f"input '{v.name}' of network '{net.name}' has shape {shape}; "
                                 f"{label} holds shape {tuple(value.shape)}")
    missing = sorted(set(given) - found)
    if missing:
        raise N.NnpError(f"{src}: no network has an input named '{missing[0]}'")


__all__ = ["fold_nnp", "Report", "NetworkReport", "VerifyReport", "VerificationFailed",
           "VerificationImpossible", "network_reports", "same_file", "SCHEMA_VERSION",
           "DEFAULT_TOLERANCE", "FLOAT16_TOLERANCE"]
