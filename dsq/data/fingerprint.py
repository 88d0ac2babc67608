"""What identifies prepared data, and checks that cost next to nothing at every start.

The fingerprint (the prepared folder's name) hashes the sources' contents (SHA-256 of every
file), the vocabulary size and the tokenizer. Hashing 40 GB at every ``dsq train`` start would
take minutes, so a source's hash is computed once and remembered in
``<data.cache_dir>/source-hashes.json`` with its size and modification time: later starts
``stat`` the files and reuse the hash when both match. A file whose size or modification time
changed is hashed again (a new fingerprint: the data is prepared again).
``dsq prepare --verify`` re-hashes every source in full (and the prepared token files), which
also catches an edit that kept the size and the modification time.

The token files are checked at every start by size and by a hash of 64 sampled windows
(:func:`sampled_sha256`, a few MiB read whatever the size).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dsq.data import tokenizer
from dsq.data.sources import expand

FORMAT_VERSION = 2  # 2: lossless tokenizer (dsq.data.tokenizer)
INDEX_NAME = "source-hashes.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class SourceHashes:
    """SHA-256 of source files, remembered by (path, size, mtime_ns) in the cache folder."""

    def __init__(self, cache_dir, full: bool = False):
        self.path = Path(cache_dir) / INDEX_NAME
        self.full = full  # re-hash everything (dsq prepare --verify)
        self.known: Dict[str, Dict] = {}
        self.hashed: Dict[str, str] = {}  # files hashed by this process
        self.changed: List[str] = []  # ... whose content changed under the same size and mtime
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            pass

    @staticmethod
    def _stat(f: Path) -> Dict:
        st = f.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def lookup(self, f: Path) -> Optional[str]:
        """The remembered hash of ``f`` when its size and mtime are unchanged, else None."""
        rec = self.known.get(str(f.resolve()))
        if rec and not self.full and {k: rec.get(k) for k in ("size", "mtime_ns")} == self._stat(f):
            return rec["sha256"]
        return None

    def sha256(self, f: Path) -> str:
        key = str(f.resolve())
        got = self.hashed.get(key) or self.lookup(f)
        if got is None:
            got = self.hashed[key] = file_sha256(f)
            old, stat = self.known.get(key), self._stat(f)
            if old and old.get("sha256") != got and old.get("size") == stat["size"] and \
                    old.get("mtime_ns") == stat["mtime_ns"]:
                self.changed.append(key)
            self.known[key] = dict(stat, sha256=got)
        return got

    def save(self) -> None:
        """Remember the hashes (after a successful preparation: nothing half-written before)."""
        if not self.hashed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{INDEX_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def sources_record(specs: List[str], hashes: SourceHashes) -> List[Dict]:
    out = []
    for spec in specs:
        kind, files = expand(spec)
        if kind == "hub":
            out.append({"hub": spec})
            continue
        for f in files:
            out.append({"path": str(f.resolve()), "sha256": hashes.sha256(f)})
    return out


def data_fingerprint(data_cfg, vocab_size: int, hashes: Optional[SourceHashes] = None) -> str:
    hashes = hashes or SourceHashes(data_cfg.cache_dir)
    tok = data_cfg.tokenizer
    key = {
        "version": FORMAT_VERSION,
        "train": sources_record(list(data_cfg.train), hashes),
        "val": sources_record(list(data_cfg.val), hashes),
        "text_field": data_cfg.text_field,
        "vocab_size": vocab_size,
        "tokenizer": sources_record([tok], hashes) if tok else None,
        "tokenizer_settings": None if tok else tokenizer.SETTINGS,
    }
    if getattr(data_cfg, "val_fraction", 0.0):
        key["val_fraction"] = data_cfg.val_fraction
        key["hold_out"] = "hash-v1"  # streaming hold-out (dsq.data.prepare.held_out)
    if not tok and getattr(data_cfg, "tokenizer_sample_bytes", 0):
        sources = [s for s in sources_record(list(data_cfg.train), hashes) if "path" in s]
        size = sum(Path(s["path"]).stat().st_size for s in sources)
        if len(sources) < len(data_cfg.train) or size > data_cfg.tokenizer_sample_bytes:
            key["tokenizer_sample_bytes"] = data_cfg.tokenizer_sample_bytes  # a sampled tokenizer
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- token files
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
    return {"bytes": path.stat().st_size, "sha256_sampled": sampled_sha256(path),
            "sha256": file_sha256(path)}


def load_manifest(path: Path) -> Dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def verify(path: Path, full: bool = False) -> Optional[str]:
    """None when the prepared directory's token files match its manifest (sizes, token counts
    and sampled hashes; with ``full``, the SHA-256 of every byte), else what does not."""
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
        rec = manifest.get("splits", {}).get(split) or {}
        if rec.get("sha256_sampled") and sampled_sha256(f) != rec["sha256_sampled"]:
            return f"{f.name}'s content differs from what was prepared"
        if full and rec.get("sha256") and file_sha256(f) != rec["sha256"]:
            return f"{f.name}'s content differs from what was prepared (full SHA-256)"
    return None
