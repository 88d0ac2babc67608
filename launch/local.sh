#!/usr/bin/env bash
# One node: launch/local.sh NPROC CONFIG... [key.sub=value ...]
# Validates the config for NPROC ranks first (no process starts on a bad config), then
# starts NPROC ranks with the deepspeed launcher (GPUs, or CPU ranks where there are none).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/local.sh NPROC CONFIG... [key.sub=value ...]" >&2
  exit 2
fi
NPROC=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
"$PYTHON" -m dsq.cli config --world-size "$NPROC" "$@" > /dev/null
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" \
  --no_local_rank --module dsq.cli train "$@"
