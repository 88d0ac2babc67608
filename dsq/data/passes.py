"""One pass over a split's sources (``data.train`` or ``data.val``) into the token files:
jobs for the tokenizer workers in source order, the validation hold-out, shards, resume.

Jobs: a source of JSON lines files that takes the fast path (:mod:`dsq.data.jsonl`) becomes
byte ranges the workers read and parse themselves; every other source is read in this process
(:func:`dsq.data.sources.iter_documents`) and sent in batches of about ``batch_bytes``. Results
come back in submission order. A document's position is its index among the pass's documents
(blank ones not counted); when the pass feeds both train and val, the position decides the
hold-out (:func:`held_out`) here, as results arrive, so it does not depend on how the
documents were cut into jobs, nor on the number of workers.

Resume: every complete shard records the documents read so far and, when the last job was a
byte range, where the next one starts (``cursor``: source, file, byte offset on a line
boundary). A resumed pass starts at the cursor without reading what came before. Without a
cursor (a shard that ended in a source read here, or a preparation by an older dsq) it reads
the pass's sources from the start through the ``datasets`` path and skips the documents
already written, which gives the same documents at the same positions.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import numpy as np

from dsq.data import encode, jsonl, sources
from dsq.data.progress import PrepareProgress
from dsq.data.shards import StreamWriter
from dsq.data.sources import DataError

HOLD_OUT_SEED = 1234
"""Seed of the ``data.val_fraction`` hold-out (part of the data, not of the run: fixed)."""


def held_out(start: int, n: int, fraction: float) -> np.ndarray:
    """Whether documents ``start .. start+n-1`` (source order) are held out for validation: a
    seeded hash of the index below ``fraction``, so the split needs no document count and the
    same documents are held out on every machine, whatever the batching."""
    with np.errstate(over="ignore"):
        z = (np.arange(start, start + n, dtype=np.uint64) + np.uint64(HOLD_OUT_SEED)) \
            * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def run_pass(name: str, specs: List[str], split: str, outputs: List[str], data_cfg,
             writer: StreamWriter, enc: encode.Encoder, log, dtype: str, batch_bytes: int,
             batch_docs: int) -> None:
    """Tokenize the documents of ``specs`` into ``outputs`` (``["train"]``, ``["val"]``, or
    ``["train", "val"]`` with the hold-out), resuming from the writer's recorded state."""
    done = writer.state["passes"].get(name, {})
    if done.get("done"):
        log(f"data: the {name} sources were tokenized already (resuming)")
        return
    skip = done.get("documents_read", 0)
    if skip:
        written = ", ".join(f"{o} {writer.live[o]['tokens']:,} tokens" for o in outputs)
        log(f"data: resuming the {name} sources from shard {done['shards']} (after document "
            f"{skip:,}; {written} already written)")
    frac = data_cfg.val_fraction if len(outputs) > 1 else 0.0
    tokens = sum(writer.live[o]["tokens"] for o in outputs)
    progress = PrepareProgress(name, sources.total_bytes(specs), log)
    progress.rebase(0, 0, tokens)
    cursor = done.get("cursor") if skip else None
    if cursor is not None and not _cursor_ok(specs, cursor):
        cursor = None
    start = {"bytes": _bytes_before(specs, cursor) if cursor else 0}
    if cursor:
        progress.rebase(skip, start["bytes"], tokens)

    def skipped(nbytes: int) -> None:
        start["bytes"] = nbytes
        progress.rebase(skip, nbytes, tokens)

    jobs = _jobs(specs, split, data_cfg.text_field, dtype, batch_bytes, batch_docs, cursor,
                 0 if cursor else skip, skipped)
    docs, nbytes = skip, 0
    for (si, where), res in enc.map(jobs):
        n = len(res.lengths)
        if frac:
            val = held_out(docs, n, frac)
            per_token = np.repeat(val, res.lengths)
            arrays = [res.ids[~per_token], res.ids[per_token]]
            counts = [n - int(val.sum()), int(val.sum())]
        else:
            arrays, counts = [res.ids], [n]
        for o, ids, count in zip(outputs, arrays, counts):
            writer.write(o, ids, count)
            tokens += int(ids.size)
        docs += n
        nbytes += res.nbytes
        if writer.due():
            writer.commit(name, docs, cursor=where)
        progress.update(docs, start["bytes"] + nbytes, tokens)
    progress.update(docs, start["bytes"] + nbytes, tokens, force=True)
    progress.close()
    writer.commit(name, docs, done=True)


def _jobs(specs: List[str], split: str, field: str, dtype: str, batch_bytes: int,
          batch_docs: int, cursor: Optional[Dict], skip: int, skipped: Callable[[int], None]
          ) -> Iterator[encode.Job]:
    """The pass's jobs in source order, tagged ``(source index, cursor after the job)``; from
    ``cursor`` on, or from the start skipping ``skip`` documents (``skipped(text bytes)`` is
    called once they are)."""
    first = cursor["spec"] if cursor else 0
    seen, seen_bytes = 0, 0
    for si, spec in enumerate(specs):
        if si < first:
            continue
        kind, files = sources.expand(spec)
        if seen >= skip and jsonl.fast(kind, files):
            fi, off = (cursor["file"], cursor["offset"]) if cursor and si == first else (0, 0)
            for fi, path, begin, end in jsonl.ranges(files, batch_bytes, fi, off):
                yield ((si, {"spec": si, "file": fi, "offset": end}), jsonl.encode_range,
                       (str(path), begin, end, field, dtype))
            continue
        batch: List[str] = []
        size = 0
        for text in sources.iter_documents([spec], field, split):
            if seen < skip:
                seen += 1
                seen_bytes += len(text)
                if seen == skip:
                    skipped(seen_bytes)
                continue
            batch.append(text)
            size += len(text)
            if size >= batch_bytes or len(batch) >= batch_docs:
                yield (si, None), encode.encode_texts, (batch, dtype)
                batch, size = [], 0
        if batch:
            yield (si, None), encode.encode_texts, (batch, dtype)


def _cursor_ok(specs: List[str], cursor: Dict) -> bool:
    """A recorded cursor still points into a source that takes the fast path."""
    try:
        kind, files = sources.expand(specs[cursor["spec"]])
        return jsonl.fast(kind, files) and 0 <= cursor["offset"] <= \
            files[cursor["file"]].stat().st_size
    except (IndexError, KeyError, TypeError, OSError, DataError):
        return False


def _bytes_before(specs: List[str], cursor: Dict) -> int:
    """Source bytes before the cursor (progress)."""
    before = [f for s in specs[:cursor["spec"]] for f in sources.expand(s)[1]]
    before += sources.expand(specs[cursor["spec"]])[1][:cursor["file"]]
    return sum(f.stat().st_size for f in before) + cursor["offset"]
