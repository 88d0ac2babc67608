"""dsq.runtime: the host allocator settings of dsq train/eval/bench (and their opt-out), and
the kernels a run selects and records."""

import os
import subprocess
import sys


PROBE = ("import os; from dsq.runtime import tune_allocator; "
         "print(tune_allocator(), tune_allocator(), os.environ.get('THP_MEM_ALLOC_ENABLE'))")


def _probe(**env) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DSQ_MALLOC_TUNING", "THP_MEM_ALLOC_ENABLE")}
    res = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return res.stdout.strip()


def test_applied_once_and_thp_set():
    assert _probe() == "True False 1"  # glibc tuned on the first call, not again


def test_opt_out_and_explicit_settings_win():
    assert _probe(DSQ_MALLOC_TUNING="0") == "False False None"
    assert _probe(THP_MEM_ALLOC_ENABLE="0") == "True False 0"


