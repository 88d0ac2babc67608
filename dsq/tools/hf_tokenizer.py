"""A run's sentencepiece BPE model as a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``).

Contract: for the sentencepiece models dsq trains (today's BPE with NFKC normalization, and the
lossless identity/whitespace-keeping one with ``\\n``/``\\t`` symbols and byte fallback), the
returned tokenizer gives, for any text, the ids dsq's own encoder gives (``sp.encode``, or
``dsq.data.tokenizer.encode`` where that module exists), and decodes ids to the text
``sp.decode`` gives. :func:`verify` checks this on probe texts; :func:`build` runs it and
raises :class:`TokenizerExportError` on the first difference, so an inexact tokenizer is never
written. Settings this conversion cannot reproduce are refused up front, with the setting named.

How sentencepiece's pipeline maps onto ``tokenizers``:

* normalization: the model's precompiled character map (``Precompiled``, the same table
  sentencepiece applies; empty for ``identity``); ``remove_extra_whitespaces`` as regex
  replacements on ASCII spaces (collapse runs, strip both ends: sentencepiece treats only
  U+0020 as whitespace here); ``add_dummy_prefix`` as a prepended space;
* the meta symbol ``▁`` of the pieces is written as a plain space in the vocabulary, so text
  spaces need no escaping and a literal U+2581 in the text is either a space (``sp.encode``
  treats it as one) or, with dsq's lossless encoder, a character outside the vocabulary that
  byte fallback writes as its three UTF-8 bytes, exactly as that encoder does;
* user-defined symbols (``\\n``, ``\\t``) are added tokens matched on the raw text, as
  sentencepiece matches them before normalization and never merges them;
* BPE: sentencepiece merges, at each step, the adjacent pair whose concatenation is the
  vocabulary piece with the highest score (leftmost on ties). The merge list holds, for every
  piece in descending score order, each split of it into two vocabulary pieces, so the rank
  order is the score order. Control tokens (``<unk>``, ``</s>``) are special tokens, but
  ``split_special_tokens`` makes their literal text encode as text, as in sentencepiece;
* decoding: byte pieces back to UTF-8 (``ByteFallback``), and the dummy prefix's space
  stripped from the start.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Iterable, List, Optional

META = "\u2581"  # sentencepiece's meta symbol for a space

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

PROBES = [
    "Hello world.", "  two leading spaces", "trailing spaces   ", "runs   of    spaces",
    "line one\nline two\n\n\nthree blank lines", "\ttabs\tand  \t mixed \t\n", " ", "\n", "",
    "Ünïcödé: naïve café, Œuvre, ﬁne ligature, full-width ＡＢＣ１２３",
    "日本語のテキスト、中文文本，한국어 텍스트", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
    "literal meta \u2581 and \u2581\u2581 symbols", "control </s> and <unk> as text",
    "<0x0A> byte-piece text", "combining e\u0301 and a\u030a",
    "    indented code:\n        return x\n",
    "KING HENRY.\nO, for a Muse of fire, that would ascend\nThe brightest heaven of invention!\n",
]
"""Texts with the hard cases (whitespace runs, newlines, tabs, non-ASCII, special-token text)."""


class TokenizerExportError(ValueError):
    """The sentencepiece model cannot be represented exactly; the message says why."""


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_bytes)
    return m


def dsq_encoder(sp) -> Callable[[str], List[int]]:
    """The function dsq encodes text with (:func:`dsq.data.tokenizer.encode`, as ``dsq prepare``
    does)."""
    from dsq.data import tokenizer as dsq_tok

    return lambda text: list(dsq_tok.encode(sp, text))


def _literal_meta_as_bytes(sp, enc) -> bool:
    """Whether ``enc`` writes a literal U+2581 as byte pieces (else: as a space)."""
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]
    return enc(f"a{META}b") == enc("a") + byte_ids + enc("b") if all(byte_ids) else False


def build(model_bytes: bytes, probes: Iterable[str] = (), encode=None):
    """``(tokenizers.Tokenizer, special)`` for a sentencepiece model: the tokenizer, and the
    special tokens (``unk_token``, ``eos_token``, ...) for ``tokenizer_config.json``.

    ``encode(text) -> ids`` is the encoder to match (default :func:`dsq_encoder`). Verified on
    :data:`PROBES` plus ``probes`` before it is returned."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    m = _proto(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    encode = encode or dsq_encoder(sp)
    ts, ns = m.trainer_spec, m.normalizer_spec
    if ts.model_type != ts.BPE:
        raise TokenizerExportError(
            f"the run's tokenizer is a sentencepiece {ts.ModelType.Name(ts.model_type)} model; "
            f"dsq exports BPE models (the kind dsq trains) only")
    if not ts.byte_fallback:
        raise TokenizerExportError("the run's sentencepiece model has no byte fallback; dsq "
                                   "exports byte-fallback BPE models (the kind dsq trains) only")
    if ts.treat_whitespace_as_suffix or not ns.escape_whitespaces:
        raise TokenizerExportError("the run's sentencepiece model sets treat_whitespace_as_suffix "
                                   "or disables escape_whitespaces; dsq cannot export it")
    pieces = list(m.pieces)
    user = [p.piece for p in pieces if p.type == USER_DEFINED]
    if user and (ns.add_dummy_prefix or ns.remove_extra_whitespaces):
        raise TokenizerExportError(
            "the run's sentencepiece model has user-defined symbols together with "
            "add_dummy_prefix or remove_extra_whitespaces: sentencepiece applies those around the "
            "symbols in a way a Hugging Face tokenizer cannot reproduce exactly")
    if any(p.type == UNUSED for p in pieces):
        raise TokenizerExportError("the run's sentencepiece model has UNUSED pieces; dsq cannot "
                                   "export it")
    if any(" " in p.piece for p in pieces):
        raise TokenizerExportError("the run's sentencepiece model has a piece with a literal "
                                   "space; dsq cannot export it")

    def name(p: str) -> str:
        return p.replace(META, " ")

    vocab: Dict[str, int] = {}
    for i, p in enumerate(pieces):
        vocab[p.piece if p.type in (CONTROL, UNKNOWN, BYTE) else name(p.piece)] = i
    if len(vocab) != len(pieces):
        raise TokenizerExportError("the run's sentencepiece model has duplicate piece names")
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    merges = []
    for piece, _ in sorted(normal.items(), key=lambda kv: (-kv[1][0], kv[1][1])):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((name(left), name(right)))
    unk = next(p.piece for p in pieces if p.type == UNKNOWN)
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                     fuse_unk=False, dropout=None)
    tok = Tokenizer(bpe)

    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Replace(Regex(r"\A "), ""), normalizers.Replace(Regex(r" \z"), "")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if not _literal_meta_as_bytes(sp, encode):
        steps.append(normalizers.Replace(META, " "))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    if user:
        tok.add_tokens([AddedToken(name(u), normalized=False, special=False) for u in user])
    control = {p.piece: i for i, p in enumerate(pieces) if p.type in (CONTROL, UNKNOWN)}
    tok.add_special_tokens([AddedToken(c, normalized=False, special=True) for c in control])
    tok.encode_special_tokens = True  # "</s>" in the text is text, as in sentencepiece
    special = {"unk_token": unk}
    if sp.eos_id() >= 0:
        special["eos_token"] = sp.id_to_piece(sp.eos_id())
    if sp.bos_id() >= 0:
        special["bos_token"] = sp.id_to_piece(sp.bos_id())
    if sp.pad_id() >= 0:
        special["pad_token"] = sp.id_to_piece(sp.pad_id())
    problem = verify(tok, sp, list(PROBES) + list(probes), encode)
    if problem:
        raise TokenizerExportError(f"the Hugging Face tokenizer would differ from sentencepiece: "
                                   f"{problem}")
    return tok, special


def verify(tok, sp, texts: Iterable[str], encode=None) -> Optional[str]:
    """None if ``tok`` (a ``tokenizers.Tokenizer``, or a ``transformers`` tokenizer) encodes
    every text to dsq's ids and decodes them to ``sp.decode``'s text; else the first
    difference."""
    enc = encode or dsq_encoder(sp)
    is_hf = hasattr(tok, "convert_ids_to_tokens")
    for text in texts:
        want = enc(text)
        got = (tok.encode(text, add_special_tokens=False) if is_hf
               else tok.encode(text, add_special_tokens=False).ids)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                      min(len(got), len(want)))
            return (f"ids of {text[:80]!r} differ at position {at}: {got[at:at + 5]} vs "
                    f"sentencepiece {want[at:at + 5]}")
        back = tok.decode(want, skip_special_tokens=False)
        if back != sp.decode(want):
            return (f"decoding {text[:80]!r} gives {back[:80]!r}, sentencepiece "
                    f"{sp.decode(want)[:80]!r}")
    return None


def tokenizer_config(special: Dict[str, str], model_max_length: int) -> Dict:
    """``tokenizer_config.json`` for the tokenizer: a plain fast tokenizer that adds no tokens,
    keeps spaces as decoded and encodes special-token text as text."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "split_special_tokens": True, **special}


def special_tokens_map(special: Dict[str, str]) -> str:
    return json.dumps(special, indent=2)
