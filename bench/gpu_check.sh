#!/usr/bin/env bash
# Every check meant for a GPU machine, in one run (NumPy and CuPy only, no nnabla needed):
#   1. the device, driver and library versions;
#   2. the GPU tests (pytest -m gpu): CuPy results against the NumPy backend, every layout and dtype;
#   3. the GPU benchmark (bench/bench_gpu.py), which writes its JSON and prints the README's tables;
#   4. a few of the tests again under compute-sanitizer memcheck (out-of-bounds or misaligned
#      accesses), where compute-sanitizer is installed.
# Logs and the JSON go to the folder given as the first argument (default: bench/results/).
# Exit status: 0 when every step passed, else the number of steps that failed.
#
#   bash bench/gpu_check.sh [OUT_DIR] [extra bench_gpu.py options]
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

step() {   # step NAME COMMAND...: runs it, its output to the terminal and to OUT/gpu-NAME.log
    local name=$1
    shift
    echo "== $name: $*"
    if "$@" 2>&1 | tee "$out/gpu-$name.log"; then
        echo "== $name: passed"
    else
        echo "== $name: FAILED"
        failed=$((failed + 1))
    fi
}

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || return 1
    python3 -c "import sys, numpy, cupy; print('Python', sys.version.split()[0], '| NumPy',
        numpy.__version__, '| CuPy', cupy.__version__, '| CUDA runtime',
        cupy.cuda.runtime.runtimeGetVersion())"
}

gpu_tests() {   # skipped tests pass in pytest's eyes: here at least one must have run
    local log rc
    log=$(python3 -m pytest -q -rs -m gpu "$@" 2>&1)
    rc=$?
    echo "$log"
    if [ "$rc" != 0 ] || ! grep -q " passed" <<<"$log"; then
        echo "GPU tests failed, or none ran"
        return 1
    fi
}

memcheck() {
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer is not installed: memcheck not run"
        return 1
    fi
    compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -m gpu tests/test_cupy_backend.py -k "test_device_fold_matches_numpy \
        or test_every_layout_and_dtype_in_place or test_input_side_biases or test_strided \
        or test_host_arrays_stream_through_small_staging or test_every_float16_bit_pattern"
}

step versions versions
if [ "$failed" != 0 ]; then
    echo "== no usable GPU here: nothing else run"
    exit 1
fi
step tests gpu_tests tests
step bench python3 bench/bench_gpu.py --out "$out/" "$@"
step memcheck memcheck   # last: the slowest, and the results above are written if time runs out
echo "== $failed step(s) failed; logs and results in $out/"
exit "$failed"
