#!/usr/bin/env bash
# The data preparation at scale, measured: throughput against sentencepiece, peak memory at two
# corpus sizes, kill -9 and resume, the data checks of a second start. Run it alone.
#   bash launch/bench_prepare.sh [SMALL_MB] [BIG_MB] [WORKDIR]     defaults: 256 1000 /tmp/dsq_bench_prepare
# Prints every number; the logs and corpora (about 3 x BIG_MB) stay in WORKDIR.
set -euo pipefail
SMALL=${1:-256}; BIG=${2:-1000}; W=${3:-/tmp/dsq_bench_prepare}
TREE=$(cd "$(dirname "$0")/.." && pwd)
PY="$TREE/.venv/bin/python"
export PYTHONPATH=$TREE
NCPU=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')
mkdir -p "$W"
cd "$TREE"
say() { echo; echo "=== $*"; }

say "1. dsq bench prepare --mb $SMALL (1 worker vs $NCPU; throughput, peak memory, sentencepiece's own rate, 1-vs-$NCPU byte identity)"
"$PY" -m dsq.cli bench prepare --mb "$SMALL" --workers "1,$NCPU" --dir "$W/small" --json "$W/small.json"

say "2. dsq bench prepare --mb $BIG ($NCPU workers; peak memory flat in corpus size?)"
"$PY" -m dsq.cli bench prepare --mb "$BIG" --workers "$NCPU" --dir "$W/big" --json "$W/big.json"
"$PY" - "$W/small.json" "$W/big.json" <<'PYEOF'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
ra, rb = a["rows"][-1]["peak_rss_mb"], b["rows"][-1]["peak_rss_mb"]
print(f"peak memory, all cores: {a['corpus_mb']:.0f} MB corpus {ra:.0f} MB, {b['corpus_mb']:.0f} MB "
      f"corpus {rb:.0f} MB: {100 * (rb - ra) / ra:+.1f}% (must be within 15%, both under 1 GB)")
r = a["rows"]
if len(r) > 1:
    print(f"all cores vs sentencepiece: {r[-1]['ratio']:.2f} (>= 0.90); vs 1 worker: "
          f"{r[-1]['speedup']:.2f}x (>= 1.8 on 2 cores)")
PYEOF

CORPUS=$(ls "$W"/big/corpus-*.jsonl); VAL="$W/big/val.jsonl"; TOK=$(ls "$W"/big/tokenizer-*.model)
VOCAB=$("$PY" -c "import sys; from dsq.data import tokenizer; from dsq.data.prepare import max_vocab_size; print(max_vocab_size(tokenizer.load(open(sys.argv[1],'rb').read()).vocab_size()))" "$TOK")
ARGS=("data.train=[$CORPUS]" "data.val=[$VAL]" "data.tokenizer=$TOK" "model.vocab_size=$VOCAB")
WHOLE=$(ls "$W"/big/cache-$NCPU/*/train.bin)

say "2b. /usr/bin/time -v dsq prepare of the $BIG MB corpus (main process's own maximum RSS; workers not included)"
rm -rf "$W/timev"
/usr/bin/time -v "$PY" -m dsq.cli prepare "${ARGS[@]}" data.cache_dir="$W/timev" 2> "$W/timev.log" >/dev/null
grep -E "Maximum resident|Elapsed" "$W/timev.log"

say "3. kill -9 at about half of the $BIG MB preparation, then the same command"
rm -rf "$W/kill"; HALF=$(( $(stat -c %s "$WHOLE") / 2 ))
setsid "$PY" -m dsq.cli prepare "${ARGS[@]}" data.cache_dir="$W/kill" > "$W/kill1.log" 2>&1 &
PID=$!
while :; do
  P=$(ls "$W"/kill/.*.partial/progress.json 2>/dev/null | head -n1 || true)
  if [ -n "$P" ]; then
    DONE=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['outputs'].get('train',{}).get('bytes',0))" "$P" 2>/dev/null || echo 0)
    [ "$DONE" -ge "$HALF" ] && break
  fi
  kill -0 $PID 2>/dev/null || { echo "finished before half: no kill"; break; }
  sleep 0.5
done
kill -9 -- -$PID 2>/dev/null || true; wait $PID 2>/dev/null || true
echo "killed at $DONE of $((HALF * 2)) train bytes"
"$PY" -m dsq.cli prepare "${ARGS[@]}" data.cache_dir="$W/kill" > "$W/kill2.log" 2>&1
grep -E "resuming" "$W/kill2.log" || echo "NO resume line"
A=$(sha256sum < "$WHOLE" | cut -d' ' -f1); B=$(sha256sum < "$(ls "$W"/kill/*/train.bin)" | cut -d' ' -f1)
echo "uninterrupted $A"; echo "resumed       $B"; [ "$A" = "$B" ] && echo "identical: yes" || echo "identical: NO"

say "4. a second dsq train start on the prepared $BIG MB corpus: time spent on data checks"
"$PY" - "$W/big/cache-$NCPU" "${ARGS[@]}" <<'PYEOF'
import sys, time
t0 = time.perf_counter()
from dsq.config import load_config
from dsq.data.dataset import TokenBlocks
from dsq.data.prepare import prepare, unprepared_too_big
cfg = load_config(["configs/small.yaml"], sys.argv[2:] + [f"data.cache_dir={sys.argv[1]}"])
t = time.perf_counter()
assert unprepared_too_big(cfg.data, cfg.model.vocab_size) is None   # dsq train's size check
out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)    # rank 0: find + verify
TokenBlocks(out, "train", cfg.model.seq_len); TokenBlocks(out, "val", cfg.model.seq_len)
print(f"data checks of a second start: {time.perf_counter() - t:.3f} s (must be under 2 s); {out}")
PYEOF
