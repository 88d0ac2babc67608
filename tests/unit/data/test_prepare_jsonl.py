"""The JSON lines fast path (workers read and parse byte ranges): the same bytes as the datasets
path for any number of workers, resume from a byte cursor (and without one), one error line
naming the file and line of a bad record."""

import codecs
import json

import numpy as np
import pytest

from dsq.config import load_config
from dsq.data import jsonl, passes, prepare as P, shards, sources, tokenizer

from tests.unit.data.test_prepare_scale import PLAY, _docs, _quiet, _reference

UNICODE = ["caf\u00e9 \u00e9t\u00e9", "\u65e5\u672c\u8a9e\u306e\u6587",
           "emoji \U0001F600\U0001F3B5", "\u0391\u03b8\u03ae\u03bd\u03b1", "tab\there",
           "line\u2028sep and \u0085 next"]


def _messy_docs(n, seed):
    """Documents of a play with unicode; some empty, blank, or holding U+2581."""
    docs = _docs(n, seed)
    return [d + " " + UNICODE[i % len(UNICODE)] if isinstance(d, str) and i % 3 == 0 else d
            for i, d in enumerate(docs)]


def _messy_jsonl(path, docs, bom=False):
    """``docs`` as JSON lines with what a real dump holds: blank and whitespace-only lines,
    CRLF, escaped and raw UTF-8, empty texts, two records on one line, other fields before and
    after the text, no newline at the end."""
    out = bytearray(codecs.BOM_UTF8 if bom else b"")
    i = 0
    while i < len(docs):
        d = docs[i]
        rec = {"id": i, "text": d} if i % 3 else {"text": d, "meta": {"k": [1, 2], "s": "x"}}
        line = json.dumps(rec, ensure_ascii=i % 2 == 0)
        if i % 13 == 4 and i + 1 < len(docs):  # two records on one line
            i += 1
            line += " " + json.dumps({"text": docs[i]})
        out += line.encode() + (b"\r\n" if i % 5 == 0 else b"\n")
        out += b"\n" if i % 7 == 0 else b""
        out += b"  \t \n" if i % 11 == 0 else b""
        i += 1
    path.write_bytes(bytes(out).rstrip(b"\r\n"))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    f = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    f.write_bytes(tokenizer.train([PLAY[:60000], " ".join(UNICODE) * 20], 384))
    return f


def _cfg(tmp_path, model, train, val, *over):
    return load_config([], [f"data.train={json.dumps([str(t) for t in train])}",
                            f"data.val={json.dumps([str(v) for v in val])}",
                            f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=384",
                            f"data.tokenizer={model}", *over])


def _no_datasets(monkeypatch):
    """The fast path reads nothing through ``datasets``."""
    def refuse(*a, **k):
        raise AssertionError("the datasets path was used")
    monkeypatch.setattr(sources, "open_stream", refuse)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(P, "BATCH_BYTES", 3000)  # many byte ranges per file
    monkeypatch.setattr(shards, "SHARD_BYTES", 2000)


def _bins(out):
    return {s: (out / f"{s}.bin").read_bytes() for s in ("train", "val")}


@pytest.mark.parametrize("hold_out", [False, True])
def test_fast_path_bytes_equal_the_datasets_path(tmp_path, model, small_batches, monkeypatch,
                                                 hold_out):
    docs = _messy_docs(400, seed=5)
    (tmp_path / "tr").mkdir()
    _messy_jsonl(tmp_path / "tr" / "a.jsonl", docs[:250], bom=True)
    _messy_jsonl(tmp_path / "tr" / "b.jsonl", docs[250:], bom=True)
    val = _messy_jsonl(tmp_path / "v.jsonl", docs[:40])
    assert (tmp_path / "tr" / "a.jsonl").stat().st_size > 30 * P.BATCH_BYTES
    over = ["data.val_fraction=0.15"] if hold_out else []
    cfg = _cfg(tmp_path, model, [tmp_path / "tr"], [] if hold_out else [val], *over)
    got = {}
    for fast in (False, True):
        for w in (1, 2):
            with monkeypatch.context() as m:
                m.setattr(jsonl, "ENABLED", fast)
                if fast:
                    _no_datasets(m)
                cfg.data.workers, cfg.data.cache_dir = w, str(tmp_path / f"c{fast}{w}")
                got[fast, w] = _bins(P.prepare(cfg.data, 384, log=_quiet))
    assert got[True, 1] == got[True, 2] == got[False, 1] == got[False, 2]
    sp = tokenizer.load(model.read_bytes())
    kept = [d for d in docs if isinstance(d, str) and d.strip()]
    if hold_out:
        held = P.held_out(0, len(kept), 0.15)
        assert 20 < held.sum() < 100
        assert got[True, 1]["val"] == _reference(sp, [d for d, v in zip(kept, held) if v])
        kept = [d for d, v in zip(kept, held) if not v]
    else:
        assert got[True, 1]["val"] == _reference(sp, docs[:40])
    assert got[True, 1]["train"] == _reference(sp, kept)


def test_ranges_cover_the_file_on_line_boundaries(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"".join(b'{"text": "%s"}\n' % (b"x" * (i * 37 % 300)) for i in range(200)))
    size = f.stat().st_size
    for chunk in (1, 100, 1000, size, 10 * size):
        got = list(jsonl.ranges([f], chunk))
        assert got[0][2] == 0 and got[-1][3] == size
        assert all(a[3] == b[2] for a, b in zip(got, got[1:]))
        data = f.read_bytes()
        assert all(data[end - 1:end] == b"\n" for _, _, _, end in got)
    mid = list(jsonl.ranges([f], 1000))[3][3]
    assert list(jsonl.ranges([f], 1000, 0, mid))[0][2] == mid


def test_a_jsonl_file_holding_an_array_keeps_the_datasets_path(tmp_path):
    arr = tmp_path / "a.jsonl"
    arr.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    lines = tmp_path / "b.jsonl"
    lines.write_bytes(codecs.BOM_UTF8 + b'\n  {"text": "one"}\n')
    assert not jsonl.fast("json", [arr]) and jsonl.fast("json", [lines])
    assert not jsonl.fast("json", [tmp_path / "b.json"]) and not jsonl.fast("parquet", [lines])
    assert list(sources.iter_documents([str(arr)])) == ["one", "two"]


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("cursor", [True, False])
def test_resume_mid_way_equals_an_uninterrupted_run(tmp_path, model, small_batches, monkeypatch,
                                                   cursor):
    docs = _messy_docs(500, seed=6)
    src = _messy_jsonl(tmp_path / "t.jsonl", docs)
    cfg = _cfg(tmp_path, model, [src], [], "data.val_fraction=0.1", "data.workers=1")
    expect = _bins(P.prepare(cfg.data, 384, log=_quiet))
    cfg.data.cache_dir = str(tmp_path / "again")
    real, calls = shards.StreamWriter.commit, []

    def dies_after_4(self, *a, **k):
        calls.append(k.get("cursor"))
        if len(calls) == 5:
            raise _Killed()
        return real(self, *a, **k)

    monkeypatch.setattr(shards.StreamWriter, "commit", dies_after_4)
    with pytest.raises(_Killed):
        P.prepare(cfg.data, 384, log=_quiet)
    progress = next((tmp_path / "again").glob(".*.partial/progress.json"))
    state = json.loads(progress.read_text())
    rec = state["passes"]["train"]
    assert rec["shards"] == 4 and rec["cursor"]["offset"] > 0, rec
    if not cursor:  # a partial preparation by an older dsq: documents only
        del rec["cursor"]
        progress.write_text(json.dumps(state))
    monkeypatch.setattr(shards.StreamWriter, "commit", real)
    begins, encode_range = [], jsonl.encode_range
    monkeypatch.setattr(jsonl, "encode_range", lambda *a, **k: begins.append(a[1]) or
                        encode_range(*a, **k))
    opened, open_stream = [], sources.open_stream
    monkeypatch.setattr(sources, "open_stream", lambda *a: opened.append(a) or open_stream(*a))
    said = []
    out = P.prepare(cfg.data, 384, log=said.append)
    assert any("resuming the train sources from shard 4 (after document "
               f"{rec['documents_read']:,};" in s for s in said), said
    if cursor:  # from the recorded byte, nothing before it read again
        assert begins[0] == rec["cursor"]["offset"] and not opened
    else:  # from the start, read in this process (iter_documents), skipping the documents
        assert not begins and not opened  # written; JSON lines are not read through datasets
    assert _bins(out) == expect


def _prepare_fails(tmp_path, capsys, src, *extra):
    from dsq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prepare", f"data.train=[{src}]", "data.val=[]", "data.val_fraction=0.1",
              f"data.cache_dir={tmp_path / 'c'}", "model.vocab_size=384", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("dsq: error: "), err
    assert not list((tmp_path / "c").glob("*/manifest.json"))
    return err[0]


GOOD = json.dumps({"text": "To be, or not to be: that is the question. \u00e9"})


@pytest.mark.parametrize("bad, says", [
    (b'{"text": "unterminated}', "is not JSON (Unterminated string starting at column 10)"),
    (b'{"text": 42}', "has a number in data.text_field='text', not a string: fix or remove"),
    (b'{"text": ["a"]}', "has an array in data.text_field='text', not a string"),
    (b'["text", "a"]', "is an array, not a JSON object: give one JSON object per line"),
    (b'{"text": "caf\xe9"}', "is not UTF-8 (byte 0xe9): convert the file to UTF-8"),
    (b'{"text": "\\ud800 alone"}', "holds an unpaired surrogate escape"),
    (b'{"text":\n"a"}', "is not JSON (Expecting value at column 9): each line must be one JSON "
                        "object, whole on its line"),
    (b'{"id": 7, "body": "x"}', "has no data.text_field='text' (the record's keys: ['body', "
                                "'id']): set data.text_field to the field that holds the text, "
                                "or remove that record"),
    (b'{"text": null, "id": 7}', "has null in data.text_field='text' (the record's keys: "
                                 "['id', 'text']): remove that record or give it a text"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_record_is_one_error_line_naming_file_and_line(tmp_path, model, capsys,
                                                            monkeypatch, bad, says, workers):
    monkeypatch.setattr(P, "BATCH_BYTES", 500)  # the bad line is in a later range
    src = tmp_path / "t.jsonl"
    src.write_bytes(("\n".join([GOOD] * 30) + "\n\n").encode() + bad + b"\n" + GOOD.encode())
    err = _prepare_fails(tmp_path, capsys, src, f"data.tokenizer={model}",
                         f"data.workers={workers}")
    assert err.startswith(f"dsq: error: data file {str(src)!r} line 32 {says}"), err


def test_a_source_without_the_text_field_names_its_first_record(tmp_path, model, capsys):
    """A corpus whose text is under another field: the first record says so, with its keys."""
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(json.dumps({"body": "x", "id": i}) for i in range(5)))
    err = _prepare_fails(tmp_path, capsys, src, f"data.tokenizer={model}")
    assert err == (f"dsq: error: data file {str(src)!r} line 1 has no data.text_field='text' "
                   f"(the record's keys: ['body', 'id']): set data.text_field to the field that "
                   f"holds the text, or remove that record")
    err = _prepare_fails(tmp_path, capsys, src, f"data.tokenizer={model}",
                         "data.text_field=content")
    assert "line 1 has no data.text_field='content' (the record's keys: ['body', 'id'])" in err


def test_held_out_is_the_same_function_for_both_paths():
    assert P.held_out is passes.held_out and P.HOLD_OUT_SEED == 1234
    assert np.array_equal(P.held_out(10, 5, 0.5), passes.held_out(0, 15, 0.5)[10:])


@pytest.mark.parametrize("bad, says", [
    (b'{"text": "unterminated}', "is not JSON (Unterminated string starting at column 10)"),
    (b'{"text": "caf\xe9"}', "is not UTF-8 (byte 0xe9): convert the file to UTF-8"),
    (b'{"text": 42}', "has a number in data.text_field='text', not a string: fix or remove"),
    (b'{"id": 7}', "has no data.text_field='text' (the record's keys: ['id']): set "
                   "data.text_field"),
    (b'{"text": null}', "has null in data.text_field='text' (the record's keys: ['text']): "
                        "remove that record or give it a text (an empty string \"\" is "
                        "skipped)"),
])
def test_a_bad_record_read_for_the_tokenizer_names_file_and_line(tmp_path, capsys, bad, says):
    """Without data.tokenizer the tokenizer learns from every document first (not the
    datasets loader, whose errors name neither file nor line): the same one line."""
    src = tmp_path / "t.jsonl"
    src.write_bytes(("\n".join([GOOD] * 30) + "\n").encode() + bad + b"\n" + GOOD.encode())
    err = _prepare_fails(tmp_path, capsys, src)
    assert err.startswith(f"dsq: error: data file {str(src)!r} line 31 {says}"), err


def test_the_tokenizer_reads_the_documents_the_datasets_loader_gives(tmp_path, monkeypatch):
    from dsq.data import jsonl, sources

    src = tmp_path / "t.jsonl"
    src.write_text("\ufeff" + "\n".join([GOOD, '{"text": ""}', "  ",
                                         '{"text": "a"} {"text": "b"}', '{"text": "  "}',
                                         json.dumps({"text": "\u00e9 line\nbreak"})]))
    monkeypatch.setattr(sources, "STREAM_RANGE_BYTES", 40)  # several ranges
    ours = list(sources.iter_documents([str(src)]))
    monkeypatch.setattr(jsonl, "ENABLED", False)
    assert ours == list(sources.iter_documents([str(src)]))
    assert ours == [json.loads(GOOD)["text"], "a", "b", "\u00e9 line\nbreak"]
