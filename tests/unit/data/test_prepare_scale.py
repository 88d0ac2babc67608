"""Preparation at scale: parallel and streaming (bytes independent of the worker count, equal to
encoding document by document), resumable after a kill, cheap fingerprint with --verify, the
size limit of dsq train, a dying worker, Hub-style streaming sources, the packaged corpus."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsq.config import load_config
from dsq.data import fingerprint, prepare as P, shards, sources, tokenizer

ROOT = Path(__file__).resolve().parents[3]
PLAY = (ROOT / "dsq/data/corpus/shakespeare/val/tempest_gut.txt").read_text()


def _docs(n, seed=0):
    """n documents cut from a play; some empty, blank, or holding U+2581 (encoded apart)."""
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = int(r.integers(0, len(PLAY) - 2000))
        d = PLAY[a:a + int(r.integers(20, 1500))]
        out.append("" if i % 41 == 7 else "  \n" if i % 37 == 5 else
                   d + " \u2581x\u2581" if i % 29 == 3 else d)
    return out


def _jsonl(path, docs):
    with open(path, "w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"text": d, "id": i}) + "\n")
    return path


def _cfg(tmp_path, train, val, *over):
    return load_config([], [f"data.train={json.dumps([str(t) for t in train])}",
                            f"data.val={json.dumps([str(v) for v in val])}",
                            f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=384", *over])


def _reference(sp, docs):
    """The old path: each document's ids then EOS, concatenated."""
    ids = []
    for d in docs:
        if isinstance(d, str) and d.strip():
            ids += tokenizer.encode(sp, d) + [sp.eos_id()]
    return np.asarray(ids, dtype=np.uint16).tobytes()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(P, "BATCH_BYTES", 3000)
    monkeypatch.setattr(shards, "SHARD_BYTES", 2000)


def _quiet(*a):
    pass


def test_bytes_equal_the_reference_for_1_and_2_workers(tmp_path, small_shards):
    docs = _docs(240)
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "t.jsonl", docs)], [_jsonl(tmp_path / "v.jsonl", docs[:30])])
    outs = []
    for w in (1, 2):
        cfg.data.workers, cfg.data.cache_dir = w, str(tmp_path / f"c{w}")
        outs.append(P.prepare(cfg.data, 384, log=_quiet))
    model = (outs[0] / "tokenizer.model").read_bytes()
    kept = [d for d in docs if isinstance(d, str) and d.strip()]
    assert model == tokenizer.train(kept, 384)  # a corpus under the sample: today's tokenizer
    sp = tokenizer.load(model)
    for out in outs:
        assert (out / "train.bin").read_bytes() == _reference(sp, docs)
        assert (out / "val.bin").read_bytes() == _reference(sp, docs[:30])
        m = fingerprint.load_manifest(out)
        assert m["documents"]["train"] == len(kept)
        assert [f["bytes"] for f in m["source_files"]] == [os.path.getsize(tmp_path / n)
                                                           for n in ("t.jsonl", "v.jsonl")]
    assert outs[0].name == outs[1].name  # the worker count is not part of the data


class _Killed(BaseException):
    pass


def test_resume_after_an_interruption_gives_the_same_bytes(tmp_path, small_shards, monkeypatch):
    docs = _docs(300, seed=1)
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "t.jsonl", docs)], [_jsonl(tmp_path / "v.jsonl", docs[:20])],
               "data.workers=1")
    whole = P.prepare(cfg.data, 384, log=_quiet)
    expect = {s: (whole / f"{s}.bin").read_bytes() for s in ("train", "val")}
    cfg.data.cache_dir = str(tmp_path / "again")
    real, calls = shards.StreamWriter.commit, []

    def dies_after_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise _Killed()
        return real(self, *a, **k)

    monkeypatch.setattr(shards.StreamWriter, "commit", dies_after_3)
    with pytest.raises(_Killed):
        P.prepare(cfg.data, 384, log=_quiet)
    cache = Path(cfg.data.cache_dir)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [f".{whole.name}.partial"]
    assert not list(cache.rglob("manifest.json"))  # nothing looks complete
    monkeypatch.setattr(shards.StreamWriter, "commit", real)
    said = []
    out = P.prepare(cfg.data, 384, log=said.append)
    assert any("resuming the train sources from shard 3 (after document" in s for s in said), said
    assert {s: (out / f"{s}.bin").read_bytes() for s in ("train", "val")} == expect


DRIVER = """
import sys, time
from dsq.config import load_config
from dsq.data import prepare as P, shards
P.BATCH_BYTES, shards.SHARD_BYTES = 2000, 1500
real = shards.StreamWriter.commit
def slow(self, *a, **k):
    time.sleep(0.1)
    return real(self, *a, **k)
shards.StreamWriter.commit = slow
cfg = load_config([], sys.argv[1:])
P.prepare(cfg.data, 384)
"""


def slow_prepare(tmp_path, seed: int, workers: int):
    """:data:`DRIVER` started on 300 documents of ``seed`` (JSON lines): the process, its
    config and the documents."""
    docs = _docs(300, seed=seed)
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "t.jsonl", docs)], [_jsonl(tmp_path / "v.jsonl", docs[:20])],
               f"data.workers={workers}")
    args = [f"data.train={cfg.data.train[0]}", f"data.val={cfg.data.val[0]}",
            f"data.cache_dir={cfg.data.cache_dir}", "model.vocab_size=384", f"data.workers={workers}"]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, cfg, docs


def test_kill_9_then_the_same_command_resumes(tmp_path):
    proc, cfg, docs = slow_prepare(tmp_path, seed=2, workers=2)
    import psutil

    cache, deadline = Path(cfg.data.cache_dir), time.time() + 60
    try:
        while time.time() < deadline:
            prog = list(cache.glob(".*.partial/progress.json"))
            state = json.loads(prog[0].read_text()) if prog else {}
            if state.get("passes", {}).get("train", {}).get("shards", 0) >= 3:
                break
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(workers) == 2
    gone, alive = psutil.wait_procs(workers, timeout=10)  # orphaned workers exit by themselves
    assert alive == [], alive
    said = []
    out = P.prepare(cfg.data, 384, log=said.append)
    assert any("resuming the train sources from shard" in s for s in said), said
    sp = tokenizer.load((out / "tokenizer.model").read_bytes())
    assert (out / "train.bin").read_bytes() == _reference(sp, docs)


def test_restart_reads_no_source_and_verify_rehashes(tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text(PLAY[:20000])
    cfg = _cfg(tmp_path, [src], [src])
    first = P.prepare(cfg.data, 384, log=_quiet)
    hashed = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert P.prepare(cfg.data, 384, log=_quiet) == first and hashed == []  # stat only
    # same size and mtime, other content: a start does not see it, --verify does
    st = src.stat()
    src.write_text(PLAY[:20000].replace("Ariel", "ARIEL"))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size
    assert P.prepare(cfg.data, 384, log=_quiet) == first
    said = []
    second = P.prepare(cfg.data, 384, log=said.append, verify_full=True)
    assert second != first and hashed
    assert any("changed although its size and modification time did not" in s for s in said)
    # a changed size: found at a normal start, prepared again
    src.write_text(PLAY[:21000])
    assert P.prepare(cfg.data, 384, log=_quiet) not in (first, second)
    # --verify also re-hashes the token files in full
    (second / "train.bin").write_bytes(b"\0" * (second / "train.bin").stat().st_size)
    assert fingerprint.verify(second, full=True)


def test_train_refuses_a_big_unprepared_corpus(tmp_path, capsys):
    from dsq.cli import main

    src = tmp_path / "t.txt"
    src.write_text(PLAY[:20000])
    args = [f"data.train=[{src}]", f"data.val=[{src}]", f"data.cache_dir={tmp_path / 'cache'}",
            "model.vocab_size=384", "data.prepare_limit_bytes=10000",
            f"train.out_dir={tmp_path / 'run'}", "tracking.enabled=false"]
    with pytest.raises(SystemExit) as e:
        main(["train", "configs/tiny.yaml", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("dsq: error: ")
    assert "larger than data.prepare_limit_bytes=10,000" in err[0]
    assert f"dsq prepare configs/tiny.yaml {' '.join(args)}" in err[0]
    assert "sbatch slurm/prepare.sbatch configs/tiny.yaml" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    cfg = load_config(["configs/tiny.yaml"], args)
    P.prepare(cfg.data, 384, log=_quiet)
    assert P.unprepared_too_big(cfg.data, 384) is None  # prepared: dsq train goes on


class _DiesWhenUnpickled:
    def __reduce__(self):
        return (os._exit, (9,))

    def __len__(self):
        return 5


def test_a_dying_worker_is_one_error_line_and_the_work_is_kept(tmp_path, monkeypatch, capsys):
    from dsq.cli import main

    src = tmp_path / "t.txt"
    src.write_text(PLAY[:20000])
    cfg = _cfg(tmp_path, [src], [src])
    tok = P.prepare(cfg.data, 384, log=_quiet) / "tokenizer.model"
    real = sources.iter_documents

    def docs(*a, **k):
        yield from real(*a, **k)
        yield _DiesWhenUnpickled()

    monkeypatch.setattr(sources, "iter_documents", docs)
    with pytest.raises(SystemExit) as e:
        main(["prepare", f"data.train=[{src}]", f"data.val=[{src}]", f"data.tokenizer={tok}",
              f"data.cache_dir={tmp_path / 'c2'}", "model.vocab_size=384", "--workers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("dsq: error: a tokenizer worker process died") and "resumes" in err[0]
    assert list((tmp_path / "c2").glob(".*.partial")) and not list((tmp_path / "c2").glob("*/manifest.json"))


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_hub_datasets_stream_through_the_same_code(tmp_path, small_shards, monkeypatch, fmt):
    import datasets

    docs = _docs(600, seed=3)
    if fmt == "json":
        local = _jsonl(tmp_path / "owt.jsonl", docs)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        local = tmp_path / "owt.parquet"
        pq.write_table(pa.table({"text": docs}), local, row_group_size=100)
    real, opened = datasets.load_dataset, []

    def hub(path, *a, **k):  # the Hub name resolves to the local files, same streaming loader
        if path == "someorg/webtext":
            opened.append(k)
            return real(fmt, data_files=[str(local)], split="train", streaming=k["streaming"])
        return real(path, *a, **k)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(sources, "STREAM_BATCH", 64)
    commits = []
    real_commit = shards.StreamWriter.commit
    monkeypatch.setattr(shards.StreamWriter, "commit",
                        lambda self, *a, **k: commits.append(a) or real_commit(self, *a, **k))
    cfg = _cfg(tmp_path, ["someorg/webtext"], [], "data.val_fraction=0.1", "data.workers=2")
    out = P.prepare(cfg.data, 384, log=_quiet)
    assert opened and all(k["streaming"] for k in opened)
    assert len(commits) > 5  # several shards (and many batches: 3 KB each)
    kept = [d for d in docs if isinstance(d, str) and d.strip()]
    val = P.held_out(0, len(kept), 0.1)
    sp = tokenizer.load((out / "tokenizer.model").read_bytes())
    assert (out / "train.bin").read_bytes() == _reference(sp, [d for d, v in zip(kept, val) if not v])
    assert (out / "val.bin").read_bytes() == _reference(sp, [d for d, v in zip(kept, val) if v])
    assert 30 < val.sum() < 90


def test_tokenizer_sample_is_seeded_and_spread(tmp_path):
    docs = [f"doc {i}: " + d for i, d in enumerate(_docs(800, seed=4)) if d and d.strip()]
    src = _jsonl(tmp_path / "t.jsonl", docs)
    limit = 60_000
    assert os.path.getsize(src) > 4 * limit
    sources.WINDOW_BYTES, old = 8192, sources.WINDOW_BYTES
    try:
        a = sources.sample_texts([str(src)], "text", limit, seed=1)
        b = sources.sample_texts([str(src)], "text", limit, seed=1)
    finally:
        sources.WINDOW_BYTES = old
    assert a == b and 0.5 * limit < sum(map(len, a)) <= limit
    firsts = sorted(int(t.split(":")[0].split()[1]) for t in a if t.startswith("doc "))
    assert firsts[0] > 0 or firsts[-1] > len(docs) // 2  # windows over the file, not its head
    assert sources.sample_texts([str(src)], "text", 10**9, seed=1) is None  # small: all of it


def test_small_config_corpus_ships_with_the_package():
    cfg = load_config([str(ROOT / "configs/small.yaml")], [])
    for spec, n in ((cfg.data.train[0], 68), (cfg.data.val[0], 5)):
        kind, files = sources.expand(spec)
        assert kind == "text" and len(files) == n and "shared" not in str(files[0])
    first = next(sources.iter_documents([cfg.data.val[0]]))
    assert first.startswith("\ufeff") or "HAMLET" in first.upper()[:5000]
