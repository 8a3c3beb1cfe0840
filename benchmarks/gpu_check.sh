#!/usr/bin/env bash
# One-GPU check of hcomposer (under 10 minutes on one H100-class card):
#   benchmarks/gpu_check.sh OUT_DIR [more gpu_check.py options]
# 1. installs the fused kernels from the wheels carried in benchmarks/wheels/ (no network
#    needed; see benchmarks/wheels/README.md for filling it), skipping, with one line, each
#    kernel that is neither installed nor carried;
# 2. runs benchmarks/gpu_check.py, which writes OUT_DIR/gpu_check.json and gpu_check.md.
# PYTHON (default: python) is the interpreter whose environment has torch with CUDA.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]}
shift
py=${PYTHON:-python}
wheels=$here/wheels

install_kernel() {  # $1 distribution name, $2 module to import
    local dist=$1 module=$2 file
    if "$py" -c "import $module" >/dev/null 2>&1; then
        echo "kernel $dist: already installed"
        return
    fi
    file=$(ls "$wheels"/"${dist//-/_}"-*.whl 2>/dev/null | head -n 1)
    if [ -z "$file" ]; then
        echo "kernel $dist: skipped (not installed, and no ${dist//-/_}-*.whl in $wheels)"
        return
    fi
    if "$py" -m pip install --quiet --no-index --find-links "$wheels" "$file" >/dev/null 2>&1 \
        && "$py" -c "import $module" >/dev/null 2>&1; then
        echo "kernel $dist: installed from $(basename "$file")"
    else
        echo "kernel $dist: skipped ($(basename "$file") did not install or import here)"
    fi
}

install_kernel fla-core fla
install_kernel causal-conv1d causal_conv1d
install_kernel mamba-ssm mamba_ssm

export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$root" && exec timeout 600 "$py" benchmarks/gpu_check.py --out "$out" "$@"
