"""Two processes preparing the same data (two jobs sharing ``data.cache_dir``): the second waits
for the first and then uses its folder, resumes it when the first was killed, or prepares anew
when the first removed it; the bytes are those of one preparation, and nothing is left over."""

import json
import os
import signal
import threading
import time
from pathlib import Path

from dsq.data import prepare as P, shards, tokenizer

from tests.unit.data.test_prepare_scale import _cfg, _docs, _jsonl, _quiet, _reference, slow_prepare


def _holder(tmp_path, seed):
    """A ``dsq prepare``-like process that commits shards slowly, started on a fresh corpus;
    returns it once it holds the lock (its ``progress.json`` exists)."""
    proc, cfg, docs = slow_prepare(tmp_path, seed=seed, workers=1)
    cache, deadline = Path(cfg.data.cache_dir), time.time() + 60
    while not list(cache.glob(".*.partial/progress.json")):
        assert proc.poll() is None and time.time() < deadline, "the first process never started"
        time.sleep(0.05)
    return proc, cfg, docs


def _in_thread(cfg, said):
    box = {}

    def run():
        try:
            box["out"] = P.prepare(cfg.data, 384, log=said.append)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not any("waiting for it" in s for s in said):
        assert t.is_alive() and time.time() < deadline, (said, box)
        time.sleep(0.02)
    return t, box


def _check(out, docs):
    sp = tokenizer.load((out / "tokenizer.model").read_bytes())
    assert (out / "train.bin").read_bytes() == _reference(sp, docs)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".") and p.is_dir()) == []
    assert not (out / "lock").exists() and not (out / "progress.json").exists()


def test_a_second_process_waits_for_the_first_and_uses_its_folder(tmp_path):
    proc, cfg, docs = _holder(tmp_path, seed=3)
    said = []
    try:
        t, box = _in_thread(cfg, said)
        assert proc.wait(timeout=120) == 0
        t.join(timeout=60)
    finally:
        proc.kill()
    assert "error" not in box, box
    out = box["out"]
    assert said[-1] == f"data: using prepared {out} (prepared by the process this one waited for)"
    assert not any(s.startswith(("data: tokenizing", "data: training")) for s in said), said
    _check(out, docs)


def test_a_waiting_process_resumes_the_work_of_a_killed_one(tmp_path):
    proc, cfg, docs = _holder(tmp_path, seed=4)
    said = []
    try:
        t, box = _in_thread(cfg, said)
        prog, deadline = next(Path(cfg.data.cache_dir).glob(".*.partial/progress.json")), time.time() + 60
        while json.loads(prog.read_text()).get("passes", {}).get("train", {}).get("shards", 0) < 3:
            assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t.join(timeout=120)
    finally:
        proc.kill()
    assert "error" not in box, box
    assert any(s.startswith("data: resuming the train sources from shard") for s in said), said
    _check(box["out"], docs)


def test_a_waiting_process_prepares_anew_when_the_first_removed_its_folder(tmp_path):
    docs = _docs(120, seed=5)
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "t.jsonl", docs)], [_jsonl(tmp_path / "v.jsonl", docs[:20])],
               "data.workers=1")
    first = shards.Partial(P.prepared_dir(cfg.data, 384))
    first.lock(_quiet)  # another open file: flock conflicts within one process too
    said = []
    t, box = _in_thread(cfg, said)
    time.sleep(0.2)
    assert t.is_alive()  # still waiting
    first.remove()  # what a preparation stopped by bad input does
    t.join(timeout=120)
    assert "error" not in box, box
    assert any(s.startswith("data: training a 384-token") for s in said), said
    _check(box["out"], docs)
