"""What a user installs: one version, every imported package declared, the LICENSE, py.typed and the
kernel sources in the built package, ``python -m bnfold_gpu``, ``bnfold doctor`` without a GPU, the
Python versions setup.py accepts, and a Makefile whose demo installs the runtime alone."""
import ast
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

import bnfold_gpu
from bnfold_gpu import _nvrtc, doctor
from bnfold_gpu.backends import cupy_backend

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnfold_gpu"

# the distribution behind each top-level name the package imports; a new import fails
# test_every_imported_package_is_declared until it is named here and declared in setup.py
DISTRIBUTIONS = {"numpy": "numpy", "nnabla": "nnabla", "nnabla_ext": "nnabla", "h5py": "h5py",
                 "google": "protobuf", "cupy": "cupy-cuda12x", "isal": "isal"}
# imported only where its absence is handled, and declared in this extra
OPTIONAL = {"cupy": "cuda"}


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """setup.py's metadata as pip sees it (egg_info), built once: {"PKG-INFO": text,
    "requires": {section ("" for install_requires, else the extra): {name: requirement}}}."""
    out = tmp_path_factory.mktemp("egg")
    r = _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    info = next(out.glob("*.egg-info"))
    requires, section = {"": {}}, ""
    for line in (info / "requires.txt").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            requires[section] = {}
        elif line.strip():
            requires[section][_name(line)] = line.strip()
    return {"PKG-INFO": (info / "PKG-INFO").read_text(), "requires": requires}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The package as setup.py builds it (build_py, as in test_backends)."""
    lib = tmp_path_factory.mktemp("lib")
    r = _run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return lib


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


# -- one version -----------------------------------------------------------------------------------
def test_the_version_is_written_once(metadata):
    init = ast.parse((PACKAGE / "__init__.py").read_text())
    written = [n.value.value for n in init.body if isinstance(n, ast.Assign)
               and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__version__"]]
    assert written == [bnfold_gpu.__version__]
    assert f"Version: {bnfold_gpu.__version__}\n" in metadata["PKG-INFO"]
    assert bnfold_gpu.__version__ not in (ROOT / "setup.py").read_text()


# -- dependencies ----------------------------------------------------------------------------------
def _is_stdlib(name: str) -> bool:
    if hasattr(sys, "stdlib_module_names"):   # Python 3.10
        return name in sys.stdlib_module_names
    spec = importlib.util.find_spec(name)
    return spec is not None and (spec.origin in ("built-in", "frozen") or
                                 spec.origin.startswith(sysconfig.get_paths()["stdlib"]))


def _imported_names():
    """{top-level name: [module that imports it]} over every absolute import of the package,
    the ones inside functions included."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(path.relative_to(ROOT).as_posix())
    return found


def test_every_imported_package_is_declared(metadata):
    requires = metadata["requires"]
    for name, where in _imported_names().items():
        if name == "bnfold_gpu" or _is_stdlib(name):
            continue
        assert name in DISTRIBUTIONS, f"{name} (imported in {where[0]}): which distribution is it?"
        dist = DISTRIBUTIONS[name]
        section = OPTIONAL.get(name, "")
        assert dist in requires[section], f"{dist} (imported in {where[0]}) is not declared in " \
            f"setup.py's {'install_requires' if not section else repr(section) + ' extra'}"


def test_the_distribution_table_says_what_is_installed():
    """Each name of DISTRIBUTIONS is installed by the distribution it names (where installed)."""
    for name, dist in DISTRIBUTIONS.items():
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            assert name in OPTIONAL, f"{dist} is a dependency, but is not installed"
            continue
        assert any(f.parts[0] == name for f in files), f"{dist} does not install {name}"


def test_the_cuda_extra_brings_the_cuda_libraries_cupy_loads(metadata):
    cuda = metadata["requires"]["cuda"]
    assert {"cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"} <= set(cuda)
    assert set(cuda) <= set(metadata["requires"]["test"])   # the tests install what users do
    # CuPy takes the runtime headers only of its NVRTC's major.minor: the two are pinned together
    nvrtc, runtime = cuda["nvidia-cuda-nvrtc-cu12"], cuda["nvidia-cuda-runtime-cu12"]
    assert re.fullmatch(r"[\w-]+==12\.\d+\.\*", nvrtc), nvrtc
    assert nvrtc.split("==")[1] == runtime.split("==")[1], (nvrtc, runtime)


# -- Python versions -------------------------------------------------------------------------------
def test_python_versions(metadata):
    found = re.search(r"^Requires-Python: (.*)$", metadata["PKG-INFO"], re.M).group(1)
    assert set(found.split(",")) == {">=3.9", "<3.11"}


@pytest.mark.parametrize("version", [(3, 8, 18), (3, 11, 7), (3, 12, 1)])
def test_setup_refuses_another_python_in_one_line(version):
    """What `pip install .` shows from the build backend, on a Python nnabla 1.39 has no wheel for
    (or numpy 1.26 none)."""
    fake = (f"import sys; sys.version_info = {version + ('final', 0)!r}; "
            "sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    r = _run([sys.executable, "-c", fake], cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    line = ".".join(map(str, version))
    assert r.stderr == (f"bnfold_gpu needs Python 3.9 or 3.10, not {line}: nnabla 1.39 ships "
                        "wheels for Python 3.8-3.10 only, and numpy 1.26 (which it requires) "
                        "needs 3.9 or later\n")


# -- files -----------------------------------------------------------------------------------------
def test_license(metadata):
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The bnfold_gpu authors\n")
    for words in ("Apache License", "Version 2.0, January 2004", "END OF TERMS AND CONDITIONS",
                  "APPENDIX: How to apply the Apache License to your work."):
        assert words in text
    assert "License-File: LICENSE" in metadata["PKG-INFO"]
    assert re.search(r"^License(-Expression)?: Apache-2.0$", metadata["PKG-INFO"], re.M)


def test_built_package_is_typed_and_complete(built):
    package = built / "bnfold_gpu"
    assert (package / "py.typed").exists()
    for name in ("__main__.py", "doctor.py", "_nvrtc.py", "_kernels/bnfold.cu",
                 "_kernels/bnfold_math.cuh"):
        assert (package / name).exists(), name


def test_the_public_api_has_type_hints():
    for f in (bnfold_gpu.fold, bnfold_gpu.plan, bnfold_gpu.fold_nnp, bnfold_gpu.load):
        sig = inspect.signature(f)
        assert sig.return_annotation is not inspect.Signature.empty, f.__name__
        bare = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not bare, f"{f.__name__}: {bare} have no type"


# -- python -m bnfold_gpu, bnfold doctor ---------------------------------------------------------
def test_python_m_runs_the_command_line():
    r = _run([sys.executable, "-m", "bnfold_gpu", "--version"], cwd=ROOT)
    assert r.returncode == 0 and r.stdout == f"bnfold {bnfold_gpu.__version__}\n", r.stderr
    r = _run([sys.executable, "-m", "bnfold_gpu", "inspect"], cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("usage: bnfold inspect")


def _facts(text: str) -> dict:
    lines = text.splitlines()
    assert lines and all(": " in line for line in lines), text
    return dict(line.split(": ", 1) for line in lines)


def test_doctor_says_which_backend_and_why():
    """Without a GPU (CI): exit 0, numpy and the CUDA reason; the kernels compile with the NVRTC
    the test extra installs. With one, the same facts say cupy."""
    r = _run([sys.executable, "-m", "bnfold_gpu", "doctor"], cwd=ROOT)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    facts = _facts(r.stdout)
    reason = cupy_backend.unavailable_reason()
    gpu = facts["backend auto picks for arrays on a GPU"]
    if reason is None:
        assert gpu.startswith("cupy, because"), gpu
        assert not any(k.startswith("device ") and v.startswith("could not") for k, v in facts.items())
    else:
        assert gpu == f"numpy, because {reason}"
        assert ("CUDA" in reason or "CuPy" in reason) and facts["device"] != ""
    assert facts["backend auto picks for arrays in host memory"].startswith("numpy")
    assert facts["zip CRC-32 of .nnp members"].startswith("ISA-L (isal ")
    assert facts["bnfold_gpu"].startswith(bnfold_gpu.__version__)
    assert facts["kernel sources"] == str(cupy_backend.kernel_dir())
    assert facts["NVRTC"].startswith("12.") and "libnvrtc.so.12" in facts["NVRTC"]
    assert facts["kernels compile with NVRTC"].startswith("yes, for compute_")
    if cupy_backend.cupy is not None:
        assert facts["CuPy"].startswith(cupy_backend.cupy.__version__)
        assert facts["CuPy finds NVRTC"] == "yes, " + facts["NVRTC"].split(",")[0]


def test_doctor_imports_no_nnabla():
    """It runs where only CuPy is installed: nnabla is never imported, and none is needed."""
    code = ("import sys; from bnfold_gpu.cli import main; status = main(['doctor']); "
            "print('nnabla imported:', any(m.split('.')[0] in ('nnabla', 'nnabla_ext') "
            "for m in sys.modules)); "
            "sys.exit(status)")
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0 and r.stdout.endswith("nnabla imported: False\n"), r.stdout + r.stderr
    blocked = "import sys; sys.modules['nnabla'] = None; " + code
    r = _run([sys.executable, "-c", blocked], cwd=ROOT)
    assert r.returncode == 0 and "could not tell" not in r.stdout, r.stdout + r.stderr


def test_doctor_without_cupy_or_nvrtc(monkeypatch):
    monkeypatch.setattr(cupy_backend, "cupy", None)
    monkeypatch.setattr(_nvrtc, "_loaded", None)
    monkeypatch.setattr(_nvrtc, "WHEEL_PACKAGE", "nvidia.no_such_package")
    monkeypatch.setattr(_nvrtc, "SONAME", "libnvrtc.so.no-such-version")
    facts = dict(doctor.facts())
    gpu = facts["backend auto picks for arrays on a GPU"]
    assert gpu.startswith("numpy, because CuPy is not installed"), gpu
    assert facts["CuPy"].startswith("not installed; pip install 'bnfold_gpu[cuda]'")
    assert facts["device"] == "unknown without CuPy"
    assert facts["NVRTC"].startswith("not found (OSError: libnvrtc.so.no-such-version")
    assert facts["kernels compile with NVRTC"].startswith("not checked: NVRTC not found")
    assert facts["kernel sources"] == str(cupy_backend.kernel_dir())


def test_doctor_with_a_device(monkeypatch):
    """The lines a GPU host gets, from a stand-in for CuPy's runtime calls."""
    class Device:
        def __init__(self, i):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    props = {"name": b"NVIDIA H100 80GB HBM3", "major": 9, "minor": 0}
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props,
                                    memGetInfo=lambda: (60 * 2 ** 30, 80 * 2 ** 30),
                                    driverGetVersion=lambda: 12040, runtimeGetVersion=lambda: 12090)
    stub = types.SimpleNamespace(__version__="13.6.0",
                                 cuda=types.SimpleNamespace(runtime=runtime, Device=Device,
                                                            get_cuda_path=lambda: None))
    monkeypatch.setattr(cupy_backend, "cupy", stub)
    facts = dict(doctor.facts())
    assert facts["backend auto picks for arrays on a GPU"] == \
        "cupy, because CuPy imports and a CUDA device answers"
    assert facts["CuPy"] == "13.6.0, CUDA runtime 12.9"
    assert facts["CUDA driver"] == "supports CUDA 12.4"
    assert facts["device 0"] == \
        "NVIDIA H100 80GB HBM3, compute capability 9.0, 80.0 GiB memory, 60.0 GiB free"
    assert facts["kernels compile with NVRTC"] == "yes, for compute_90, without warnings"


def test_doctor_says_why_kernels_do_not_compile(monkeypatch):
    monkeypatch.setattr(cupy_backend, "kernel_source",
                        lambda: "__global__ void f() { undefined_name; }")
    said = doctor._compiles(cupy_backend, ["90"])
    assert said.startswith("no (compute_90: ") and "undefined_name" in said


def test_nvrtc_is_found_in_the_wheel_without_ld_library_path():
    """The nvidia-cuda-nvrtc-cu12 wheel (cuda and test extras) is found by its package folder, and
    once loaded, CuPy's own request by soname gets it: no LD_LIBRARY_PATH."""
    assert _nvrtc.wheel_library() is not None, "nvidia-cuda-nvrtc-cu12 is not installed"
    code = ("import os, sys; assert 'nvidia' not in os.environ.get('LD_LIBRARY_PATH', ''); "
            "from bnfold_gpu import _nvrtc; print(_nvrtc.load()[1]); "
            "from cupy.cuda import nvrtc; print(nvrtc.getVersion() == _nvrtc.version())")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if cupy_backend.cupy is None:
        code = code.split("; from cupy")[0]
    r = _run([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == str(_nvrtc.wheel_library())
    if cupy_backend.cupy is not None:
        assert r.stdout.split("\n")[1] == "True"


def test_gpu_backend_loads_nvrtc_before_it_compiles(monkeypatch):
    """CuPy 13 asks the loader for libnvrtc.so.12 by name, which misses the wheel's copy on a host
    with a driver and no CUDA toolkit: cupy_backend calls _nvrtc.load() before its first RawModule."""
    calls = []
    module = types.SimpleNamespace(get_function=lambda name: name)
    runtime = types.SimpleNamespace(getDevice=lambda: 0)
    stub = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime),
                                 RawModule=lambda **kw: calls.append("compile") or module)
    monkeypatch.setattr(cupy_backend, "cupy", stub)
    monkeypatch.setattr(cupy_backend, "_MODULES", {})
    monkeypatch.setattr(_nvrtc, "load", lambda: calls.append("load NVRTC") or (None, "here"))
    cupy_backend._kernels()
    assert calls == ["load NVRTC", "compile"]


# -- the Makefile ----------------------------------------------------------------------------------
def _make(tmp_path, target):
    # as a user runs it: not as a sub-make of the `make test` running this (which would add
    # "Entering directory" lines and pass its own flags down)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    r = _run(["make", "--no-print-directory", "-n", target, "PYTHON=python3"], cwd=tmp_path,
             env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_make_demo_installs_the_runtime_alone(tmp_path):
    """`make demo` installs no test extra (TensorFlow comes with it); `make test` does; after
    `make test`, `make demo` installs nothing, and after `make demo`, `make test` still adds the
    test extra."""
    if shutil.which("make") is None:
        pytest.fail("make is needed: the Makefile is what CI runs")
    for name in ("Makefile", "setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    installs = [line for line in _make(tmp_path, "demo") if "pip install" in line]
    assert any(line.endswith("install --quiet -e .") for line in installs), installs
    assert not any("[test]" in line for line in installs), installs
    assert any("[test]" in line for line in _make(tmp_path, "test"))

    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-runtime").touch()            # as `make demo` leaves it
    assert any("[test]" in line for line in _make(tmp_path, "test"))
    (venv / ".installed-test").touch()               # as `make test` leaves it
    assert _make(tmp_path, "demo") == [".venv/bin/python -m bnfold_gpu.demo"]
    assert _make(tmp_path, "test") == [".venv/bin/python -m pytest -q tests"]


def test_the_command_line_starts_without_numpy_or_nnabla():
    # its Ctrl-C handling is set up before the heavy imports (a Ctrl-C there is then one line), and
    # --version, --help and usage errors answer at once
    code = ("import sys; import bnfold_gpu, bnfold_gpu.cli; "
            "print(sorted(m for m in ('numpy', 'nnabla', 'cupy') if m in sys.modules)); "
            "print(bnfold_gpu.plan.__name__, bnfold_gpu.FoldError.__name__)")
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0 and r.stdout == "[]\nplan FoldError\n", r.stderr
