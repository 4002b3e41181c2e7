"""The README's first screen and Install section run as written: every Python and shell snippet there
is run, in order, in an empty folder.

A newcomer runs them from a clone after ``make demo`` or ``make test``; so do these tests, with three
substitutions, each checked rather than skipped:
- ``make TARGET`` runs in the project folder (``make -C PROJECT TARGET``); ``make test`` is not run
  again: it is what runs this test.
- ``pip install SPEC`` (SPEC ``.`` or ``'.[extra]'``) resolves the project without downloading
  anything (``pip install --dry-run --no-deps``): setup.py runs, the Python version is accepted,
  and every extra named is declared.
- ``.venv`` in the empty folder is the project's environment; the Install section's commands run
  with it on the PATH, as they would in the environment pip installed into.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nnabla", reason="nnabla is not installed (GPU machine)")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")


def sections():
    """{heading: [(language, code)]} of the README's first screen (heading "") and its sections."""
    out, heading, block, language = {"": []}, "", None, None
    for line in README.read_text().splitlines():
        m = FENCE.match(line)
        if block is None and m:
            block, language = [], m.group(1)
        elif block is not None and line.startswith("```"):
            out[heading].append((language, "\n".join(block) + "\n"))
            block = None
        elif block is not None:
            block.append(line)
        elif line.startswith("## "):
            heading = line[3:].strip()
            out[heading] = []
    return out


def snippets(heading):
    return [(lang, code) for lang, code in sections()[heading] if lang in ("python", "sh")]


def test_the_first_screen_and_install_have_snippets_to_run():
    first, install = snippets(""), snippets("Install")
    assert [lang for lang, _ in first].count("python") >= 1
    assert [lang for lang, _ in first].count("sh") >= 2
    assert any("pip install ." in code for _, code in install)
    # a code block without a language would not be run: the first screen must not hide one
    assert all(lang for lang, _ in sections()[""]), "a code block of the first screen has no language"


# reads pip's report of a dry run: every extra asked for is one the project declares
_EXTRAS_DECLARED = """
import json
for item in json.load(open("pip.json"))["install"]:
    declared = set(item["metadata"].get("provides_extra") or ())
    missing = set(item.get("requested_extras") or ()) - declared
    assert not missing, f"the project declares no extra {sorted(missing)}"
"""


def _shell_line(line: str) -> str:
    """The command to run for a README line (see the module docstring)."""
    words = shlex.split(line, comments=True)
    if not words:
        return line
    if words[0] == "make":
        assert len(words) == 2, line
        if words[1] == "test":
            return "true  # make test: running now"
        return f"make -s -C {shlex.quote(str(ROOT))} {words[1]}"
    if words[:2] == ["pip", "install"]:
        specs = words[2:]
        assert specs and all(re.fullmatch(r"\.(\[[\w,]+\])?", s) for s in specs), line
        checked = " ".join(shlex.quote(str(ROOT) + s[1:]) for s in specs)
        return (f"python -m pip install --dry-run --no-deps --no-build-isolation --quiet "
                f"--report pip.json {checked} && python -c {shlex.quote(_EXTRAS_DECLARED)}")
    return line


def _run(folder: Path, language: str, code: str, env) -> str:
    if language == "python":
        done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
    else:
        script = "set -e\n" + "\n".join(_shell_line(line) for line in code.splitlines())
        done = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, f"README snippet failed:\n{code}\n--- stdout\n{done.stdout}" \
                                 f"\n--- stderr\n{done.stderr}"
    return done.stdout


def _folder(tmp_path: Path) -> Path:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def _environment(with_venv_on_path: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if with_venv_on_path:
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_first_screen_runs_as_written(tmp_path):
    folder = _folder(tmp_path)
    outputs = [_run(folder, lang, code, _environment(False)) for lang, code in snippets("")]
    text = "\n".join(outputs)
    assert "folded" in text and (folder / "resnet50_folded.nnp").exists()
    assert "OK" in text     # make demo checks the folded outputs against the original


def test_install_section_runs_as_written(tmp_path):
    folder = _folder(tmp_path)
    text = "\n".join(_run(folder, lang, code, _environment(True)) for lang, code in
                     snippets("Install"))
    assert "backend auto" in text     # bnfold doctor said which backend it picks
