"""Prepare training data: stream the documents (:mod:`dsq.data.sources`; local JSON lines are
read by the workers, :mod:`dsq.data.jsonl`), train or load a sentencepiece tokenizer, tokenize
in ``data.workers`` processes (:mod:`dsq.data.encode`) and write each split as one flat
memory-mapped token stream, pass by pass (:mod:`dsq.data.passes`), shard by shard
(:mod:`dsq.data.shards`).

Layout of a prepared directory (``<data.cache_dir>/<fingerprint>/``)::

    tokenizer.model     sentencepiece model (lossless BPE, see dsq.data.tokenizer; EOS between
                        documents)
    train.bin, val.bin  token ids, uint16 (or uint32 for vocabularies over 65536): every
                        document's ids then EOS, in source order
    manifest.json       written last: sources (with sizes, mtimes, SHA-256), token counts,
                        dtype, tokenizer, fingerprint

A block of ``seq_len`` training positions is ``tokens[i*L : i*L + L + 1]`` (inputs and shifted
labels), so the same prepared data serves every sequence length. Memory stays bounded: a few
batches of documents are in flight, token ids go to disk as they come. The bytes do not depend
on the number of workers. The fingerprint (:mod:`dsq.data.fingerprint`) keys the directory; a
changed source prepares again. A killed preparation resumes from its last complete shard;
nothing looks complete before ``manifest.json`` is in place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np

from dsq.data import passes, sources, tokenizer
from dsq.data.encode import Encoder, WorkerDied, node_cores
from dsq.data.fingerprint import (  # noqa: F401  (part of this module's interface)
    FORMAT_VERSION, SourceHashes, data_fingerprint, load_manifest, sampled_sha256, split_record,
    verify)
from dsq.data.passes import HOLD_OUT_SEED, held_out  # noqa: F401
from dsq.data.shards import Partial, StreamWriter
from dsq.data.sources import DataError, load_documents  # noqa: F401

BATCH_BYTES, BATCH_DOCS = 1 << 20, 4096  # a worker's job: documents, or bytes of JSON lines
TOKENIZER_SEED = 1234
"""Seed of the tokenizer's training sample (sources larger than data.tokenizer_sample_bytes)."""


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, sources_=None) -> bytes:
    """dsq's lossless BPE tokenizer (:mod:`dsq.data.tokenizer`) trained on the documents."""
    try:
        return tokenizer.train(texts, vocab_size)
    except RuntimeError as e:
        import re

        if "sentences_.empty()" in str(e):
            raise DataError(f"data {sources_} holds no text: every document is empty") from None
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise DataError(f"model.vocab_size={vocab_size} is too small for this text: the "
                            f"tokenizer needs at least {need.group(1)} pieces (256 bytes, the "
                            f"text's characters, newline, tab): set model.vocab_size="
                            f"{max_vocab_size(int(need.group(1)))}") from None
        raise


def max_vocab_size(tokenizer_vocab_size: int) -> int:
    """The largest ``model.vocab_size`` a tokenizer of this size supports: its pieces rounded up
    to a multiple of 128 (embedding rows padded for fast GEMMs, as GPT-2's 50257 -> 50304)."""
    return -(-tokenizer_vocab_size // 128) * 128


def _tokenizer_text(data_cfg, log) -> Iterator[str]:
    """The training documents the tokenizer learns from: all of them (held-out ones excluded)
    when the sources fit in data.tokenizer_sample_bytes, else a seeded sample."""
    limit = data_cfg.tokenizer_sample_bytes
    sample = sources.sample_texts(list(data_cfg.train), data_cfg.text_field, limit,
                                  TOKENIZER_SEED) if limit else None
    if sample is not None:
        log(f"data: training the tokenizer on a seeded sample of {len(sample):,} documents "
            f"({sum(map(len, sample)) / 1e6:.0f} MB, data.tokenizer_sample_bytes={limit:,})")
        yield from sample
        return
    frac = data_cfg.val_fraction
    for i, text in enumerate(sources.iter_documents(list(data_cfg.train), data_cfg.text_field)):
        if not (frac and held_out(i, 1, frac)[0]):
            yield text


def _check_vocab(sp, vocab_size: int, given: Optional[str]) -> None:
    n = sp.vocab_size()
    what = (f"data.tokenizer={given!r} has" if given else
            "the training text yields a tokenizer of")
    if n > vocab_size:
        raise DataError(f"{what} {n} tokens, more than model.vocab_size={vocab_size}: "
                        f"set model.vocab_size={max_vocab_size(n)}")
    if vocab_size > max_vocab_size(n):
        raise DataError(f"model.vocab_size={vocab_size} is larger than the tokenizer can "
                        f"provide: {what} {n} tokens, so {vocab_size - n} embedding rows "
                        f"would never be used: set model.vocab_size={max_vocab_size(n)} (or "
                        f"less), or train on more text")


def read_tokenizer(path: str) -> bytes:
    """The bytes of ``data.tokenizer``, checked to be a sentencepiece model (DataError if not)."""
    tok_path = Path(os.path.expanduser(path))
    if not tok_path.is_file():
        raise DataError(f"data.tokenizer={path!r} does not exist: give a sentencepiece .model "
                        f"file or null to train one")
    model_bytes = tok_path.read_bytes()
    try:
        tokenizer.load(model_bytes, f"data.tokenizer={path!r}")
    except tokenizer.TokenizerError as e:
        raise DataError(f"{e}: give a .model file written by sentencepiece (e.g. the "
                        f"tokenizer.model of a prepared data folder or a checkpoint), or null to "
                        f"train one") from None
    return model_bytes


# --------------------------------------------------------------------------- prepare
def prepared_dir(data_cfg, vocab_size: int, hashes: Optional[SourceHashes] = None) -> Path:
    return Path(data_cfg.cache_dir) / data_fingerprint(data_cfg, vocab_size, hashes)


def is_prepared(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def workers_of(data_cfg) -> int:
    """``data.workers``, 0 meaning the cores of the node."""
    return getattr(data_cfg, "workers", 0) or node_cores()


def prepare(data_cfg, vocab_size: int, log=print, verify_full: bool = False) -> Path:
    """Prepare (or find already prepared) data for ``data_cfg``; returns its directory.
    ``verify_full`` (``dsq prepare --verify``): re-hash the sources and token files in full."""
    hashes = SourceHashes(data_cfg.cache_dir, full=verify_full)
    out = prepared_dir(data_cfg, vocab_size, hashes)
    for f in hashes.changed:
        log(f"dsq: warning: {f} changed although its size and modification time did not: "
            f"its data is prepared again")
    damaged = None
    if is_prepared(out):
        damaged = verify(out, full=verify_full)
        if damaged is None:
            hashes.save()
            log(f"data: using prepared {out}" + (" (verified in full)" if verify_full else ""))
            return out
        aside = out.with_name(f"{out.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        log(f"dsq: warning: prepared data {out} is damaged ({damaged}): moved aside to "
            f"{aside.name}, preparing it again from the sources")
    try:
        _build(data_cfg, vocab_size, out, hashes, log)
    except DataError as e:
        if damaged:
            raise DataError(f"prepared data {out} was damaged ({damaged}) and cannot be "
                            f"prepared again: {e}") from e
        raise
    hashes.save()
    return out


def _build(data_cfg, vocab_size: int, out: Path, hashes: SourceHashes, log) -> None:
    partial = Partial(out)
    created = not out.parent.exists()
    partial.lock(log)
    if is_prepared(out):  # prepared by the process this one waited for
        partial.remove()
        log(f"data: using prepared {out} (prepared by the process this one waited for)")
        return
    try:
        model_bytes = partial.tokenizer()
        if model_bytes is None:
            if data_cfg.tokenizer:
                model_bytes = read_tokenizer(data_cfg.tokenizer)
            else:
                log(f"data: training a {vocab_size}-token sentencepiece BPE")
                model_bytes = train_tokenizer(_tokenizer_text(data_cfg, log), vocab_size,
                                              list(data_cfg.train))
        sp = tokenizer.load(model_bytes)
        _check_vocab(sp, vocab_size, data_cfg.tokenizer)
        state = partial.start(model_bytes)
        dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
        frac = data_cfg.val_fraction
        todo = [("train", list(data_cfg.train), "train", ["train", "val"] if frac else ["train"])]
        if not frac:
            todo.append(("val", list(data_cfg.val), "validation", ["val"]))
        workers = workers_of(data_cfg)
        writer = StreamWriter(partial, state, ["train", "val"], dtype.itemsize)
        log(f"data: tokenizing into {partial.dir} with {workers} worker"
            f"{'s' if workers > 1 else ''}")
        with Encoder(model_bytes, workers) as enc:
            for name, specs, split, outputs in todo:
                passes.run_pass(name, specs, split, outputs, data_cfg, writer, enc, log,
                                dtype.name, BATCH_BYTES, BATCH_DOCS)
        writer.close()
        counts = state["outputs"]
        _check_counts(data_cfg, counts)
        manifest = _manifest(data_cfg, vocab_size, out, partial.dir, sp, dtype, counts, hashes)
        manifest["workers"] = workers
        partial.finish(manifest)
        log(f"data: prepared {out} (train {counts['train']['tokens']:,} tokens, val "
            f"{counts['val']['tokens']:,})")
    except WorkerDied:
        partial.unlock()  # kept: the same command resumes
        raise
    except DataError:
        partial.remove()  # bad input: nothing half-written stays
        if created:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise
    finally:
        partial.unlock()  # killed or interrupted: kept, the same command resumes


def _check_counts(data_cfg, counts: Dict) -> None:
    if not counts["train"]["documents"]:
        raise DataError(f"data {list(data_cfg.train)} holds no text: every document is empty")
    if not counts["val"]["documents"]:
        if data_cfg.val_fraction:
            raise DataError(f"data.val_fraction={data_cfg.val_fraction} held out none of the "
                            f"{counts['train']['documents']} training documents: give data.val "
                            f"instead, or a larger fraction")
        raise DataError(f"data {list(data_cfg.val)} holds no text: every document is empty")


def _manifest(data_cfg, vocab_size, out, folder, sp, dtype, counts, hashes) -> Dict:
    files = []
    for spec in list(data_cfg.train) + list(data_cfg.val):
        kind, paths = sources.expand(spec)
        for f in paths:
            st = f.stat()
            files.append({"path": str(f.resolve()), "bytes": st.st_size,
                          "mtime_ns": st.st_mtime_ns, "sha256": hashes.sha256(f)})
    return {
        "format_version": FORMAT_VERSION,
        "splits": {s: split_record(folder / f"{s}.bin") for s in ("train", "val")},
        "fingerprint": out.name,
        "dtype": dtype.name,
        "tokens": {s: counts[s]["tokens"] for s in ("train", "val")},
        "documents": {s: counts[s]["documents"] for s in ("train", "val")},
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": sp.vocab_size(),
        "tokenizer_settings": tokenizer.SETTINGS,
        "eos_id": sp.eos_id(),
        "sources": {"train": list(data_cfg.train), "val": list(data_cfg.val)},
        "source_files": files,
    }


def unprepared_too_big(data_cfg, vocab_size: int) -> Optional[str]:
    """Why ``dsq train`` should not prepare this data itself (sources over
    ``data.prepare_limit_bytes`` and not prepared), or None. Reads no source: ``stat`` only."""
    limit = data_cfg.prepare_limit_bytes
    specs = list(data_cfg.train) + list(data_cfg.val)
    size = sources.total_bytes(specs)
    if not limit or (size is not None and size <= limit):
        return None
    hashes = SourceHashes(data_cfg.cache_dir)
    files = [f for s in specs for f in sources.expand(s)[1]]
    if all(hashes.lookup(f) for f in files) and is_prepared(prepared_dir(data_cfg, vocab_size,
                                                                          hashes)):
        return None
    what = "of unknown size (a Hub dataset)" if size is None else f"{size / 1e9:.2f} GB"
    return (f"the data ({what}) is not prepared and is larger than data.prepare_limit_bytes="
            f"{limit:,}, too big to prepare while the other ranks wait")
