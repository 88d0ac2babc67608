#!/usr/bin/env bash
# Run recipes one after another on one node, each its own MLflow run in one experiment,
# then write the comparison report:
#   launch/sweep.sh NPROC EXPERIMENT BASE_CONFIG RECIPE.yaml... [-- key.sub=value ...]
# e.g. launch/sweep.sh 2 study configs/small.yaml configs/recipes/*.yaml -- train.steps=100
# Runs land in runs/EXPERIMENT/<recipe>/; a finished recipe is skipped on a rerun (resume).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: launch/sweep.sh NPROC EXPERIMENT BASE_CONFIG RECIPE.yaml... [-- key.sub=value ...]" >&2
  exit 2
fi
NPROC=$1; EXP=$2; BASE=$3; shift 3
RECIPES=(); OVERRIDES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do RECIPES+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift && OVERRIDES=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
URI=sqlite:///runs/mlflow.db
for o in "${OVERRIDES[@]}"; do case "$o" in tracking.uri=*) URI=${o#tracking.uri=} ;; esac; done
for r in "${RECIPES[@]}"; do
  name=$(basename "$r" .yaml)
  out=runs/$EXP/$name
  if [ -f "$out/summary.json" ]; then echo "sweep: $name done already ($out)"; continue; fi
  echo "sweep: $name"
  "$HERE/local.sh" "$NPROC" "$BASE" "$r" "${OVERRIDES[@]}" "tracking.experiment=$EXP" \
    "tracking.run_name=$name" "train.out_dir=$out"
done
PYTHON=${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ] && echo "$HERE/../.venv/bin/python" || echo python)}
"$PYTHON" -m dsq.cli report --experiment "$EXP" --tracking-uri "$URI" --out "runs/$EXP/report"
