"""Data preparation from text, JSON lines and Parquet; the resumable data-parallel schedule."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from dsq.config import load_config
from dsq.data.dataset import GlobalSchedule, TokenBlocks, eval_indices
from dsq.data.prepare import DataError, prepare

from tests.conftest import CORPUS


def _cfg(tmp_path, train, val, **over):
    extra = [f"{k}={v}" for k, v in over.items()]
    return load_config([], [f"data.train={json.dumps(train)}", f"data.val={json.dumps(val)}",
                            f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=384", *extra])


TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)


def test_text_folder_round_trip(tmp_path):
    (tmp_path / "tr").mkdir()
    (tmp_path / "tr" / "a.txt").write_text(TEXT)
    (tmp_path / "tr" / "b.txt").write_text(TEXT.upper())
    (tmp_path / "va.txt").write_text(TEXT[:2000])
    cfg = _cfg(tmp_path, [str(tmp_path / "tr")], [str(tmp_path / "va.txt")])
    out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == {"train": 2, "val": 1}
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = np.fromfile(out / "train.bin", dtype=manifest["dtype"])
    assert len(ids) == manifest["tokens"]["train"]
    # the stream is the documents' encodings, each closed by EOS, in file order
    eos = sp.eos_id()
    docs = np.split(ids, np.where(ids == eos)[0] + 1)[:-1]
    assert [sp.decode(d[:-1].tolist()) for d in docs] == [TEXT, TEXT.upper()]  # lossless: the trailing space too
    # same inputs: reused, not re-prepared; changed input: a new fingerprint
    assert prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None) == out
    (tmp_path / "va.txt").write_text(TEXT[:3000])
    assert prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None) != out


def test_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": TEXT[i:i + 500], "id": i} for i in range(0, 3000, 500)]
    with open(tmp_path / "t.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v.parquet")
    cfg = _cfg(tmp_path, [str(tmp_path / "t.jsonl")], [str(tmp_path / "v.parquet")],
               **{"data.text_field": "body"})
    out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents"] == {"train": 6, "val": 6} and m["tokens"]["val"] > 100
    cfg = _cfg(tmp_path, [str(tmp_path / "t.jsonl")], [str(tmp_path / "v.parquet")])
    with pytest.raises(DataError, match=r"t.jsonl' line 1 has no data.text_field='text' \(the "
                       r"record's keys: \['body', 'id'\]\): set data.text_field"):
        prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "empty_dir", "blank"])
def test_bad_input_is_reported(tmp_path, case):
    bad = tmp_path / "bad.txt"
    if case == "empty":
        bad.write_text("")
    elif case == "binary":
        bad.write_bytes(b"\xff\xfe\x00\x81" * 100)
    elif case == "empty_dir":
        bad = tmp_path / "d"
        bad.mkdir()
    elif case == "blank":
        bad.write_text("\n\n   \n")
    (tmp_path / "ok.txt").write_text(TEXT)
    cfg = _cfg(tmp_path, [str(bad)], [str(tmp_path / "ok.txt")])
    expect = {"missing": "does not exist", "empty": "is empty", "binary": "not UTF-8",
              "empty_dir": "holds no", "blank": "holds no text"}[case]
    with pytest.raises(DataError, match=expect):
        prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "nothing half-written"


def test_blocks_and_short_split(tmp_path):
    cfg = _cfg(tmp_path, [str(CORPUS / "val")], [str(CORPUS / "val")], **{"model.vocab_size": 512})
    out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    blocks = TokenBlocks(out, "train", 64)
    b = blocks.batch([0, 3])
    assert b.shape == (2, 65)
    # consecutive blocks overlap by one token (labels of block i end where block i+1 starts)
    assert blocks.batch([1])[0, 0] == blocks.batch([0])[0, 64]
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenBlocks(out, "val", 10**7)


def test_schedule_is_deterministic_and_layout_free():
    s = GlobalSchedule(n_blocks=50, global_batch=16, seed=3)
    again = GlobalSchedule(n_blocks=50, global_batch=16, seed=3)
    for step in (0, 1, 2, 3, 7):  # steps 3+ cross an epoch boundary (50 blocks)
        idx = s.step_indices(step)
        assert idx == again.step_indices(step)
        for dp, mb in ((1, 16), (1, 8), (2, 8), (2, 4), (4, 4)):
            parts = [i for r in range(dp) for m in s.micro_batches(step, r, dp, mb) for i in m]
            assert parts == idx
    # every block once per epoch
    seen = [i for st in range(25) for i in s.step_indices(st)]  # 400 samples = 8 epochs
    for e in range(8):
        assert sorted(seen[e * 50:(e + 1) * 50]) == list(range(50))
    assert GlobalSchedule(50, 16, 4).step_indices(0) != idx


def test_eval_indices():
    assert eval_indices(10, 64) == list(range(10))
    idx = eval_indices(1000, 8)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 999


def test_val_fraction_holds_out_a_seeded_random_split(tmp_path):
    (tmp_path / "tr").mkdir()
    texts = [f"Document {i}: " + TEXT[: 200 + 37 * i] for i in range(40)]
    for i, t in enumerate(texts):
        (tmp_path / "tr" / f"{i:02d}.txt").write_text(t)
    runs = []
    for sub in ("a", "b"):
        cfg = load_config([], [f"data.train={json.dumps([str(tmp_path / 'tr')])}", "data.val=[]",
                               "data.val_fraction=0.1", f"data.cache_dir={tmp_path / sub}",
                               "model.vocab_size=300"])
        out = prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["documents"] == {"train": 36, "val": 4}
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        val = np.fromfile(out / "val.bin", dtype=manifest["dtype"])
        docs = np.split(val, np.where(val == sp.eos_id())[0] + 1)[:-1]
        heads = sorted(sp.decode(d[:-1].tolist()).split(":")[0] for d in docs)
        runs.append((out.name, heads, (out / "train.bin").read_bytes()))
    assert runs[0] == runs[1]  # the same split and stream on every machine
    assert runs[0][1] != [f"Document {i}" for i in range(36, 40)]  # random, not the tail


def test_hub_configuration_is_datasets_name(monkeypatch):
    """``OWNER/NAME:CONFIG`` opens the configuration CONFIG of the Hub dataset OWNER/NAME (a
    plain name opens its default); a dotted configuration is not taken for a file name."""
    import datasets

    from dsq.data import sources

    opened = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: opened.append((a, k)) or [])
    for spec in ("HuggingFaceFW/fineweb-edu:sample-10BT", "Skylion007/openwebtext",
                 "wikimedia/wikipedia:20231101.en"):
        assert sources.expand(spec) == ("hub", [])
        sources.open_stream(spec, "hub", [], "train")
    assert opened == [
        (("HuggingFaceFW/fineweb-edu",), dict(split="train", streaming=True, name="sample-10BT")),
        (("Skylion007/openwebtext",), dict(split="train", streaming=True)),
        (("wikimedia/wikipedia",), dict(split="train", streaming=True, name="20231101.en"))]
    with pytest.raises(DataError, match="does not exist"):
        sources.expand("some/local/file.txt:x")
