from setuptools import find_packages, setup

setup(
    name="bnfold_gpu",
    version="0.1.0",
    description="Exact batch-normalization folding for NNabla graphs and .nnp files, on GPU or CPU",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # the CUDA sources in kernels/ are installed inside the package, as bnfold_gpu/_kernels/, where
    # bnfold_gpu.backends.cupy_backend.kernel_dir() finds them however the package was installed
    packages=find_packages(include=["bnfold_gpu", "bnfold_gpu.*"]) + ["bnfold_gpu._kernels"],
    package_dir={"bnfold_gpu._kernels": "kernels"},
    package_data={"bnfold_gpu._kernels": ["*.cu", "*.cuh"]},
    python_requires=">=3.8,<3.11",
    install_requires=["nnabla==1.39.0", "numpy~=1.26.0"],
    extras_require={
        "cuda": ["cupy-cuda12x<14"],
        # nvrtc: the tests compile the kernels with the compiler CuPy uses (no GPU needed);
        # nnabla-converter + onnx: the tests make .nnp files with NNabla's own ONNX importer
        "test": ["pytest", "hypothesis", "nvidia-cuda-nvrtc-cu12", "cupy-cuda12x<14",
                 "nnabla-converter==1.39.0", "onnx"],
    },
    entry_points={"console_scripts": ["bnfold=bnfold_gpu.cli:main"]},
    license="Apache-2.0",
)
