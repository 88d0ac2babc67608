#!/usr/bin/env bash
# Run recipes one after another on one node, each its own MLflow run in one experiment,
# then write the comparison report:
#   launch/sweep.sh [--seeds 1,2,3] NPROC EXPERIMENT BASE_CONFIG RECIPE... [-- key.sub=value ...]
# A RECIPE is a config file, or several joined with + (configs/recipes/w8a8g8.yaml+configs/
# recipes/optim/m8v8.yaml); its name is its path under configs/recipes/ without .yaml
# (w8a8g8+optim/m8v8), the run's MLflow recipe tag.
# e.g. launch/sweep.sh --seeds 1,2,3 1 study configs/small.yaml configs/recipes/*.yaml -- train.steps=400
# Runs land in runs/EXPERIMENT/<name>/ (with --seeds: runs/EXPERIMENT/<name>/seed<N>/, train.seed=N,
# seed-major order: every recipe at the first seed, then the next seed). A run whose
# summary.json exists is skipped, so rerunning the same command finishes a sweep in parts.
# A run that fails (a recipe that diverges stops with an error) does not stop the sweep: it is
# marked with runs/.../sweep_failed (its exit code) and skipped on reruns; delete that file to
# run it again. The exit code is 1 when a run failed.
set -euo pipefail
usage() {
  echo "usage: launch/sweep.sh [--seeds 1,2,3] NPROC EXPERIMENT BASE_CONFIG RECIPE... [-- key.sub=value ...]" >&2
  exit 2
}
SEEDS=()
if [ "${1:-}" = "--seeds" ]; then
  [ $# -ge 2 ] || usage
  IFS=, read -r -a SEEDS <<< "$2"; shift 2
  for s in "${SEEDS[@]}"; do
    [[ "$s" =~ ^[0-9]+$ ]] || { echo "sweep: --seeds takes integers separated by commas, got '$s'" >&2; exit 2; }
  done
fi
[ $# -ge 4 ] || usage
NPROC=$1; EXP=$2; BASE=$3; shift 3
RECIPES=(); OVERRIDES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do RECIPES+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift && OVERRIDES=("$@")
for r in "${RECIPES[@]}"; do
  IFS=+ read -r -a parts <<< "$r"
  for p in "${parts[@]}"; do
    [ -f "$p" ] || { echo "sweep: recipe file $p does not exist" >&2; exit 2; }
  done
done
HERE=$(cd "$(dirname "$0")" && pwd)
URI=sqlite:///runs/mlflow.db
for o in "${OVERRIDES[@]}"; do case "$o" in tracking.uri=*) URI=${o#tracking.uri=} ;; esac; done

recipe_name() {  # configs/recipes/a.yaml+configs/recipes/optim/b.yaml -> a+optim/b
  local out="" p n
  IFS=+ read -r -a parts <<< "$1"
  for p in "${parts[@]}"; do
    n=${p%.yaml}; n=${n%.yml}
    case "$n" in */recipes/*) n=${n##*/recipes/} ;; *) n=$(basename "$n") ;; esac
    out=${out:+$out+}$n
  done
  echo "$out"
}

run_one() {  # RECIPE SEED(or empty)
  local r=$1 seed=$2 name out extra=()
  name=$(recipe_name "$r")
  out=runs/$EXP/${name//\//-}
  if [ -n "$seed" ]; then out=$out/seed$seed; extra=("train.seed=$seed"); fi
  if [ -f "$out/summary.json" ]; then echo "sweep: $name${seed:+ seed $seed} done already ($out)"; return; fi
  if [ -f "$out/sweep_failed" ]; then
    echo "sweep: $name${seed:+ seed $seed} failed before (exit $(cat "$out/sweep_failed")); delete $out/sweep_failed to retry"
    FAILED=1; return
  fi
  echo "sweep: $name${seed:+ seed $seed}"
  IFS=+ read -r -a parts <<< "$r"
  local rc=0
  "$HERE/local.sh" "$NPROC" "$BASE" "${parts[@]}" "${OVERRIDES[@]}" "${extra[@]}" \
    "tracking.experiment=$EXP" "tracking.recipe=$name" \
    "tracking.run_name=$name${seed:+ seed $seed}" "train.out_dir=$out" || rc=$?
  if [ $rc -ne 0 ]; then
    # Ctrl-C (130) or a stop signal (75, checkpoint written): stop the sweep, the run resumes
    # on a rerun
    [ $rc -eq 130 ] || [ $rc -eq 75 ] && exit $rc
    mkdir -p "$out" && echo $rc > "$out/sweep_failed"
    echo "sweep: $name${seed:+ seed $seed} failed (exit $rc); the sweep goes on" >&2
    FAILED=1
  fi
}
FAILED=0

if [ ${#SEEDS[@]} -eq 0 ]; then
  for r in "${RECIPES[@]}"; do run_one "$r" ""; done
else
  for s in "${SEEDS[@]}"; do for r in "${RECIPES[@]}"; do run_one "$r" "$s"; done; done
fi
PYTHON=${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ] && echo "$HERE/../.venv/bin/python" || echo python)}
"$PYTHON" -m dsq.cli report --experiment "$EXP" --tracking-uri "$URI" --out "runs/$EXP/report"
exit $FAILED
