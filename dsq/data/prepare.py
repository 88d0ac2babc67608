"""Prepare training data: load text with Hugging Face ``datasets``, train or load a
sentencepiece tokenizer, and write each split as one flat memory-mapped token stream.

Layout of a prepared directory (``<data.cache_dir>/<fingerprint>/``)::

    tokenizer.model     sentencepiece model (lossless BPE, see dsq.data.tokenizer; EOS between
                        documents)
    train.bin, val.bin  token ids, uint16 (or uint32 for vocabularies over 65536)
    manifest.json       written last: sources, token counts, dtype, tokenizer, fingerprint

A block of ``seq_len`` training positions is ``tokens[i*L : i*L + L + 1]`` (inputs and
shifted labels), so the same prepared data serves every sequence length. The fingerprint
hashes the sources' contents, the vocabulary size and the tokenizer (its file, or the trainer
settings of :data:`dsq.data.tokenizer.SETTINGS`): a changed input re-prepares. The
directory is built under a temporary name and renamed into place, so a failed or
interrupted preparation never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from dsq.data import tokenizer

TEXT_EXT = {".txt", ".text", ".md"}
JSON_EXT = {".jsonl", ".json"}
PARQUET_EXT = {".parquet"}
FORMAT_VERSION = 2  # 2: lossless tokenizer (dsq.data.tokenizer)


class DataError(ValueError):
    """Missing, empty or undecodable input; the message names the input and the fix."""


# --------------------------------------------------------------------------- sources
def _expand(spec: str) -> Tuple[str, List[Path]]:
    """A source spec -> (kind, files). kind: text | json | parquet | hub."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in files if p.suffix.lower() in TEXT_EXT | JSON_EXT | PARQUET_EXT]
        if not files:
            raise DataError(f"data folder {spec!r} holds no .txt, .jsonl/.json or .parquet files")
        kinds = {_kind(p) for p in files}
        if len(kinds) > 1:
            raise DataError(f"data folder {spec!r} mixes file types {sorted(kinds)}: "
                            f"give one type per folder")
        return kinds.pop(), files
    if path.is_file():
        return _kind(path), [path]
    looks_local = spec.startswith((".", "/", "~")) or bool(path.suffix) or spec.count("/") > 1
    if looks_local:
        raise DataError(f"data path {spec!r} does not exist: give an existing file or folder "
                        f"(data.train / data.val)")
    return "hub", []


def _kind(p: Path) -> str:
    ext = p.suffix.lower()
    if ext in JSON_EXT:
        return "json"
    if ext in PARQUET_EXT:
        return "parquet"
    return "text"


def _fingerprint_sources(specs: List[str]) -> List[Dict]:
    out = []
    for spec in specs:
        kind, files = _expand(spec)
        if kind == "hub":
            out.append({"hub": spec})
            continue
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out.append({"path": str(f.resolve()), "sha256": h.hexdigest()})
    return out


def load_documents(specs: List[str], text_field: str = "text", split: str = "train"):
    """All documents of the sources, as a ``datasets.Dataset`` with one ``text`` column."""
    import datasets

    datasets.disable_progress_bars()
    parts = []
    for spec in specs:
        kind, files = _expand(spec)
        try:
            if kind == "text":
                for f in files:
                    _check_utf8(f)
                ds = datasets.load_dataset("text", data_files=[str(f) for f in files],
                                           sample_by="document", split="train")
            elif kind == "json":
                ds = datasets.load_dataset("json", data_files=[str(f) for f in files],
                                           split="train")
            elif kind == "parquet":
                ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files],
                                           split="train")
            else:
                ds = datasets.load_dataset(spec, split=split)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types; name the input
            what = ("is neither an existing file or folder nor a Hub dataset that could be "
                    "loaded" if kind == "hub" else "could not be read")
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"data {spec!r} {what}: {type(e).__name__}: {first}") from e
        if text_field not in ds.column_names:
            raise DataError(f"data {spec!r} has no column {text_field!r} (columns: "
                            f"{ds.column_names}): set data.text_field")
        parts.append(ds.select_columns([text_field]).rename_column(text_field, "text")
                     if text_field != "text" else ds.select_columns(["text"]))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    if len(ds) == 0:
        raise DataError(f"data {specs} holds no text: every document is empty")
    return ds


def _check_utf8(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty: remove it or give another file")
    try:
        with open(path, encoding="utf-8") as fh:
            for _ in iter(lambda: fh.read(1 << 20), ""):
                pass
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}): "
                        f"convert it to UTF-8") from e


HOLD_OUT_SEED = 1234
"""Seed of the ``data.val_fraction`` split (part of the data, not of the run: fixed)."""


def hold_out(docs, fraction: float):
    """``(train, val)``: a seeded random ``fraction`` of ``docs`` (at least one) as validation."""
    if len(docs) < 2:
        raise DataError(f"data.val_fraction={fraction} needs at least 2 training documents, "
                        f"found {len(docs)}: give data.val instead")
    n_val = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    split = docs.train_test_split(test_size=n_val, seed=HOLD_OUT_SEED, shuffle=True)
    return split["train"], split["test"]


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs, vocab_size: int) -> bytes:
    """dsq's lossless BPE tokenizer (:mod:`dsq.data.tokenizer`) trained on the documents."""
    try:
        return tokenizer.train(docs["text"], vocab_size)
    except RuntimeError as e:
        import re

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


def encode(docs, sp) -> np.ndarray:
    eos = sp.eos_id()
    chunks = []
    for text in docs["text"]:
        ids = tokenizer.encode(sp, text)
        ids.append(eos)
        chunks.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- prepare
def data_fingerprint(data_cfg, vocab_size: int) -> str:
    tok = data_cfg.tokenizer
    key = {
        "version": FORMAT_VERSION,
        "train": _fingerprint_sources(list(data_cfg.train)),
        "val": _fingerprint_sources(list(data_cfg.val)),
        "text_field": data_cfg.text_field,
        "vocab_size": vocab_size,
        "tokenizer": _fingerprint_sources([tok]) if tok else None,
        "tokenizer_settings": None if tok else tokenizer.SETTINGS,
    }
    if getattr(data_cfg, "val_fraction", 0.0):
        key["val_fraction"] = data_cfg.val_fraction
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prepared_dir(data_cfg, vocab_size: int) -> Path:
    return Path(data_cfg.cache_dir) / data_fingerprint(data_cfg, vocab_size)


def is_prepared(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def prepare(data_cfg, vocab_size: int, log=print) -> Path:
    """Prepare (or find already prepared) data for ``data_cfg``; returns its directory."""
    out = prepared_dir(data_cfg, vocab_size)
    damaged = None
    if is_prepared(out):
        damaged = verify(out)
        if damaged is None:
            log(f"data: using prepared {out}")
            return out
        aside = out.with_name(f"{out.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        log(f"dsq: warning: prepared data {out} is damaged ({damaged}): moved aside to "
            f"{aside.name}, preparing it again from the sources")
    model_bytes = read_tokenizer(data_cfg.tokenizer) if data_cfg.tokenizer else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            train_docs = load_documents(list(data_cfg.train), data_cfg.text_field, "train")
        except DataError as e:
            if damaged:
                raise DataError(f"prepared data {out} was damaged ({damaged}) and cannot be "
                                f"prepared again: {e}") from e
            raise
        if getattr(data_cfg, "val_fraction", 0.0) > 0:
            train_docs, val_docs = hold_out(train_docs, data_cfg.val_fraction)
            log(f"data: held out {len(val_docs)} of {len(train_docs) + len(val_docs)} "
                f"documents for validation (data.val_fraction={data_cfg.val_fraction})")
        else:
            val_docs = load_documents(list(data_cfg.val), data_cfg.text_field, "validation")
        if model_bytes is None:
            log(f"data: training a {vocab_size}-token sentencepiece BPE on "
                f"{len(train_docs)} documents")
            model_bytes = train_tokenizer(train_docs, vocab_size)
        sp = tokenizer.load(model_bytes)
        n = sp.vocab_size()
        what = (f"data.tokenizer={data_cfg.tokenizer!r} has" if data_cfg.tokenizer else
                "the training text yields a tokenizer of")
        if n > vocab_size:
            raise DataError(f"{what} {n} tokens, more than model.vocab_size={vocab_size}: "
                            f"set model.vocab_size={max_vocab_size(n)}")
        if vocab_size > max_vocab_size(n):
            raise DataError(f"model.vocab_size={vocab_size} is larger than the tokenizer can "
                            f"provide: {what} {n} tokens, so {vocab_size - n} embedding rows "
                            f"would never be used: set model.vocab_size={max_vocab_size(n)} (or "
                            f"less), or train on more text")
        (tmp / "tokenizer.model").write_bytes(model_bytes)
        dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        counts = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            ids = encode(docs, sp).astype(dtype)
            ids.tofile(tmp / f"{split}.bin")
            counts[split] = int(ids.size)
        splits = {split: split_record(tmp / f"{split}.bin") for split in counts}
        manifest = {
            "format_version": FORMAT_VERSION,
            "splits": splits,
            "fingerprint": out.name,
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "vocab_size": vocab_size,
            "tokenizer_vocab_size": sp.vocab_size(),
            "tokenizer_settings": tokenizer.SETTINGS,
            "eos_id": sp.eos_id(),
            "sources": {"train": list(data_cfg.train), "val": list(data_cfg.val)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not is_prepared(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"data: prepared {out} (train {counts['train']:,} tokens, val {counts['val']:,})")
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def load_manifest(path: Path) -> Dict:
    return json.loads((Path(path) / "manifest.json").read_text())


# --------------------------------------------------------------------------- verification
SAMPLE_WINDOWS, SAMPLE_BYTES = 64, 1 << 16


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the size and of up to 64 evenly spaced 64 KiB windows of a file (the whole
    file when smaller than that): a few MiB read whatever the file's size, so every run can
    afford it at start."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= SAMPLE_WINDOWS * SAMPLE_BYTES:
            h.update(fh.read())
        else:
            span = size - SAMPLE_BYTES  # first window at 0, last one ends at the file's end
            for i in range(SAMPLE_WINDOWS):
                fh.seek(span * i // (SAMPLE_WINDOWS - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def split_record(path: Path) -> Dict:
    return {"bytes": path.stat().st_size, "sha256_sampled": sampled_sha256(path)}


def verify(path: Path) -> Optional[str]:
    """None when the prepared directory's token files match its manifest (sizes, token counts
    and sampled hashes), else what does not."""
    try:
        manifest = load_manifest(path)
    except (OSError, ValueError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    itemsize = np.dtype(manifest.get("dtype", "uint16")).itemsize
    for split, tokens in manifest.get("tokens", {}).items():
        f = Path(path) / f"{split}.bin"
        if not f.is_file():
            return f"{f.name} is missing"
        size = f.stat().st_size
        if size != tokens * itemsize:
            return (f"{f.name} has {size:,} bytes, the manifest's {tokens:,} tokens need "
                    f"{tokens * itemsize:,}")
        rec = manifest.get("splits", {}).get(split)
        if rec and rec.get("sha256_sampled") and sampled_sha256(f) != rec["sha256_sampled"]:
            return f"{f.name}'s content differs from what was prepared"
    return None
