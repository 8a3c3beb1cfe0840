#!/usr/bin/env bash
# Set up hcomposer in ./.venv (or in the active environment with --here).
#
#   ./scripts/setup.sh          the package and its runtime dependencies
#   ./scripts/setup.sh --dev    also the test and lint tools
#   ./scripts/setup.sh --here   install into the current Python instead of ./.venv
#
# PyTorch is chosen before anything else so that pip never pulls a multi-GB CUDA
# build by accident:
#   - a torch that already imports is kept as it is (your CUDA build keeps working);
#   - else, with an NVIDIA GPU (nvidia-smi answers), the default PyPI build (CUDA);
#   - else the CPU build: "torch==X+cpu" from wherever pip is configured to look
#     (a local wheel, a mirror); failing that, it stops with one line saying how to
#     point TORCH_INDEX_URL at an index of CPU wheels (it never falls back to a CUDA build).
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and TORCH_INDEX_URL.
# No package-index address is written here: pip uses its own configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
here=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --here) here=1 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev and/or --here)" >&2; exit 2 ;;
  esac
done

if [ "$here" = 1 ]; then
  py=${PYTHON:-python3}
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  py=.venv/bin/python
fi
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

cpu_torch=${TORCH_SPEC:-torch==2.13.0}
if "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the installed $("$py" -c 'import torch; print("torch", torch.__version__)')"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip install -q "${TORCH_SPEC:-torch}" --index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found; installing the CUDA build of torch from PyPI"
  pip install -q "${TORCH_SPEC:-torch}"
elif pip install -q "${cpu_torch}+cpu" 2>/dev/null; then
  echo "setup: no GPU; installed ${cpu_torch}+cpu"
else
  echo "setup: no GPU, and pip's configured index has no CPU build ${cpu_torch}+cpu; set" \
    "TORCH_INDEX_URL to an index of PyTorch CPU wheels (see the README, 'Set-up') and rerun" >&2
  exit 2
fi

pip install -q -e ".${extras}"
"$py" -c "import torch, hcomposer; print('setup: hcomposer', hcomposer.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
