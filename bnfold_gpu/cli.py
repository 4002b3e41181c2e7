"""``bnfold``: fold the batch normalizations of .nnp files; a thin shell over
:func:`bnfold_gpu.nnp_fold.fold_nnp`.

  bnfold inspect IN.nnp [--json] [--skip PATTERN ...] [--quiet]
  bnfold fold IN.nnp -o OUT.nnp [--backend auto|numpy|cupy] [--verify [--tolerance T] [--atol A]
              [--seed N] [--input NAME=FILE.npy ...]] [--skip PATTERN ...]
              [--report REPORT.json|-] [--in-place] [--quiet]

The exit statuses are listed in ``EXIT_STATUSES`` (and in ``bnfold fold --help``).
"""
# Only light modules here: main() must be running, its Ctrl-C handling in place, before anything
# slow (argparse aside, nnabla above all) is imported.
import argparse
import json
import logging
import math
import os
import sys
import time

from . import _atomic, _safe_points

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_CANNOT_VERIFY, EXIT_WRITTEN_BUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = _safe_points.EXIT_INTERRUPTED

EXIT_STATUSES = """\
exit status:
  0    done
  1    --verify found an output differing past the tolerance; nothing written
  2    bad input, or the output cannot be written; one line on stderr, nothing written
  3    --verify cannot run the original file in NNabla's current context; nothing written
  4    the output was written, but the report or the summary could not be
  130  interrupted (Ctrl-C; 143: terminated, SIGTERM); the message says whether the output was written
"""

INSPECT_EXIT_STATUSES = """\
exit status:
  0    done
  2    bad input; one line on stderr
  130  interrupted (Ctrl-C; 143: terminated, SIGTERM)
"""


class Progress:
    """A one-line progress bar on stderr for a terminal, plain lines otherwise; silent when quiet.
    ``step`` starts a stage (``add_steps`` announces more of them); within one, ``expect``/
    ``extend``/``advance`` count bytes, shown as a percentage (on a terminal at most every
    ``TTY_EVERY`` seconds, in plain lines every ``LINE_EVERY``). ``finish`` fills the bar. Each call
    is a safe point where a Ctrl-C is acted on."""
    TTY_EVERY, LINE_EVERY = 0.1, 5.0

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.expect(0)

    def add_steps(self, n: int):
        self.total += n

    def step(self, label: str):
        _safe_points.check()
        self.done = min(self.total - 1, self.done + 1)   # the last step is finish()'s
        self.label = label
        self.expect(0)
        self._draw(label)

    def finish(self, label: str = "done"):
        _safe_points.check()
        self.done = self.total
        self.label = label
        self._draw(label)
        self.close()

    def expect(self, nbytes: int):
        """The current stage will count ``nbytes``."""
        self.bytes_total, self.bytes_done, self._next = nbytes, 0, 0
        self._shown = time.monotonic()

    def extend(self, nbytes: int):
        """The current stage will count ``nbytes`` more than expected."""
        self.bytes_total += nbytes

    def advance(self, nbytes: int):
        _safe_points.check()
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
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {label[:50]:<50}")
            sys.stderr.flush()
        else:
            sys.stderr.write(f"bnfold: {label}\n")

    def close(self):
        if self.tty and not self.quiet:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


class _Run:
    """What this invocation has written, so that every message, an interrupted run's included, tells
    the truth about it."""

    def __init__(self):
        self.output = None           # the output, once renamed into place
        self.report = None           # the --report path asked for
        self.report_written = False
        self.committed_before = len(_atomic.committed())

    def interrupted(self) -> str:
        if self.output is None:
            return "bnfold: interrupted; nothing written"
        unsaved = f"; the report {self.report} was not written" \
            if self.report and not self.report_written else ""
        return f"bnfold: interrupted; {self.output} was written{unsaved}"

    def on_second_ctrl_c(self) -> str:
        """A second Ctrl-C ends the process from wherever it is: no temporary file stays."""
        _atomic.remove_live()
        if self.output is None and len(_atomic.committed()) > self.committed_before:
            self.output = _atomic.committed()[self.committed_before]
        return self.interrupted()


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _words(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:1].lower() + text[1:] if text else type(e).__name__


def _os_words(e: OSError) -> str:
    return e.strerror or _words(e)


def _release_broken_stdout() -> None:
    """After a write to stdout failed, let its buffered rest go to /dev/null: at exit Python would
    flush it into the same broken pipe and print "Exception ignored ..." noise."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


def _table(rows):
    from .plan import format_table
    return format_table(rows)


def _print_plan(reports, out):
    for n in reports:
        print(f"network {n.name}: {n.folded_count} to fold, {n.kept_count} to keep"
              + (" (uses batch statistics)" if n.uses_batch_statistics else ""), file=out)
        if n.note:
            print(f"not planned: {n.note}", file=out)
        elif not n.has_bn:
            print("no BatchNormalization in this network", file=out)
        if n.folded:
            print(_table([("BN", "into", "side", "weight")] +
                         [(s["bn"], s["into"], s["side"], s["weight"] or
                           f"(its bias {s['folded_bias']})") for s in n.folded]), file=out)
        if n.skipped:
            print(_table([("BN kept", "reason")] + [(s["bn"], s["reason"]) for s in n.skipped]),
                  file=out)
        print(file=out)


def cmd_inspect(args, run):
    from . import nnp as N
    from .nnp_fold import network_reports
    progress = Progress(3, quiet=args.json or args.quiet)
    progress.step(f"reading {args.input}")
    f = N.read(args.input, progress)
    progress.step("planning")
    reports = network_reports(N.plan_file(f, skip=args.skip))
    progress.finish()
    _say_unmatched(args.skip, reports)
    if args.json:
        print(json.dumps({"input": args.input, "networks": {n.name: n.to_json() for n in reports}},
                         indent=2))
    else:
        _print_plan(reports, sys.stdout)
        skipped = [s for n in reports for s in n.skipped]
        print(f"{sum(n.folded_count for n in reports)} BN(s) would fold, {len(skipped)} would stay")
    sys.stdout.flush()
    return EXIT_OK


def _say_unmatched(patterns, reports) -> None:
    """A line on stderr for each --skip pattern that named no BN of the file (a typo would
    otherwise fold what the user meant to keep), with a few names it could have matched."""
    from .plan import unmatched_skips, unmatched_words
    names = list(dict.fromkeys([b for n in reports for f in n.folded for b in f["bns"]] +
                               [s["bn"] for n in reports for s in n.skipped]))
    for pattern in unmatched_skips(patterns, names):
        _say(f"bnfold: note: --{unmatched_words(pattern, names, 'the file')}")


def _check_report_path(args, out_path):
    """Refused before any work: a report that could not be written, or would overwrite the input or
    the output (also through a symlink or a hard link)."""
    from .nnp import NnpError
    from .nnp_fold import same_file
    if args.report is None or args.report == "-":
        return
    report = _atomic.check_target(args.report)
    for path in dict.fromkeys([args.input, out_path]):
        if same_file(path, args.report):
            raise NnpError(f"{args.report}: the report would overwrite {path}")
    _atomic.remove_stale(os.path.dirname(report), keep=[args.input])   # the output's: fold_nnp's


def _write_report(path, report) -> None:
    text = json.dumps(report.to_json(), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _atomic.write_bytes(path, text.encode())


def cmd_fold(args, run):
    import warnings
    from .nnp import NnpError
    from .plan import SkipPatternWarning
    from .nnp_fold import VerificationFailed, VerificationImpossible, fold_nnp
    if args.output is None and not args.in_place:
        raise NnpError("give -o OUT.nnp, or --in-place to replace the input")
    if args.output is not None and args.in_place:
        raise NnpError("give -o OUT.nnp or --in-place, not both")
    out_path = args.input if args.output is None else args.output
    if args.inputs and not args.verify:
        raise NnpError("--input feeds --verify's runs: give --verify too")
    unused = [f"--{k}" for k in ("tolerance", "atol", "seed") if getattr(args, k) is not None]
    if unused and not args.verify:
        raise NnpError(f"{' and '.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} "
                       f"to --verify: give --verify too")
    _check_report_path(args, out_path)
    run.report = args.report
    summary_to = sys.stderr if args.report == "-" else sys.stdout   # stdout holds the JSON then
    progress = Progress(1, args.quiet)    # its last step, finish(); fold_nnp adds the others
    try:
        with warnings.catch_warnings():   # said as a note once the fold is done
            warnings.simplefilter("ignore", SkipPatternWarning)
            report = fold_nnp(args.input, args.output, backend=args.backend, verify=args.verify,
                              tolerance=args.tolerance, atol=args.atol or 0.0,
                              seed=args.seed or 0,
                              inputs=dict(args.inputs), in_place=args.in_place, skip=args.skip,
                              progress=progress)
    except (VerificationFailed, VerificationImpossible) as e:
        progress.close()
        line = f"bnfold: {e}"
        if not args.quiet:
            try:
                _print_summary(e.report, summary_to)
            except OSError:
                _release_broken_stdout()
        if args.report:
            try:
                _write_report(args.report, e.report)
            except OSError as w:
                _release_broken_stdout()
                line += f"; the report could not be written either ({_os_words(w)})"
        _say(line)
        return EXIT_MISMATCH if isinstance(e, VerificationFailed) else EXIT_CANNOT_VERIFY
    run.output = out_path
    progress.finish()
    _say_unmatched(args.skip, report.networks)
    problems = []
    if args.report:
        try:
            _write_report(args.report, report)
            run.report_written = True
        except OSError as e:
            _release_broken_stdout()
            what = "the report could not be written to stdout" if args.report == "-" \
                else f"the report {args.report} could not be written"
            problems.append(f"{what} ({_os_words(e)})")
    _safe_points.check()
    if not args.quiet:
        try:
            _print_summary(report, summary_to)
        except OSError as e:
            _release_broken_stdout()
            problems.append(f"the summary could not be printed ({_os_words(e)})")
    if problems:
        _say(f"bnfold: {out_path} was written, but {' and '.join(problems)}")
        return EXIT_WRITTEN_BUT
    return EXIT_OK


def _print_summary(report, out):
    from .nnp_fold import size_words
    rows = [("network", "folded", "kept")]
    for n in report.networks:
        rows.append((n.name + (" (uses batch statistics)" if n.uses_batch_statistics else ""),
                     n.folded_count, n.kept_count))
    print(_table(rows), file=out)
    for n in report.networks:
        if not n.has_bn and not n.note:
            print(f"{n.name}: no BatchNormalization in this network", file=out)
    reasons = {}
    for n in report.networks:
        for s in n.skipped:
            reasons.setdefault(s["reason"], []).append(f"{n.name}:{s['bn']}")
    if reasons:
        print(file=out)
        print(_table([("kept because", "BNs")] +
                     [(r, ", ".join(v[:3]) + (f" (+{len(v) - 3})" if len(v) > 3 else ""))
                      for r, v in reasons.items()]), file=out)
    seconds = report.seconds
    work = sum(seconds.get(k, 0.0) for k in ("read", "plan", "fold", "write"))
    print(file=out)
    print(f"{report.n_folded} BN(s) folded, {report.n_kept} kept; {size_words(report.bytes_rescaled)}"
          f" of weights rescaled on {report.backend}; read, folded and written in {work:.2f} s",
          file=out)
    v = report.verify
    if v is not None and (v.outputs or not v.networks):   # else it could not run: said on stderr
        print(file=out)
        if v.outputs:
            print(_table([("verify: network", "output", "max abs err", "max rel err")] +
                         [(r["network"], r["output"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}")
                          for r in v.outputs]), file=out)
        else:
            print("verify: nothing folded, so nothing to compare", file=out)
        bound = f"tolerance {v.tolerance:g} relative" + (f" or {v.atol:g} absolute" if v.atol else "")
        print(f"verified in {seconds.get('verify', 0.0):.2f} s ({bound})", file=out)
    if report.output is not None:
        print(f"wrote {report.output}", file=out)
    out.flush()


def cmd_doctor(args, run):
    from . import doctor
    try:
        return doctor.main()
    except BrokenPipeError:   # `bnfold doctor | head`: the reader has what it wanted
        _release_broken_stdout()
        return 0


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"{text}: a seed is an integer from 0 to 2**32 - 1")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text}: a tolerance is a finite number >= 0")
    return value


def _named_file(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text}: give NAME=FILE.npy")
    return name, path


def parser():
    from . import __version__
    plain = argparse.RawDescriptionHelpFormatter    # keeps the exit statuses' lines
    ap = argparse.ArgumentParser(prog="bnfold", description="Fold batch normalization in .nnp files.",
                                 epilog=EXIT_STATUSES, formatter_class=plain)
    ap.add_argument("--version", action="version", version=f"bnfold {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="list what would fold and what would stay, with reasons",
                         epilog=INSPECT_EXIT_STATUSES, formatter_class=plain)
    ins.add_argument("input", metavar="IN.nnp", help="the .nnp file to look at")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ins.add_argument("-q", "--quiet", action="store_true",
                     help="no progress lines (the tables or the JSON are still printed)")
    ins.add_argument("--skip", metavar="PATTERN", action="append", default=[],
                     help="keep the BNs whose name matches PATTERN (a name, or a glob such as "
                     "'decoder/*'; repeatable)")
    ins.set_defaults(run=cmd_inspect)
    fo = sub.add_parser("fold", help="fold IN.nnp into OUT.nnp", epilog=EXIT_STATUSES,
                        formatter_class=plain)
    fo.add_argument("input", metavar="IN.nnp", help="the .nnp file to fold (never changed without "
                    "--in-place)")
    fo.add_argument("-o", "--output", metavar="OUT.nnp",
                    help="where to write the folded file (a name ending in .nnp); written whole "
                    "or not at all; an existing file keeps its owner, group and mode, a symlink "
                    "is written through")
    fo.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"],
                    help="where to rescale the weights: numpy (the CPU), cupy (a CUDA GPU, "
                    "the parameters streamed through it), or auto (default: numpy, since a "
                    "file's parameters are read into host memory; see bnfold doctor)")
    fo.add_argument("--verify", action="store_true",
                    help="run original and folded networks on the same inputs and compare every "
                    "output; write nothing if one differs past the tolerance")
    fo.add_argument("--tolerance", type=_tolerance, default=None,
                    help="largest relative error --verify accepts (default 1e-4; 5e-3 when the "
                    "weights are float16)")
    fo.add_argument("--atol", type=_tolerance, default=None,
                    help="an output also passes if its largest absolute error is at most this "
                    "(default 0)")
    fo.add_argument("--seed", type=_seed, default=None,
                    help="seed of --verify's random inputs (default 0)")
    fo.add_argument("--input", dest="inputs", metavar="NAME=FILE.npy", type=_named_file,
                    action="append", default=[],
                    help="feed --verify this data for the network input NAME instead of random "
                    "values (repeatable)")
    fo.add_argument("--report", metavar="REPORT.json",
                    help="write what was done as JSON, after the output (- for stdout)")
    fo.add_argument("--in-place", action="store_true",
                    help="replace IN.nnp (atomically; other hard links keep the original)")
    fo.add_argument("--skip", metavar="PATTERN", action="append", default=[],
                    help="keep the BNs whose name matches PATTERN (a name, or a glob such as "
                    "'decoder/*'; repeatable); the summary lists them as skipped on request")
    fo.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    fo.set_defaults(run=cmd_fold)
    doc = sub.add_parser("doctor", help="say which backend 'auto' picks and why: CuPy, NVRTC, the "
                         "GPU, the kernel sources and whether they compile (needs no GPU)",
                         description="Print what this machine offers the GPU backend, one fact a "
                         "line. Exits 0 once the report is printed, whatever it says.")
    doc.set_defaults(run=cmd_doctor)
    return ap


def quiet_nnabla_info() -> None:
    """Hide NNabla's INFO lines (each extension it initializes when imported, each file it saves):
    a command line prints only its own progress. Its warnings and errors still show; a level the
    caller set is kept. Call before nnabla is imported."""
    nnabla_log = logging.getLogger("nnabla")
    if nnabla_log.level == logging.NOTSET:
        nnabla_log.setLevel(logging.WARNING)


def main(argv=None) -> int:
    """``bnfold`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status. Called in a
    process that goes on, it leaves the signal handlers and logging as they were."""
    return _command(argv, exiting=False)


def command() -> int:
    """The ``bnfold`` executable: :func:`main` in a process that exits as soon as it returns. Its
    Ctrl-C handling stays to the end, so that a Ctrl-C after the work is done (as the interpreter
    shuts down) is no traceback: a second one still ends the process at once."""
    return _command(None, exiting=True)


def _command(argv, exiting: bool) -> int:
    run = _Run()
    with _safe_points.ctrl_c_at_safe_points(run.on_second_ctrl_c, keep=exiting) as guard:
        nnabla_log = logging.getLogger("nnabla")
        level = nnabla_log.level
        try:
            status = _main(argv, run)
            _safe_points.check()            # a Ctrl-C after the last safe point
            return status
        except KeyboardInterrupt:
            if guard is None or guard.claim_exit():   # else a second Ctrl-C is saying it
                _say(run.interrupted())
            return EXIT_INTERRUPTED if guard is None else guard.exit_status()
        except SystemExit:                  # argparse: --help, --version, a usage error
            if guard is not None and guard.pending:
                if guard.claim_exit():
                    _say(run.interrupted())
                return guard.exit_status()
            raise
        finally:
            nnabla_log.setLevel(level)      # the caller's process keeps its logging as it was


def _main(argv, run) -> int:
    args = parser().parse_args(argv)
    _safe_points.check()
    if sys.stdout is None and (args.command != "fold" or not args.quiet or args.report == "-"):
        # Python's stdout where file descriptor 1 was closed: what this command prints has nowhere
        # to go, so it does nothing (fold -q with no --report - prints nothing there)
        _say("bnfold: standard output is closed" +
             ("; give -q to fold without the summary" if args.command == "fold" else ""))
        return EXIT_BAD_INPUT
    if args.command == "doctor":    # before the imports below, which import nnabla
        return args.run(args, run)
    quiet_nnabla_info()
    try:
        from . import import_nnabla
        import_nnabla()   # the caller's logging and warning filters kept (main called in a process)
        from .backends.common import FoldError
        from .nnp import NnpError
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        _say("bnfold: out of memory while importing NNabla; nothing written")
        return EXIT_BAD_INPUT
    except Exception as e:   # e.g. too many open files for its libraries
        words = _os_words(e) if isinstance(e, OSError) else _words(e)
        _say(f"bnfold: NNabla cannot be imported: {words}; nothing written")
        return EXIT_BAD_INPUT
    try:
        return args.run(args, run)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if run.output is not None:          # nothing below may claim that nothing was written
            _release_broken_stdout()
            _say(f"bnfold: {run.output} was written, but then: {_words(e)}")
            return EXIT_WRITTEN_BUT
        if isinstance(e, (NnpError, FoldError, _atomic.TargetError)):
            _say(f"bnfold: {e}")
        elif isinstance(e, OSError):        # e.g. the output's folder is missing or read-only
            where = f"{e.filename}: " if e.filename else ""
            _say(f"bnfold: {where}{_os_words(e)}")
            _release_broken_stdout()
        elif isinstance(e, (ValueError, RuntimeError)):   # e.g. an unusable backend
            _say(f"bnfold: {' '.join(str(e).split())}")
        elif isinstance(e, MemoryError):
            what = f"{args.input}: " if getattr(args, "input", None) else ""
            _say(f"bnfold: {what}out of memory; nothing written")
        else:
            raise
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(command())
