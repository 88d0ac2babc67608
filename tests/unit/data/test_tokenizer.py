"""The lossless tokenizer: decode(encode(t)) == t, the prepared stream keeps line structure,
tokenizer settings are in the fingerprint, and bad tokenizers or vocab sizes are refused."""

import json

import numpy as np
import pytest

from dsq.config import load_config
from dsq.data import tokenizer
from dsq.data.prepare import DataError, data_fingerprint, prepare

from tests.conftest import CORPUS

PLAY = (CORPUS / "train" / "othello_gut.txt").read_text()

CASES = {
    "newlines": "were\nno stronger\n\nBOATSWAIN.\n",
    "blank lines": "\n\n\nACT I.\n\n\n\nSCENE I.\n\n",
    "runs of spaces": "a  b   c    d          e  ",
    "leading and trailing space": "   indented\n  two\n ",
    "tabs": "\tcol1\t\tcol2\t\n\t",
    "non-ASCII": "naïve café Ærøskøbing Straße ÅÄÖ 日本語 Ελληνικά",
    "emoji": "to be 😀 or not 🎉👩‍👩‍👧 to be",
    "sentencepiece's space symbol": "x\u2581y \u2581\u2581 z\u2581",
    "control characters": "a\r\nb\x0bc\x00d",
    "empty": "",
    "a play": PLAY[:20000],
}


@pytest.fixture(scope="module")
def sp():
    return tokenizer.load(tokenizer.train([PLAY], 512))


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_lossless(sp, name):
    text = CASES[name]
    ids = tokenizer.encode(sp, text)
    assert tokenizer.decode(sp, ids) == text
    assert sp.unk_id() not in ids  # byte fallback: nothing is unknown


def test_newlines_tabs_and_space_runs_are_pieces(sp):
    pieces = [sp.id_to_piece(i) for i in tokenizer.encode(sp, "a\n\n\tb    c")]
    assert pieces.count("\n") == 2 and pieces.count("\t") == 1
    # a run of spaces survives as pieces of the space symbol, not collapsed into one
    assert "".join(pieces).count("\u2581") == 4
    # the identity normalization keeps full-width and compatibility forms as written
    assert tokenizer.decode(sp, tokenizer.encode(sp, "ＡＢ ﬁ ①")) == "ＡＢ ﬁ ①"


def test_prepared_stream_decodes_to_the_files(tmp_path):
    (tmp_path / "tr").mkdir()
    texts = [CASES["newlines"] * 30 + PLAY[:3000], "  x\t\ty  \n\n" * 50]
    for i, t in enumerate(texts):
        (tmp_path / "tr" / f"{i}.txt").write_text(t)
    cfg = load_config([], [f"data.train={tmp_path / 'tr'}", f"data.val={tmp_path / 'tr' / '1.txt'}",
                           f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=384"])
    out = prepare(cfg.data, 384, log=lambda *a: None)
    m = json.loads((out / "manifest.json").read_text())
    sp = tokenizer.load((out / "tokenizer.model").read_bytes())
    ids = np.fromfile(out / "train.bin", dtype=m["dtype"])
    docs = np.split(ids, np.where(ids == sp.eos_id())[0] + 1)[:-1]
    assert [tokenizer.decode(sp, d[:-1]) for d in docs] == texts
    assert m["tokenizer_settings"]["normalization_rule_name"] == "identity"


def test_tokenizer_settings_are_in_the_fingerprint(tmp_path, monkeypatch):
    cfg = load_config([], [f"data.cache_dir={tmp_path}"])
    before = data_fingerprint(cfg.data, 2048)
    monkeypatch.setitem(tokenizer.SETTINGS, "remove_extra_whitespaces", True)
    assert data_fingerprint(cfg.data, 2048) != before


def _small_cfg(tmp_path, *over):
    (tmp_path / "t.txt").write_text(PLAY[:30000])
    return load_config([], [f"data.train={tmp_path / 't.txt'}", f"data.val={tmp_path / 't.txt'}",
                            f"data.cache_dir={tmp_path / 'cache'}", *over])


def test_corrupt_tokenizer_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model\n" * 10)
    cfg = _small_cfg(tmp_path, f"data.tokenizer={bad}")
    with pytest.raises(DataError, match=r"data.tokenizer=.*bad.model.* is not a sentencepiece "
                                        r"model.*or null to train one"):
        prepare(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    assert not (tmp_path / "cache").exists()  # nothing written


def test_vocab_size_beyond_the_tokenizer_is_refused(tmp_path):
    cfg = _small_cfg(tmp_path, "model.vocab_size=32000")
    with pytest.raises(DataError) as e:
        prepare(cfg.data, 32000, log=lambda *a: None)
    msg = str(e.value)
    assert "model.vocab_size=32000 is larger than the tokenizer can provide" in msg
    n = int(msg.split("a tokenizer of ")[1].split()[0])
    assert 256 < n < 32000 / 4
    suggested = int(msg.split("set model.vocab_size=")[1].split()[0])
    assert suggested % 128 == 0 and n <= suggested < n + 128
    assert not list((tmp_path / "cache").glob("*/manifest.json"))
