"""``bnfold``: fold the batch normalizations of .nnp files.

  bnfold inspect IN.nnp [--json]
  bnfold fold IN.nnp -o OUT.nnp [--backend auto|numpy|cupy] [--verify] [--tolerance T]
              [--report REPORT.json] [--in-place] [--quiet]

Exit status: 0 done; 1 --verify found outputs differing past the tolerance (nothing written);
2 bad input (a one-line message on stderr; nothing written).
"""
import argparse
import json
import logging
import math
import os
import sys
import time

from .backends import get_backend
from .plan import format_table as _table

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


class Progress:
    """A one-line progress bar on stderr for a terminal, plain lines otherwise; silent when quiet.
    ``step`` starts a stage; within one, ``expect``/``extend``/``advance`` count bytes, shown as a
    percentage (on a terminal at most every ``TTY_EVERY`` seconds, in plain lines every
    ``LINE_EVERY``)."""
    TTY_EVERY, LINE_EVERY = 0.1, 5.0

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = max(1, total), 0, quiet
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.expect(0)

    def step(self, label: str):
        self.done = min(self.total, self.done + 1)
        self.label = label
        self.expect(0)
        self._draw(label)

    def expect(self, nbytes: int):
        """The current stage will count ``nbytes``."""
        self.bytes_total, self.bytes_done, self._next = nbytes, 0, 0
        self._shown = time.monotonic()

    def extend(self, nbytes: int):
        """The current stage will count ``nbytes`` more than expected."""
        self.bytes_total += nbytes

    def advance(self, nbytes: int):
        self.bytes_done += nbytes
        if self.quiet or self.bytes_done < self._next or not self.bytes_total:
            return
        self._next = self.bytes_done + self.bytes_total // 100   # cheap until the next percent
        now = time.monotonic()
        if now - self._shown >= (self.TTY_EVERY if self.tty else self.LINE_EVERY):
            self._shown = now
            percent = min(100, 100 * self.bytes_done // self.bytes_total)
            self._draw(f"{self.label}: {percent}%" if not self.tty else f"{percent:3d}% {self.label}")

    def _draw(self, label: str):
        if self.quiet:
            return
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {label[:50]:<50}")
            sys.stderr.flush()
        else:
            sys.stderr.write(f"bnfold: {label}\n")

    def close(self):
        if self.tty and not self.quiet:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _fold_records(fp):
    return {n.name: {
        "training": n.training,
        "folded": [{"bn": s.bn, "into": s.kind, "side": s.side, "weight": s.weight,
                    "folded_weight": s.folded_weight, "folded_bias": s.folded_bias, "note": s.note}
                   for s in fp.folds.get(n.name, [])],
        "skipped": [{"bn": s.bn, "reason": s.reason, "next_pass": s.next_pass}
                    for s in (n.plan.skipped if n.plan else [])],
    } for n in fp.networks}


def _print_plan(fp, out=None):
    out = out or sys.stdout
    for n in fp.networks:
        folds = fp.folds.get(n.name, [])
        skipped = n.plan.skipped if n.plan else []
        print(f"network {n.name}: {len(folds)} to fold, {len(skipped)} to keep"
              + (" (training network)" if n.training else ""), file=out)
        if folds:
            print(_table([("BN", "into", "side", "weight")] +
                         [(s.bn, s.kind, s.side, s.weight) for s in folds]), file=out)
        if skipped:
            print(_table([("BN kept", "reason")] + [(s.bn, s.reason) for s in skipped]), file=out)
        print(file=out)


def cmd_inspect(args):
    from . import nnp as N
    progress = Progress(2, quiet=args.json)
    progress.step(f"reading {args.input}")
    f = N.read(args.input, progress)
    progress.step("planning")
    fp = N.plan_file(f)
    progress.close()
    if args.json:
        print(json.dumps({"input": args.input, "networks": _fold_records(fp)}, indent=2))
    else:
        _print_plan(fp)
        later = sum(s.next_pass for _, s in fp.skipped)
        print(f"{fp.n_folded} BN(s) would fold, {len(fp.skipped)} would stay"
              + (f"; {later} of those fold on a later pass, which bnfold fold runs too" if later
                 else ""))
    return EXIT_OK


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _failed(record, tolerance) -> bool:
    return not record["max_rel"] <= tolerance   # NaN fails too


def _same_file(a, b):
    if os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _check_writable(path, error):
    """Raises ``error`` unless a file can be written at ``path``: checked before any work, so that
    nothing is written when the end of the run could not be."""
    if os.path.isdir(path):
        raise error(f"{path}: is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise error(f"{path}: folder {folder} is not writable")


def _write_json(path, value):
    """``path`` holds all of ``value`` or is left as it was."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(value, fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_fold(args):
    from . import nnp as N
    if args.output is None and not args.in_place:
        raise N.NnpError("give -o OUT.nnp, or --in-place to replace the input")
    out_path = args.input if args.output is None else args.output
    if os.path.exists(args.input) and _same_file(args.input, out_path) and not args.in_place:
        raise N.NnpError(f"{out_path}: the output is the input; give --in-place to replace it")
    _check_writable(out_path, N.NnpError)
    if args.report:
        _check_writable(args.report, N.NnpError)
        for path in {args.input, out_path}:
            if os.path.exists(path) and _same_file(path, args.report):
                raise N.NnpError(f"{args.report}: the report would overwrite {path}")
    get_backend(args.backend)   # an unusable backend is said before a large file is read
    t0 = time.perf_counter()
    progress = Progress(5, args.quiet)   # each step names the stage that starts
    progress.step(f"reading {args.input}")
    f = N.read(args.input, progress)
    n_nets = len(f.proto.network)
    progress.total += n_nets + (2 + 2 * n_nets if args.verify else 0)
    fp = N.plan_file(f, progress)
    original = (args.input, N.structure(f.proto)) if args.verify else None   # before the rewrite
    progress.step("folding")
    backend, nbytes = N.fold_parameters(f, fp, args.backend)
    N.rewrite_proto(f, fp)
    passes = [fp]
    while any(s.next_pass for _, s in passes[-1].skipped):   # a layer takes one BN per pass
        progress.total += n_nets + 1
        more = N.plan_file(f, progress)
        if not more.n_folded:
            break
        progress.step(f"folding (pass {len(passes) + 1})")
        nbytes += N.fold_parameters(f, more, args.backend)[1]
        N.rewrite_proto(f, more)
        passes.append(more)
    fp = N.merge_passes(passes)
    progress.step("writing")
    tmp = N.write_temp(f, out_path, progress)
    f.params.clear()   # written; --verify loads both files, so hold no third copy of the weights
    fold_seconds = time.perf_counter() - t0
    records = []
    try:
        if args.verify:
            # every network that can run, folded or not: one that folds nothing may still read a
            # parameter that another network's fold rewrote
            nets = [n.name for n in fp.networks if n.plan is not None and not n.training] \
                if fp.n_folded else []
            records = N.verify(original, (tmp, f.proto), nets, seed=args.seed, progress=progress)
        bad = [r for r in records if _failed(r, args.tolerance)]
        seconds = {"fold": fold_seconds, "verify": time.perf_counter() - t0 - fold_seconds}
        if args.report:   # before the output is in place: a report that cannot be written stops both
            _write_json(args.report, {
                "input": args.input, "output": None if bad else out_path, "backend": backend,
                "bytes_rescaled": nbytes, "seconds": seconds, "networks": _fold_records(fp),
                "verify": {"tolerance": args.tolerance, "outputs": records} if args.verify else None})
        if bad:
            os.unlink(tmp)
        else:
            os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    progress.step("done")
    progress.close()
    if not args.quiet:
        _print_summary(fp, nbytes, backend, seconds, records, args)
    if bad:
        worst = max(bad, key=lambda r: r["max_rel"])
        print(f"bnfold: verification failed: network '{worst['network']}' output '{worst['output']}' "
              f"differs by {worst['max_rel']:.2e} (relative) > {args.tolerance:g}; "
              f"{out_path} not written", file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_OK


def _print_summary(fp, nbytes, backend, seconds, records, args):
    rows = [("network", "folded", "kept")]
    for n in fp.networks:
        rows.append((n.name + (" (training)" if n.training else ""), len(fp.folds.get(n.name, [])),
                     len(n.plan.skipped) if n.plan else 0))
    print(_table(rows))
    reasons = {}
    for net, s in fp.skipped:
        reasons.setdefault(s.reason, []).append(f"{net}:{s.bn}")
    if reasons:
        print()
        print(_table([("kept because", "BNs")] +
                     [(r, ", ".join(v[:3]) + (f" (+{len(v) - 3})" if len(v) > 3 else ""))
                      for r, v in reasons.items()]))
    print()
    print(f"{fp.n_folded} BN(s) folded, {len(fp.skipped)} kept; {_size(nbytes)} of weights "
          f"rescaled on {backend}; read, folded and written in {seconds['fold']:.2f} s")
    if args.verify:
        print()
        if records:
            print(_table([("verify: network", "output", "max abs err", "max rel err")] +
                         [(r["network"], r["output"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}")
                          for r in records]))
        else:
            print("verify: no network to run (nothing folded, or only training networks)")
        print(f"verified in {seconds['verify']:.2f} s (tolerance {args.tolerance:g} relative)")
    if not any(_failed(r, args.tolerance) for r in records):
        print(f"wrote {args.output or args.input}")


def _tolerance(text: str) -> float:
    value = float(text)   # argparse turns a ValueError into a usage error
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text}: a tolerance is a finite number >= 0")
    return value


def parser():
    from . import __version__
    ap = argparse.ArgumentParser(prog="bnfold", description="Fold batch normalization in .nnp files.")
    ap.add_argument("--version", action="version", version=f"bnfold {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="list what would fold and what would stay, with reasons")
    ins.add_argument("input", metavar="IN.nnp")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ins.set_defaults(run=cmd_inspect)
    fo = sub.add_parser("fold", help="fold IN.nnp into OUT.nnp")
    fo.add_argument("input", metavar="IN.nnp")
    fo.add_argument("-o", "--output", metavar="OUT.nnp")
    fo.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    fo.add_argument("--verify", action="store_true",
                    help="run original and folded networks on the same random inputs and compare")
    fo.add_argument("--tolerance", type=_tolerance, default=1e-4,
                    help="largest relative error --verify accepts (default 1e-4)")
    fo.add_argument("--seed", type=int, default=0, help="seed of --verify's random inputs")
    fo.add_argument("--report", metavar="REPORT.json", help="write what was done as JSON")
    fo.add_argument("--in-place", action="store_true", help="replace IN.nnp (atomically)")
    fo.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    fo.set_defaults(run=cmd_fold)
    return ap


def quiet_nnabla_info() -> None:
    """Hide NNabla's INFO lines (each extension it initializes when imported, each file it saves):
    a command line prints only its own progress. Its warnings and errors still show; a level the
    caller set is kept. Call before nnabla is imported."""
    nnabla_log = logging.getLogger("nnabla")
    if nnabla_log.level == logging.NOTSET:
        nnabla_log.setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    quiet_nnabla_info()
    from .backends.common import FoldError
    from .nnp import NnpError
    try:
        return args.run(args)
    except (NnpError, FoldError) as e:
        print(f"bnfold: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, RuntimeError) as e:   # e.g. an unusable backend
        print(f"bnfold: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:                      # e.g. the output's folder is missing or read-only
        where = f"{e.filename}: " if e.filename else ""
        print(f"bnfold: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bnfold: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
