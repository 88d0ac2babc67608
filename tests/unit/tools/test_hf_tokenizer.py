"""The exported Hugging Face tokenizer equals sentencepiece, ids and text, for dsq's current
tokenizer settings (NFKC, whitespace collapsed, dummy prefix) and the lossless ones (identity,
whitespace kept, newline/tab symbols, byte fallback, a literal U+2581 written as bytes)."""

import io
import json
import os
import random

import pytest

from tests.conftest import CORPUS

os.environ["HF_HUB_OFFLINE"] = "1"

BASE = dict(model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, eos_id=1,
            bos_id=-1, pad_id=-1)
SETTINGS = {
    "current": BASE,  # dsq.data.prepare.train_tokenizer
    "lossless": dict(BASE, normalization_rule_name="identity", remove_extra_whitespaces=False,
                     add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                     split_by_whitespace=True, user_defined_symbols=["\n", "\t"]),
}
META = "\u2581"


def _texts():
    return [p.read_text() for p in sorted(CORPUS.rglob("*.txt"))]


def _lines(kind):
    for text in _texts()[:4]:
        for line in text.splitlines(keepends=kind == "lossless"):
            line = line if kind == "lossless" else line.strip()
            if line.strip(" "):
                yield line[:4096]


def _lossless_encode(sp):
    """The lossless tokenizer's encoder: a literal U+2581 as its UTF-8 byte pieces."""
    meta = [sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]

    def enc(text):
        ids = []
        for i, part in enumerate(text.split(META)):
            ids.extend(meta if i else [])
            ids.extend(sp.encode(part) if part else [])
        return ids
    return enc


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def model(request):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_lines(request.param), model_writer=buf,
                                   vocab_size=1024, hard_vocab_limit=False, num_threads=1,
                                   minloglevel=2, **SETTINGS[request.param])
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    enc = _lossless_encode(sp) if request.param == "lossless" else sp.encode
    return request.param, buf.getvalue(), sp, enc


HARD = ["  lead and trail  ", "runs     of\t\tspaces \n\n\n\nand newlines\r\n", "\n", " ", "",
        "naïve café, Œuvre, ﬁne, ＡＢＣ１２３, ½, e\u0301", "日本語のテキスト 한국어 🙂👩‍👩‍👧",
        f"literal {META} meta {META}{META}", "</s> and <unk> typed as text", "<0x0A> piece name"]


def _fuzz(n, seed=0):
    rng = random.Random(seed)
    alphabet = list(" \n\t  abcé日😀.,'" + META) + ["    ", "\n\n", "the ", " of", "</s>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_tokenizer_json_equals_sentencepiece(model):
    from dsq.tools.hf_tokenizer import build, verify

    kind, mb, sp, enc = model
    tok, special = build(mb, encode=enc)
    assert special == {"unk_token": "<unk>", "eos_token": "</s>"}
    real = _texts()  # whole plays (train and unseen validation), newlines and all
    assert verify(tok, sp, real + HARD + _fuzz(3000), encode=enc) is None
    # and the comparison can fail: sentencepiece's raw ids differ on a literal U+2581
    if kind == "lossless":
        assert verify(tok, sp, [f"a{META}b"], encode=sp.encode) is not None
    # byte fallback, never <unk>
    assert sp.unk_id() not in tok.encode("日本語 🙂", add_special_tokens=False).ids


def test_transformers_loads_it_and_round_trips(model, tmp_path):
    from transformers import AutoTokenizer, GPT2Config

    from dsq.tools.hf_tokenizer import build, tokenizer_config

    kind, mb, sp, enc = model
    tok, special = build(mb, encode=enc)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(special, 128)))
    GPT2Config(vocab_size=1024).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in _texts()[-1:] + HARD:
        ids = enc(text)
        assert hf.encode(text) == ids  # no BOS/EOS added
        assert hf.decode(ids) == sp.decode(ids)
        if kind == "lossless":  # lossless: the text comes back exactly
            assert hf.decode(hf.encode(text)) == text
    assert hf.eos_token_id == sp.eos_id()
    assert hf.decode([sp.eos_id()], skip_special_tokens=True) == ""


def test_unsupported_models_are_refused():
    import sentencepiece as spm

    from dsq.tools.hf_tokenizer import TokenizerExportError, build

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_lines("current"), model_writer=buf,
                                   vocab_size=600, model_type="unigram", minloglevel=2,
                                   num_threads=1)
    with pytest.raises(TokenizerExportError, match="UNIGRAM"):
        build(buf.getvalue())
