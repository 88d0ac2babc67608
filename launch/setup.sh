#!/usr/bin/env bash
# Set up dsq in ./.venv: PyTorch (2.13.0 unless one is already importable there),
# then dsq with its dependencies (and the test extra with --test).
#   TORCH_SPEC   pip requirement for PyTorch (default torch==2.13.0; on GPU clusters pick the
#                build matching your CUDA, e.g. with PIP_INDEX_URL / PIP_EXTRA_INDEX_URL)
#   PYTHON       interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # pinned, so pip never resolves a bare `torch` (a multi-GB CUDA build on CPU-only machines)
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
"${PIP[@]}" -e ".${EXTRAS}"
# DeepSpeed's CPU communication op, built once into this environment (dsq points
# TORCH_EXTENSIONS_DIR at .venv/torch_extensions), so no run pays for or races on the build
TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c "
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()" > /dev/null 2>&1 \
  || echo "note: DeepSpeed's CPU communication op did not build now; the first run builds it" >&2
.venv/bin/python -c "import torch, deepspeed, megatron.core, dsq; print(f'dsq ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}')" 2>/dev/null
