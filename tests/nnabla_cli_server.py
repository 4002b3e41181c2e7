"""NNabla's ``nnabla_cli`` kept running for the tests: its ONNX converter imports TensorFlow, about 8 s
a command, against a few ms for a small model's conversion.

Run as a script, this reads lines of JSON argument lists and runs each through ``nnabla_cli``'s own
``main`` with that ``sys.argv``, as the command would, answering a JSON line [exit status, what it
printed]. Before each, the converters' module-level name counters go back to where a new process
starts them: the files it writes are then byte for byte those of ``nnabla_cli`` itself
(``tests/test_cli.py`` compares them). ``run(*args)`` is the client."""
import atexit
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# module-level counters of NNabla's converters that number the names of what they make
# (``x_0009_reshape``, an exported file's random seed)
COUNTERS = (("nnabla.utils.converter.onnx.importer", "fork_name_number"),
            ("nnabla.utils.converter.onnx.exporter", "random_seed"),
            ("nnabla.utils.converter.tflite.exporter", "random_seed"))


def serve():
    answers = os.fdopen(os.dup(1), "w")   # what the converter prints to stdout is captured
    os.dup2(2, 1)
    from nnabla.utils.cli import cli
    for line in sys.stdin:
        args = json.loads(line)
        for module, name in COUNTERS:
            if module in sys.modules:
                setattr(sys.modules[module], name, 0)
        printed = io.StringIO()
        status = 0
        sys.argv = ["nnabla_cli"] + args
        with contextlib.redirect_stdout(printed):
            try:
                cli.main()
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - reported to the test
                status = 1
                printed.write(f"{type(e).__name__}: {e}")
        answers.write(json.dumps([status, printed.getvalue()[-4000:]]) + "\n")
        answers.flush()


class _Server:
    def __init__(self):
        self.log = tempfile.TemporaryFile("w+")
        self.child = subprocess.Popen([sys.executable, str(Path(__file__).resolve())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self.log, text=True)

    def run(self, args):
        try:
            self.child.stdin.write(json.dumps(args) + "\n")
            self.child.stdin.flush()
            answer = self.child.stdout.readline()
        except OSError:
            answer = ""
        if not answer:
            self.log.seek(0)
            raise AssertionError("nnabla_cli server ended: " + self.log.read()[-2000:])
        return json.loads(answer)

    def close(self):
        self.child.stdin.close()    # its loop ends
        self.child.wait(timeout=60)
        self.child.stdout.close()
        self.log.close()


_server = None


def run(*args):
    """(exit status, what it printed) of ``nnabla_cli ARGS``, run by the server (started on first
    use, ended with the tests' process)."""
    global _server
    if _server is None or _server.child.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return tuple(_server.run([str(a) for a in args]))


if __name__ == "__main__":
    serve()
