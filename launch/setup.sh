#!/usr/bin/env bash
# Set up dsq in ./.venv: launch/setup.sh [--test] [--latest]
#   default    the exact versions CI tests with (launch/requirements.lock), then dsq itself
#   --latest   resolve pyproject.toml's version ranges afresh instead of the lock
#   --test     the test extra too (with the lock it is always installed: it is part of it)
# PyTorch first, unless one is already importable in the venv:
#   TORCH_SPEC   pip requirement for PyTorch (default: the lock's torch==2.13.0, the CPU build
#                here; on GPU clusters pick the build matching your CUDA, e.g. with
#                PIP_INDEX_URL / PIP_EXTRA_INDEX_URL); the lock's torch line is then skipped
#   PYTHON       interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=""
LATEST=0
for a in "$@"; do
  case "$a" in
    --test) EXTRAS="[test]" ;;
    --latest) LATEST=1 ;;
    *) echo "usage: launch/setup.sh [--test] [--latest]" >&2; exit 2 ;;
  esac
done
LOCK=launch/requirements.lock
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
LOCK_TORCH=$(grep -E '^torch==' "$LOCK" || echo "torch==2.13.0")
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # pinned, so pip never resolves a bare `torch` (a multi-GB CUDA build on CPU-only machines)
  "${PIP[@]}" "${TORCH_SPEC:-$LOCK_TORCH}"
fi
if [ "$LATEST" = 1 ]; then
  "${PIP[@]}" -e ".${EXTRAS}"
else
  # every other package at the version CI ran; torch stays as installed above
  LOCK_NO_TORCH=$(mktemp)
  trap 'rm -f "$LOCK_NO_TORCH"' EXIT
  grep -vE '^torch==' "$LOCK" > "$LOCK_NO_TORCH"
  "${PIP[@]}" -r "$LOCK_NO_TORCH"
  "${PIP[@]}" --no-deps -e .
fi
# DeepSpeed's CPU communication op, built once into this environment (dsq points
# TORCH_EXTENSIONS_DIR at .venv/torch_extensions), so no run pays for or races on the build
TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c "
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()" > /dev/null 2>&1 \
  || echo "note: DeepSpeed's CPU communication op did not build now; the first run builds it" >&2
.venv/bin/python -c "import torch, deepspeed, megatron.core, dsq; print(f'dsq ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}')" 2>/dev/null
