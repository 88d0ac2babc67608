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
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
CORES=$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
export DSQ_NPROC_PER_NODE=$NPROC
LOG_LEVEL=error
case "${DSQ_LOG_LEVEL:-WARNING}" in
  [Ii][Nn][Ff][Oo]|[Dd][Ee][Bb][Uu][Gg]|10|20) LOG_LEVEL=info ;;
  *) if [ -z "${DS_ACCELERATOR:-}" ] && ! nvidia-smi -L > /dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi ;;
esac
# One interpreter validates the config for NPROC ranks and its paths (nothing starts on a bad
# config: one "dsq: error:" line, exit 2), then runs the deepspeed launcher's node agent
# (deepspeed.launcher.launch, what `deepspeed --num_gpus NPROC` runs on one node) in-process.
# Ctrl-C reaches every process of the foreground group: the ranks checkpoint at the next step
# boundary (the agent also sends them SIGTERM and waits up to 30 s for them). The exit code is
# then 130, with no KeyboardInterrupt traceback from the launcher.
exec "$PYTHON" -c '
import base64, contextlib, gc, json, os, signal, sys
hit = []
signal.signal(signal.SIGINT, lambda *a: hit.append(1))
nproc, port, level, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def leave(code):
    gc.freeze()  # a quick exit: no garbage-collection pass over the libraries at shutdown
    sys.exit(130 if hit else code)
from dsq.cli import main as dsq
try:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        dsq(["config", "--check-paths", "--world-size", nproc, *args])
except SystemExit as e:
    if e.code:
        leave(e.code if isinstance(e.code, int) else 2)
if hit:
    leave(130)
import deepspeed.launcher.launch as agent
class Signals:  # the agent installs its own SIGINT handler: it records the Ctrl-C too
    def __getattr__(self, name):
        return getattr(signal, name)
    def signal(self, sig, handler):
        if sig == signal.SIGINT and callable(handler):
            inner = handler
            handler = lambda *a: (hit.append(1), inner(*a))
        return signal.signal(sig, handler)
agent.signal = Signals()
world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(int(nproc)))}).encode())
sys.argv = ["deepspeed.launcher.launch", "--world_info=" + world.decode(),
            "--master_addr=127.0.0.1", "--master_port=" + port, "--module", "--no_local_rank",
            "--log_level=" + level, "dsq.cli", "train", *args]
try:
    agent.main()
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
leave(code)
' "$NPROC" "$PORT" "$LOG_LEVEL" "${ARGS[@]}"
