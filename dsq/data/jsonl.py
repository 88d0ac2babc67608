"""The fast path for local JSON lines files: the tokenizer workers read and parse them.

A source whose files are all ``.jsonl`` (plain, not compressed) and begin with a JSON object is
cut by the main process into byte ranges that end on line boundaries (:func:`ranges`: a seek
and a short read per range, nothing parsed); each worker reads its range, parses the lines,
takes ``data.text_field`` and tokenizes (:func:`encode_range`). So parsing runs on every worker
instead of in one reader process that competes with them for the cores.

Contract: the documents, their order and so the token bytes are those the ``datasets`` JSON
loader (:func:`dsq.data.sources.iter_documents`) yields for the same files: lines holding only
JSON whitespace are skipped, one line may hold several objects, a leading UTF-8 byte-order mark
is ignored, a blank text (``""`` or whitespace) is not a document. Where that loader would
fail, guess, skip a record silently or accept more than JSON lines, this path stops with a
:class:`DataError` naming the file and line: a line that is not JSON (an object spread over
several lines included), a value that is not an object, a record without ``data.text_field``
or with null there (the loader reads both as null and drops the record; the message lists
the record's keys, for the case of a corpus that keeps its text under another field), a text
that is neither a string nor null (``datasets`` drops or converts those), bytes that are not
UTF-8, an unpaired surrogate escape. Every other source (``.json``, Parquet, Hub datasets, a
``.jsonl`` file that holds one JSON array) keeps the ``datasets`` path. :data:`ENABLED`
switches this path off (tests compare the two on files without such records).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from dsq.data import encode
from dsq.data.sources import DataError

ENABLED = True
_WHITESPACE = " \t\r"  # JSON whitespace within a line
_DECODER = json.JSONDecoder()
_PEEK = 1 << 14


def fast(kind: str, files: Sequence[Path]) -> bool:
    """Whether a source (:func:`dsq.data.sources.expand`) takes this path."""
    return ENABLED and kind == "json" and bool(files) and all(
        f.name.lower().endswith(".jsonl") and _starts_with_object(f) for f in files)


def _starts_with_object(f: Path) -> bool:
    """The first JSON value of ``f`` is an object (or ``f`` is blank): not a JSON array, which
    the ``datasets`` loader reads as a whole file."""
    with open(f, "rb") as fh:
        head = fh.read(_PEEK)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    head = head.lstrip(b" \t\r\n")
    return not head or head.startswith(b"{")


def ranges(files: Sequence[Path], chunk_bytes: int, start_file: int = 0, start_offset: int = 0
           ) -> Iterator[Tuple[int, Path, int, int]]:
    """``(file index, path, begin, end)``: byte ranges of about ``chunk_bytes`` that end after a
    newline (or at the end of the file), from ``start_offset`` of ``files[start_file]`` on."""
    for fi in range(start_file, len(files)):
        path = files[fi]
        size = path.stat().st_size
        begin = start_offset if fi == start_file else 0
        with open(path, "rb") as fh:
            while begin < size:
                end = begin + max(1, chunk_bytes)
                if end < size:
                    end = _line_end(fh, end - 1, size)
                yield fi, path, begin, min(end, size)
                begin = end


def _line_end(fh, pos: int, size: int) -> int:
    """The offset after the first newline at or after ``pos`` (``size`` when there is none)."""
    fh.seek(pos)
    while True:
        block = fh.read(_PEEK)
        if not block:
            return size
        k = block.find(b"\n")
        if k >= 0:
            return pos + k + 1
        pos += len(block)


def encode_range(path: str, begin: int, end: int, field: str, dtype: str, sp=None
                 ) -> encode.Encoded:
    """A worker's job: the documents of bytes ``begin:end`` of ``path`` (whole lines),
    tokenized."""
    with open(path, "rb") as fh:
        fh.seek(begin)
        data = fh.read(end - begin)
    texts, lines = parse(data, field, path, begin)
    try:
        out = encode.encode_texts(texts, dtype, sp)
    except TypeError:  # sentencepiece refuses a str that is not valid Unicode
        for text, line in zip(texts, lines):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad(path, begin, line, "holds an unpaired surrogate escape (\\ud800 to "
                           "\\udfff without its pair), which is not Unicode text", "fix or "
                           "remove that record") from None
        raise
    return out._replace(nbytes=end - begin)


def parse(data: bytes, field: str, path: str = "?", begin: int = 0
          ) -> Tuple[List[str], List[int]]:
    """The documents of whole JSON lines ``data`` (bytes ``begin:`` of ``path``, for messages):
    ``(texts, the line of each text within data)``."""
    if begin == 0 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, begin, data.count(b"\n", 0, e.start), f"is not UTF-8 (byte "
                   f"0x{data[e.start]:02x})", "convert the file to UTF-8") from None
    texts: List[str] = []
    lines: List[int] = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip(_WHITESPACE):
            continue
        for obj in _values(line, path, begin, i):
            if not isinstance(obj, dict):
                raise _bad(path, begin, i, f"is {_what(obj)}, not a JSON object",
                           "give one JSON object per line")
            value = obj.get(field)
            if value is None:
                raise _no_text(path, begin, i, field, obj)
            if not isinstance(value, str):
                raise _bad(path, begin, i, f"has {_what(value)} in data.text_field={field!r}, "
                           f"not a string", "fix or remove that record, or set "
                           "data.text_field to the field that holds the text")
            if value.strip():
                texts.append(value)
                lines.append(i)
    return texts, lines


def _no_text(path: str, begin: int, i: int, field: str, obj: dict) -> DataError:
    """A record without ``field``, or with null there (its keys named: the text may be under
    another one)."""
    keys = sorted(obj)
    if field in obj:
        return _bad(path, begin, i, f"has null in data.text_field={field!r} (the record's keys: "
                    f"{keys})", "remove that record or give it a text (an empty string \"\" "
                    "is skipped), or set data.text_field to the field that holds the text")
    return _bad(path, begin, i, f"has no data.text_field={field!r} (the record's keys: {keys})",
                "set data.text_field to the field that holds the text, or remove that record")


def _values(line: str, path: str, begin: int, i: int) -> List[object]:
    """The JSON values of one line: usually one; several when written one after another."""
    try:
        return [json.loads(line)]
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise _not_json(path, begin, i, e) from None
    out, pos = [], 0
    while True:
        while pos < len(line) and line[pos] in _WHITESPACE:
            pos += 1
        if pos == len(line):
            return out
        try:
            obj, pos = _DECODER.raw_decode(line, pos)
        except json.JSONDecodeError as e:
            raise _not_json(path, begin, i, e) from None
        out.append(obj)


def _not_json(path: str, begin: int, i: int, e: json.JSONDecodeError) -> DataError:
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "Unterminated string starting at"
    return _bad(path, begin, i, f"is not JSON ({msg} at column {e.colno})", "each line must be "
                "one JSON object, whole on its line: fix or remove that line (a file that holds "
                "one JSON document or array: name it .json)")


def _what(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _bad(path: str, begin: int, line: int, what: str, fix: str) -> DataError:
    """The error for line ``line`` (0-based) of the range starting at byte ``begin``."""
    return DataError(f"data file {str(path)!r} line {_line_no(path, begin) + line + 1:,} "
                     f"{what}: {fix}")


def _line_no(path: str, begin: int) -> int:
    """Newlines before byte ``begin`` of ``path``: the 0-based line a range starts on."""
    n = 0
    with open(path, "rb") as fh:
        while begin > 0:
            block = fh.read(min(begin, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            begin -= len(block)
    return n
