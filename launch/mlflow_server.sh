#!/usr/bin/env bash
# A real MLflow tracking server: SQL backend + artifact store, on a host and port you choose.
#   launch/mlflow_server.sh [--host 0.0.0.0] [--port 5000] [--backend sqlite:///runs/mlflow-server.db]
#                           [--artifacts runs/mlflow-artifacts]
# Backends: sqlite:///path.db (default) or postgresql://user:pass@host:5432/db.
# Training jobs then use tracking.uri=http://HOST:PORT; the UI is at the same address.
set -euo pipefail
HOST=127.0.0.1; PORT=5000
BACKEND=sqlite:///runs/mlflow-server.db
ARTIFACTS=runs/mlflow-artifacts
while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --artifacts) ARTIFACTS=$2; shift 2 ;;
    -h|--help) sed -n 2,7p "$0"; exit 0 ;;
    *) echo "mlflow_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${MLFLOW:-}" ]; then
  if [ -x "$ROOT/.venv/bin/mlflow" ] && [ -z "${VIRTUAL_ENV:-}" ]; then MLFLOW=$ROOT/.venv/bin/mlflow; else MLFLOW=mlflow; fi
fi
case "$BACKEND" in
  sqlite:////*) mkdir -p "$(dirname "${BACKEND#sqlite:///}")" ;;
  sqlite:///*) mkdir -p "$(dirname "${BACKEND#sqlite:///}")"; BACKEND="sqlite:///$(cd "$(dirname "${BACKEND#sqlite:///}")" && pwd)/$(basename "$BACKEND")" ;;
esac
mkdir -p "$ARTIFACTS"
ARTIFACTS=$(cd "$ARTIFACTS" && pwd)
echo "MLflow server: http://$HOST:$PORT  backend $BACKEND  artifacts $ARTIFACTS" >&2
ALLOWED=()
if [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
  ALLOWED=(--allowed-hosts "*")   # reachable from compute nodes by name or address
fi
exec "$MLFLOW" server --backend-store-uri "$BACKEND" --serve-artifacts \
  --artifacts-destination "$ARTIFACTS" --host "$HOST" --port "$PORT" --workers 1 "${ALLOWED[@]}"
