#!/usr/bin/env bash
# One node: launch/local.sh NPROC CONFIG... [key.sub=value ...] [--verbose]
# Validates the config for NPROC ranks first, and that train.out_dir and data.cache_dir can be
# written (no process starts on a bad config), then starts NPROC ranks with the deepspeed
# launcher (GPUs, or CPU ranks where there are none).
#   threads: each rank gets cores / NPROC torch threads unless OMP_NUM_THREADS is set
#   logging: the launcher's and libraries' INFO lines only with --verbose or DSQ_LOG_LEVEL=INFO
#   Ctrl-C:  the ranks checkpoint at the next step boundary (as on SIGTERM); exit code 130
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/local.sh NPROC CONFIG... [key.sub=value ...] [--verbose]" >&2
  exit 2
fi
NPROC=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
ARGS=()
for a in "$@"; do
  if [ "$a" = "--verbose" ]; then export DSQ_LOG_LEVEL=INFO; else ARGS+=("$a"); fi
done
"$PYTHON" -m dsq.cli config --check-paths --world-size "$NPROC" "${ARGS[@]}" > /dev/null
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
CORES=$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
export DSQ_NPROC_PER_NODE=$NPROC
LOG_LEVEL=error
case "${DSQ_LOG_LEVEL:-WARNING}" in
  [Ii][Nn][Ff][Oo]|[Dd][Ee][Bb][Uu][Gg]|10|20) LOG_LEVEL=info ;;
  *) if [ -z "${DS_ACCELERATOR:-}" ] && ! nvidia-smi -L > /dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi ;;
esac
# Ctrl-C reaches every process of the foreground group: the ranks checkpoint at the next step
# boundary (the launcher's agent also sends them SIGTERM and waits up to 30 s for them). This
# wrapper keeps the runner itself from a KeyboardInterrupt traceback and makes the exit code 130.
exec "$PYTHON" -c '
import signal, sys
hit = []
signal.signal(signal.SIGINT, lambda *a: hit.append(1))
from deepspeed.launcher.runner import main
sys.argv[0] = "deepspeed"
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.exit(130 if hit else code)
' --num_gpus "$NPROC" --master_port "$PORT" --log_level "$LOG_LEVEL" \
  --no_local_rank --module dsq.cli train "${ARGS[@]}"
