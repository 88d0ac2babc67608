#!/usr/bin/env bash
# One command that proves dsq on a bare GPU machine: Python 3.12 with PyTorch (and Triton)
# preinstalled, no DeepSpeed, megatron-core or MLflow, no network.
#
#   launch/gpu_check.sh --download DIR            where a package registry is reachable: the
#                                                 wheels the GPU image lacks, for CPython 3.12
#                                                 manylinux x86-64, into DIR (at most 60 MiB)
#   launch/gpu_check.sh --wheels DIR [--out OUT]  on the GPU machine: install them offline, then
#                                                 pytest -m gpu, bench linear, bench optim and a
#                                                 30-step bench train of the gpt2-small shapes
#                                                 (bf16 against the full int8 recipe), logs and
#                                                 JSON under OUT (default runs/gpu_check), all
#                                                 within 8 minutes
#   launch/gpu_check.sh --dry-run [--wheels DIR]  no GPU needed: check DIR and print the plan
#
# MLflow is not carried (too large); every run here has tracking.enabled=false.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# name==version of each package the GPU image does not have (KINDS.md of the device lists what
# it has: numpy, pandas, pyarrow, sentencepiece, huggingface-hub, tqdm, pytest, ...).
# Pure-Python sdists without a wheel on the registry (deepspeed) are built here into a wheel.
PINS=(
  deepspeed==0.19.8
  megatron-core==0.17.0
  omegaconf==2.4.0
  antlr4-python3-runtime==4.13.2
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)
MAX_MIB=60
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
# seconds per step; they add up to 8 minutes with the install
T_INSTALL=40 T_PYTEST=150 T_LINEAR=60 T_OPTIM=40 T_TRAIN=190

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }

MODE="" WHEELS="" OUT="runs/gpu_check" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --download) [ $# -ge 2 ] || die "--download needs a folder"; MODE=download; WHEELS=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ "$MODE" = download ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python

wheel_file() {  # the wheel of pin $1 in $WHEELS, or nothing
  local want version f n
  want=$(echo "${1%%==*}" | tr 'A-Z.-' 'a-z__') version=${1##*==}
  for f in "$WHEELS"/*.whl; do
    [ -e "$f" ] || continue
    n=$(basename "$f")
    if [ "$(echo "${n%%-*}" | tr 'A-Z.-' 'a-z__')" = "$want" ] \
       && [ "$(echo "$n" | cut -d- -f2)" = "$version" ]; then
      echo "$f"
      return 0
    fi
  done
  return 0
}

check_wheels() {  # every pin present, one wheel each, within MAX_MIB
  local missing=() f
  for pin in "${PINS[@]}"; do
    f=$(wheel_file "$pin")
    [ -n "$f" ] || missing+=("$pin")
  done
  [ ${#missing[@]} -eq 0 ] || die "$WHEELS lacks wheels for: ${missing[*]} (run --download $WHEELS where the registry is reachable)"
  local extra; extra=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
  [ "$extra" -eq "${#PINS[@]}" ] || die "$WHEELS holds $extra wheels for ${#PINS[@]} pins: remove the others (two versions of one package stop the install)"
  local kib; kib=$(du -sk "$WHEELS" | cut -f1)
  [ "$kib" -le $((MAX_MIB * 1024)) ] || die "$WHEELS is $((kib / 1024)) MiB, over the $MAX_MIB MiB limit"
  echo "wheels: ${#PINS[@]} in $WHEELS, $((kib / 1024)).$(( (kib % 1024) * 10 / 1024 )) MiB (limit $MAX_MIB MiB)"
}

if [ "$MODE" = download ]; then
  mkdir -p "$WHEELS"
  for pin in "${PINS[@]}"; do
    [ -n "$(wheel_file "$pin")" ] && continue
    if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
         --python-version 3.12 --implementation cp --abi cp312 "${PLATFORMS[@]}" \
         -d "$WHEELS" "$pin" > "$WHEELS/.download.log" 2>&1; then
      # no wheel on the registry: a pure-Python sdist, built here
      "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$WHEELS" "$pin" >> "$WHEELS/.download.log" 2>&1 \
        || die "could not download or build $pin (see $WHEELS/.download.log)"
    fi
  done
  rm -f "$WHEELS/.download.log"
  check_wheels
  exit 0
fi

PLAN=(
  "install: pip install --no-index --no-deps --target \$OUT/site WHEELS/*.whl; PYTHONPATH=repo:\$OUT/site (${T_INSTALL}s)"
  "pytest: python3 -m pytest -m gpu tests/e2e/gpu (${T_PYTEST}s)"
  "bench linear: dsq bench linear --device cuda --tokens 4096 --shapes 768x3072,3072x768,1024x4096 (${T_LINEAR}s)"
  "bench optim: dsq bench optim --device cuda --params 100e6 (${T_OPTIM}s)"
  "bench train: dsq bench train --nproc 1 --steps 30 gpt2-small shapes (12 x 768, 1024 positions, vocab 8192, 8 x 1024 tokens a step), bf16 against w8a8g8+qadamw+int8 (${T_TRAIN}s)"
)
if [ "$DRY" = 1 ]; then
  echo "gpu_check plan (output under $OUT):"
  i=1; for step in "${PLAN[@]}"; do echo "  $i. $step"; i=$((i + 1)); done
  if [ -n "$WHEELS" ]; then check_wheels; else echo "wheels: not checked (give --wheels DIR)"; fi
  exit 0
fi

[ -n "$WHEELS" ] || die "give --wheels DIR (made by --download DIR), or --dry-run"
check_wheels
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || die "PyTorch sees no CUDA device here: run this on the GPU machine (or use --dry-run)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE="$OUT/site"
declare -A STATUS SECONDS_TAKEN
run_step() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  local log="$OUT/${name// /_}.log" t0=$SECONDS rc=0
  echo "== $name (limit ${limit}s): $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1 || rc=$?
  SECONDS_TAKEN[$name]=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then STATUS[$name]=ok; else STATUS[$name]="FAILED (exit $rc, log $log)"; fi
  tail -n 25 "$log"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run_step install "$T_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY" PYTHONWARNINGS=ignore
run_step pytest "$T_PYTEST" "$PY" -m pytest -m gpu tests/e2e/gpu -q -rs -p no:cacheprovider \
  --junitxml "$OUT/pytest.xml"
run_step "bench linear" "$T_LINEAR" "$PY" -m dsq.cli bench linear --device cuda --tokens 4096 \
  --shapes 768x3072,3072x768,1024x4096 --no-torchao --json "$OUT/bench_linear.json"
run_step "bench optim" "$T_OPTIM" "$PY" -m dsq.cli bench optim --device cuda --params 100e6 \
  --only torch_adamw_fused dsq_8bit dsq_4bit dsq_4bit_v4 --json "$OUT/bench_optim.json"
run_step "bench train" "$T_TRAIN" "$PY" -m dsq.cli bench train --config configs/tiny.yaml \
  --override model.preset=gpt2-small --override model.seq_len=1024 \
  --override model.vocab_size=8192 --override train.micro_batch=8 \
  --override train.global_batch=8 --override train.eval_samples=16 --nproc 1 --steps 30 \
  --recipes bf16,w8a8g8+qadamw+int8 --cache-dir "$OUT/data_cache" --out "$OUT/bench_train" \
  --timeout 180 --json "$OUT/bench_train.json"
echo
echo "gpu_check summary ($(head -1 "$OUT/env.txt")):" | tee "$OUT/summary.txt"
FAILED=0
for name in install pytest "bench linear" "bench optim" "bench train"; do
  printf '  %-13s %-6s %s\n' "$name" "${SECONDS_TAKEN[$name]:-0}s" "${STATUS[$name]:-not run}" \
    | tee -a "$OUT/summary.txt"
  [ "${STATUS[$name]:-}" = ok ] || FAILED=1
done
exit $FAILED
