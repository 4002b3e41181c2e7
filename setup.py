import re
import sys
from pathlib import Path

# Before anything else: on another Python, an older pip (23.2, for one) installing from source
# ignores python_requires and fails later with "no matching distribution found for nnabla", which
# does not say why; pip 26 says "requires a different Python", but not why either.
if not (3, 9) <= sys.version_info[:2] <= (3, 10):
    found = ".".join(map(str, sys.version_info[:3]))
    sys.exit(f"bnfold_gpu needs Python 3.9 or 3.10, not {found}: nnabla 1.39 ships wheels for "
             "Python 3.8-3.10 only, and numpy 1.26 (which it requires) needs 3.9 or later")

from setuptools import find_packages, setup  # noqa: E402 (after the check, which needs nothing)

HERE = Path(__file__).resolve().parent
# read, not imported: importing the package would need its dependencies before they are installed
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "bnfold_gpu" / "__init__.py").read_text(),
                    re.M).group(1)

# CuPy 13 is the last to accept NumPy 1.26 (which nnabla 1.39 pins); 13.3 is the first to find the
# CUDA headers of the nvidia-cuda-runtime wheel. Its wheel (13.6 at least) carries the CUDA runtime,
# but compiles kernels with NVRTC, loaded at run time: bnfold_gpu._nvrtc finds the one of the
# nvidia-cuda-nvrtc wheel (CuPy 13 alone looks only on the loader's path). CuPy takes the headers
# (its own kernels include cuda_fp16.h, which needs them from CUDA 12.2 on) only from a runtime
# wheel of the same major.minor as NVRTC, hence one minor for both.
CUDA = ["cupy-cuda12x>=13.3,<14", "nvidia-cuda-nvrtc-cu12==12.9.*",
        "nvidia-cuda-runtime-cu12==12.9.*"]

setup(
    name="bnfold_gpu",
    version=VERSION,
    description="Exact batch-normalization folding for NNabla graphs and .nnp files, on GPU or CPU",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # the CUDA sources in kernels/ are installed inside the package, as bnfold_gpu/_kernels/, where
    # bnfold_gpu.backends.cupy_backend.kernel_dir() finds them however the package was installed
    packages=find_packages(include=["bnfold_gpu", "bnfold_gpu.*"]) + ["bnfold_gpu._kernels"],
    package_dir={"bnfold_gpu._kernels": "kernels"},
    package_data={"bnfold_gpu": ["py.typed"], "bnfold_gpu._kernels": ["*.cu", "*.cuh"]},
    # nnabla 1.39.0 has wheels for 3.8-3.10; numpy 1.26 none for 3.8
    python_requires=">=3.9,<3.11",
    # h5py and protobuf: the .nnp reader and writer use them directly. h5py before 3.12 crashes
    # (SIGSEGV) writing parameters to a full disk; protobuf at nnabla's own pin. isal: the zip
    # members' CRC-32 at memory speed (wheels wherever nnabla has them; zlib's is used without it)
    install_requires=["nnabla==1.39.0", "numpy~=1.26.0", "h5py>=3.12", "protobuf~=3.20",
                      "isal>=1.6"],
    extras_require={
        "cuda": CUDA,
        # nvrtc: the tests compile the kernels with the compiler CuPy uses (no GPU needed);
        # nnabla-converter + onnx: the tests make .nnp files with NNabla's own ONNX importer
        "test": ["pytest", "hypothesis"] + CUDA + ["nnabla-converter==1.39.0", "onnx"],
        # `make bench` draws its plot (bench/plot.py) with matplotlib
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["bnfold=bnfold_gpu.cli:command"]},
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=["Programming Language :: Python :: 3.9", "Programming Language :: Python :: 3.10",
                 "Typing :: Typed"],
)
