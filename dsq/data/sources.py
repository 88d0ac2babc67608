"""The documents of ``data.train`` / ``data.val``, read in source order with bounded memory.

A source is a text file (one document per file; ``.txt``, ``.text``, ``.md``, or the same
compressed: ``.txt.xz``, ``.txt.gz``), a folder of files of one type, ``.jsonl``/``.json`` or
``.parquet`` files (one document per row, column ``data.text_field``), ``dsq:NAME`` (a corpus
shipped in ``dsq/data/corpus/NAME``), or a Hugging Face Hub dataset name, ``OWNER/NAME`` or
``OWNER/NAME:CONFIG`` for one of its configurations (:func:`hub_dataset`). JSON lines, Parquet
and Hub datasets are all read by ``datasets.load_dataset(..., streaming=True)``: the same
streaming code, a few MB in memory whatever the corpus size, nothing cached on disk. Blank
documents are skipped. (``dsq prepare`` has its workers read local ``.jsonl`` files instead,
:mod:`dsq.data.jsonl`, with the same documents.)

:func:`sample_texts` draws the tokenizer's training text: every document when the sources are
smaller than the sample, else seeded windows (file offsets of JSON lines, Parquet row groups,
whole text files; the first documents of a seeded shuffle buffer for Hub data), without a pass
over the corpus.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

TEXT_EXT = (".txt", ".text", ".md")
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}
JSON_EXT = (".jsonl", ".json")
STREAM_RANGE_BYTES = 1 << 26  # bytes of JSON lines parsed at a time by iter_documents
PARQUET_EXT = (".parquet",)
PACKAGED = Path(__file__).resolve().parent / "corpus"
STREAM_BATCH = 1024  # rows per batch read from a datasets stream


class DataError(ValueError):
    """Missing, empty or undecodable input; the message names the input and the fix."""


def resolve(spec: str) -> str:
    """``dsq:NAME/...`` -> the path of a corpus shipped with the package; others unchanged."""
    if spec.startswith("dsq:"):
        return str(PACKAGED / spec[4:])
    return spec


def hub_dataset(spec: str) -> Tuple[str, Optional[str]]:
    """A Hub source ``OWNER/NAME[:CONFIG]`` -> (dataset, configuration or None): the ``path``
    and ``name`` of ``datasets.load_dataset`` (``HuggingFaceFW/fineweb-edu:sample-10BT``)."""
    dataset, _, config = spec.partition(":")
    return dataset, config or None


def _kind(p: Path) -> Optional[str]:
    name = p.name.lower()
    for ext in COMPRESSED:
        if name.endswith(ext) and name[:-len(ext)].endswith(TEXT_EXT):
            return "text"
    if name.endswith(TEXT_EXT):
        return "text"
    if name.endswith(JSON_EXT):
        return "json"
    if name.endswith(PARQUET_EXT):
        return "parquet"
    return None


def expand(spec: str) -> Tuple[str, List[Path]]:
    """A source spec -> (kind, files). kind: text | json | parquet | hub."""
    path = Path(os.path.expanduser(resolve(spec)))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in files if _kind(p)]
        if not files:
            raise DataError(f"data folder {spec!r} holds no .txt, .jsonl/.json or .parquet files")
        kinds = {_kind(p) for p in files}
        if len(kinds) > 1:
            raise DataError(f"data folder {spec!r} mixes file types {sorted(kinds)}: "
                            f"give one type per folder")
        return kinds.pop(), files
    if path.is_file():
        return _kind(path) or "text", [path]
    name = Path(hub_dataset(spec)[0])  # a configuration may have dots (wikipedia:20231101.en)
    looks_local = (spec.startswith((".", "/", "~", "dsq:")) or bool(name.suffix)
                   or str(name).count("/") > 1)
    if looks_local:
        raise DataError(f"data path {spec!r} does not exist: give an existing file or folder "
                        f"(data.train / data.val)")
    return "hub", []


def total_bytes(specs: List[str]) -> Optional[int]:
    """Bytes of the sources' files; None when one is a Hub dataset (size unknown)."""
    total = 0
    for spec in specs:
        kind, files = expand(spec)
        if kind == "hub":
            return None
        total += sum(f.stat().st_size for f in files)
    return total


# --------------------------------------------------------------------------- reading
def _read_text(f: Path) -> str:
    if f.stat().st_size == 0:
        raise DataError(f"data file {str(f)!r} is empty: remove it or give another file")
    opener = COMPRESSED.get(f.suffix.lower())
    try:
        if opener:
            with opener(f, "rt", encoding="utf-8") as fh:
                return fh.read()
        with open(f, encoding="utf-8") as fh:  # universal newlines, as datasets' text loader
            return fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(f)!r} is not UTF-8 text (byte {e.start}): "
                        f"convert it to UTF-8") from e
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"data file {str(f)!r} could not be read: {type(e).__name__}: {e}") from e


def open_stream(spec: str, kind: str, files: List[Path], split: str):
    """A ``datasets`` streaming dataset of a JSON lines / Parquet / Hub source."""
    import datasets

    datasets.disable_progress_bars()
    if kind == "hub":
        dataset, config = hub_dataset(spec)
        named = {"name": config} if config else {}
        return datasets.load_dataset(dataset, split=split, streaming=True, **named)
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train",
                                 streaming=True)


def _stream_texts(spec: str, kind: str, files: List[Path], split: str, text_field: str):
    try:
        stream = open_stream(spec, kind, files, split)
        for batch in stream.iter(batch_size=STREAM_BATCH):
            if text_field not in batch:
                raise DataError(f"data {spec!r} has no column {text_field!r} (columns: "
                                f"{sorted(batch)}): set data.text_field")
            yield batch[text_field]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; name the input
        what = ("is neither an existing file or folder nor a Hub dataset that could be loaded"
                if kind == "hub" else "could not be read")
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"data {spec!r} {what}: {type(e).__name__}: {first}") from e


def iter_documents(specs: List[str], text_field: str = "text", split: str = "train"
                   ) -> Iterator[str]:
    """Every non-blank document of the sources, in order (specs, files, rows)."""
    for spec in specs:
        kind, files = expand(spec)
        if kind == "text":
            for f in files:
                text = _read_text(f)
                if text.strip():
                    yield text
            continue
        from dsq.data import jsonl  # (it imports this module)

        if jsonl.fast(kind, files):  # the same documents; a bad record names file and line
            yield from _jsonl_documents(spec, files, text_field, jsonl)
            continue
        for texts in _stream_texts(spec, kind, files, split, text_field):
            for text in texts:
                if isinstance(text, str) and text.strip():
                    yield text


def _jsonl_documents(spec: str, files: List[Path], text_field: str, jsonl) -> Iterator[str]:
    """The documents of local JSON lines files, parsed by :func:`dsq.data.jsonl.parse` (its
    contract: those the ``datasets`` loader yields, or a :class:`DataError` naming the file
    and line of a bad record, a record without text included)."""
    for _, path, begin, end in jsonl.ranges(files, STREAM_RANGE_BYTES):
        with open(path, "rb") as fh:
            fh.seek(begin)
            data = fh.read(end - begin)
        yield from jsonl.parse(data, text_field, str(path), begin)[0]


def load_documents(specs: List[str], text_field: str = "text", split: str = "train"
                   ) -> Dict[str, List[str]]:
    """All documents in memory, ``{"text": [...]}`` (for small inputs: ``dsq eval``)."""
    docs = list(iter_documents(specs, text_field, split))
    if not docs:
        raise DataError(f"data {specs} holds no text: every document is empty")
    return {"text": docs}


# --------------------------------------------------------------------------- sampling
WINDOW_BYTES = 1 << 20


def sample_texts(specs: List[str], text_field: str, max_bytes: int, seed: int
                 ) -> Optional[List[str]]:
    """About ``max_bytes`` of seeded sample text, or None when the sources are not larger
    than ``max_bytes`` (then the caller trains on every document, as before sampling)."""
    size = total_bytes(specs)
    if size is not None and size <= max_bytes:
        return None
    rng = random.Random(seed)
    budget = max(1, max_bytes // len(specs))
    out: List[str] = []
    for spec in specs:
        kind, files = expand(spec)
        if kind == "text":
            got = _sample_text_files(files, budget, rng)
        elif kind == "json" and all(f.suffix.lower() == ".jsonl" for f in files):
            got = _sample_jsonl(files, text_field, budget, rng)
        elif kind == "parquet":
            got = _sample_parquet(files, text_field, budget, rng)
        else:
            got = _sample_stream(spec, kind, files, text_field, budget, seed)
        out.extend(t for t in got if isinstance(t, str) and t.strip())
    return out


def _take(texts, budget: int) -> List[str]:
    out, n = [], 0
    for t in texts:
        if n >= budget:
            break
        if isinstance(t, str):
            out.append(t[:budget - n])
            n += len(out[-1])
    return out


def _sample_text_files(files: List[Path], budget: int, rng: random.Random) -> List[str]:
    order = list(files)
    rng.shuffle(order)
    return _take((_read_text(f) for f in order), budget)


def _sample_jsonl(files: List[Path], field: str, budget: int, rng: random.Random) -> List[str]:
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    n_windows = max(1, min(total // WINDOW_BYTES, -(-budget // WINDOW_BYTES)))
    starts = sorted(rng.sample(range(max(1, total // WINDOW_BYTES)), n_windows))
    out: List[str] = []
    for w in starts:
        pos = w * WINDOW_BYTES
        i = 0
        while pos >= sizes[i]:
            pos -= sizes[i]
            i += 1
        with open(files[i], "rb") as fh:
            fh.seek(pos)
            if pos:
                fh.readline()  # to the start of the next line
            end = pos + WINDOW_BYTES
            while fh.tell() < end:
                line = fh.readline()
                if not line:
                    break
                try:
                    text = json.loads(line).get(field)
                except (ValueError, AttributeError):
                    continue
                if isinstance(text, str):
                    out.append(text)
    return _take(out, budget)


def _sample_parquet(files: List[Path], field: str, budget: int, rng: random.Random) -> List[str]:
    import pyarrow.parquet as pq

    groups = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    rng.shuffle(groups)
    out, n = [], 0
    for f, g in groups:
        if n >= budget:
            break
        texts = pq.ParquetFile(f).read_row_group(g, columns=[field]).column(0).to_pylist()
        out.extend(texts)
        n += sum(len(t) for t in texts if isinstance(t, str))
    return _take(out, budget)


def _sample_stream(spec, kind, files, field: str, budget: int, seed: int) -> List[str]:
    def texts():
        stream = open_stream(spec, kind, files, "train").shuffle(seed=seed, buffer_size=10_000)
        for batch in stream.iter(batch_size=STREAM_BATCH):
            yield from batch.get(field, [])
    return _take(texts(), budget)
