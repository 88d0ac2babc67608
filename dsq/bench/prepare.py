"""``dsq bench prepare``: ``dsq prepare``'s throughput and memory on a generated corpus, beside
sentencepiece's own multi-threaded encode of the same text (the limit).

The corpus is JSON lines of 1-8 KB documents cut (seeded) from the Shakespeare texts shipped
with dsq, ``--mb`` MB in all; the tokenizer (``--vocab`` pieces) is trained once on 2 MB of it
and given as ``data.tokenizer``, as a large corpus would be prepared. Each worker count runs
``prepare()`` in a fresh process; its wall time covers everything (hashing the sources,
tokenizing, writing, the manifest), its peak memory is sampled over the process and its workers
(summed proportional set sizes, shared pages counted once). sentencepiece's rate: ``SentencePieceProcessor.encode(texts, num_threads=N)`` on the
same documents held in memory. MB are MB of UTF-8 text.

Usage: ``dsq bench prepare [--mb 32] [--workers 1,N] [--dir DIR] [--json out.json]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from dsq.log import ArgParser

CHILD = """
import json, sys, time
from dsq.config import load_config
from dsq.data.prepare import prepare
cfg = load_config([], sys.argv[1:])
t = time.perf_counter()
out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
wall = time.perf_counter() - t
m = json.loads((out / "manifest.json").read_text())
print(json.dumps({"wall": wall, "tokens": m["tokens"]["train"] + m["tokens"]["val"],
                  "out": str(out)}))
"""


def make_corpus(path: Path, mb: float, seed: int = 0) -> List[str]:
    """JSON lines of 1-8 KB documents, ``mb`` MB of file; returns the documents."""
    import numpy as np

    from dsq.data.sources import iter_documents

    text = "".join(iter_documents(["dsq:shakespeare_full/train"]))
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    with open(path, "w") as fh:
        while size < mb * 1e6:
            n = int(rng.integers(1000, 8000))
            a = int(rng.integers(0, len(text) - n))
            line = json.dumps({"text": text[a:a + n]}) + "\n"
            fh.write(line)
            docs.append(text[a:a + n])
            size += len(line.encode())
    return docs


def _tree_rss(pid: int) -> int:
    """Memory of a process and its descendants (Linux /proc): the sum of their proportional set
    sizes (PSS), so pages shared between them (a worker between fork and exec) count once."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            pass
    return total


def run_prepare(args: List[str]) -> Dict:
    """``prepare()`` in a fresh process: wall, tokens, output folder, peak RSS (sampled)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"dsq bench prepare: the preparation failed:\n{err[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), peak_rss=peak)


def sp_rate(model: Path, docs: List[str], threads: int) -> float:
    """Seconds sentencepiece takes to encode ``docs`` with ``threads`` threads."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    t = time.perf_counter()
    sp.encode(docs, num_threads=threads)
    return time.perf_counter() - t


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def bench(mb: float, workers: List[int], vocab: int, work: Path, log=print) -> Dict:
    from dsq.data import tokenizer
    from dsq.data.prepare import max_vocab_size

    corpus = work / f"corpus-{mb:g}MB.jsonl"
    docs = make_corpus(corpus, mb)
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    model = work / f"tokenizer-{vocab}.model"
    if not model.exists():
        sample, n = [], 0
        for d in docs:
            sample.append(d)
            n += len(d)
            if n > 2e6:
                break
        model.write_bytes(tokenizer.train(sample, vocab))
    pieces = tokenizer.load(model.read_bytes()).vocab_size()
    val = work / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    rows, outs = [], {}
    for w in workers:
        args = [f"data.train=[{corpus}]", f"data.val=[{val}]", f"data.tokenizer={model}",
                f"data.cache_dir={work / f'cache-{w}'}", f"model.vocab_size={max_vocab_size(pieces)}",
                f"data.workers={w}"]
        r = run_prepare(args)
        sp_s = sp_rate(model, docs, w)
        outs[w] = _sha(Path(r["out"]) / "train.bin")
        rows.append({"workers": w, "mb_s": text_mb / r["wall"], "tokens_s": r["tokens"] / r["wall"],
                     "peak_rss_mb": r["peak_rss"] / 1e6, "sp_mb_s": text_mb / sp_s,
                     "ratio": (text_mb / r["wall"]) / (text_mb / sp_s), "wall_s": r["wall"]})
    for r in rows:
        r["speedup"] = r["mb_s"] / rows[0]["mb_s"]
    return {"corpus_mb": os.path.getsize(corpus) / 1e6, "text_mb": text_mb, "documents": len(docs),
            "tokenizer_pieces": pieces, "identical": len(set(outs.values())) == 1, "rows": rows}


def table(res: Dict) -> str:
    lines = [f"dsq bench prepare: {res['corpus_mb']:.0f} MB of JSON lines ({res['documents']:,} "
             f"documents, {res['text_mb']:.0f} MB of text), tokenizer of "
             f"{res['tokenizer_pieces']} pieces, {os.cpu_count()} CPUs",
             "| workers | MB/s | tokens/s | peak RSS | sentencepiece MB/s (same threads) | "
             f"ratio | vs {res['rows'][0]['workers']} worker |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        lines.append(f"| {r['workers']} | {r['mb_s']:.2f} | {r['tokens_s'] / 1e6:.2f}M | "
                     f"{r['peak_rss_mb']:.0f} MB | {r['sp_mb_s']:.2f} | {r['ratio']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    ws = [str(r["workers"]) for r in res["rows"]]
    if len(ws) > 1:
        lines.append(f"train.bin byte-identical for {' and '.join(ws)} workers: "
                     f"{'yes' if res['identical'] else 'NO'}")
    return "\n".join(lines)


def main(argv: List[str]) -> None:
    from dsq.data.encode import node_cores

    p = ArgParser(prog="dsq bench prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=32, help="corpus size in MB of JSON lines")
    p.add_argument("--workers", default=f"1,{node_cores()}",
                   help="worker counts to compare, comma-separated (default: 1 and all cores)")
    p.add_argument("--vocab", type=int, default=8192, help="tokenizer pieces (configs/small.yaml)")
    p.add_argument("--dir", default=None, help="work folder (kept; default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    ns = p.parse_args(argv)
    try:
        workers = sorted({int(w) for w in ns.workers.split(",")})
        assert workers and workers[0] >= 1
    except (ValueError, AssertionError):
        p.error(f"--workers {ns.workers!r}: give counts >= 1, e.g. 1,{node_cores()}")
    ns.workers = workers
    if ns.dir:
        Path(ns.dir).mkdir(parents=True, exist_ok=True)
        res = bench(ns.mb, ns.workers, ns.vocab, Path(ns.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="dsq-bench-prepare-") as d:
            res = bench(ns.mb, ns.workers, ns.vocab, Path(d))
    print(table(res))
    if ns.json:
        Path(ns.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
