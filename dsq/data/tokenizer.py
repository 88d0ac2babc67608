"""The lossless sentencepiece tokenizer of dsq: train, load, encode, decode.

Contract: for every Unicode string ``t`` (any UTF-8 text), ``decode(sp, encode(sp, t)) == t``.
The tokenizer is a BPE model trained with

* identity normalization (no NFKC: full-width forms, ligatures, ... stay as written),
* whitespace kept: no stripping, no collapsing of runs of spaces (``remove_extra_whitespaces``
  off), no dummy prefix; newline and tab are pieces of their own, and pieces made only of
  spaces (indentation) may be learned,
* byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, so nothing is
  ever ``<unk>``.

sentencepiece writes a space as U+2581 (``▁``) inside pieces, so a literal U+2581 in the text
would decode as a space; :func:`encode` writes it as its three UTF-8 byte pieces instead, which
decode back to U+2581. Ids: 0 ``<unk>``, 1 ``</s>`` (end of document), no BOS or padding.

:data:`SETTINGS` are the trainer options that shape the model; they are part of the prepared
data's fingerprint (:mod:`dsq.data.prepare`), so a change re-prepares old caches.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Iterator, List

SETTINGS = dict(
    model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1,
    pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
    user_defined_symbols=["\n", "\t"], max_sentence_length=8192,
)
"""sentencepiece trainer options that define dsq's tokenizer (hashed into the data fingerprint)."""

_LOWER_ONE_EIGHTH = "\u2581"  # sentencepiece's meta symbol for a space


class TokenizerError(ValueError):
    """A tokenizer file that is not a sentencepiece model; the message names the file."""


def train(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train dsq's tokenizer on documents; returns the serialized model (``.model`` bytes).

    Each line is one training sentence with its newline kept (lines are cut at 4,096
    characters). ``vocab_size`` is an upper bound: a small text may yield fewer pieces.
    """
    import sentencepiece as spm

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.splitlines(keepends=True):
                if line.strip(" "):
                    yield line[:4096]

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=buf, vocab_size=vocab_size, hard_vocab_limit=False,
        num_threads=max(1, min(8, os.cpu_count() or 1)), minloglevel=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, **SETTINGS)
    return buf.getvalue()


def load(model_bytes: bytes, name: str = "tokenizer"):
    """A ``SentencePieceProcessor`` from model bytes; :class:`TokenizerError` if they are not one."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, TypeError, ValueError):
        raise TokenizerError(f"{name} is not a sentencepiece model (its bytes do not parse as "
                             f"one)") from None
    if sp.vocab_size() <= 0:
        raise TokenizerError(f"{name} is not a sentencepiece model (no pieces)")
    return sp


def encode(sp, text: str) -> List[int]:
    """Token ids of ``text`` (lossless: see the module docstring)."""
    if _LOWER_ONE_EIGHTH not in text:
        return sp.encode(text)
    meta = [sp.piece_to_id(f"<0x{b:02X}>") for b in _LOWER_ONE_EIGHTH.encode()]
    ids: List[int] = []
    for i, part in enumerate(text.split(_LOWER_ONE_EIGHTH)):
        if i:
            ids.extend(meta)
        if part:
            ids.extend(sp.encode(part))
    return ids


def decode(sp, ids: Iterable[int]) -> str:
    """Text of token ids; ``decode(sp, encode(sp, t)) == t``."""
    return sp.decode([int(i) for i in ids])
