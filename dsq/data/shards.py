"""Writing token streams incrementally, in shards that survive a kill.

A preparation in progress lives in ``<data.cache_dir>/.<fingerprint>.partial/`` (a hidden
name, and no ``manifest.json``: it never looks complete)::

    tokenizer.model     the tokenizer, written before any token
    train.bin, val.bin  token ids appended in source order
    progress.json       the last complete shard: bytes, tokens and documents of each file,
                        documents read from each pass over the sources (and, for JSON lines
                        read by the workers, the file and byte where the pass goes on)
    lock                held (flock) by the process preparing; a second process waits for it

Every ``SHARD_BYTES`` of tokens the files are flushed to disk and ``progress.json`` is
replaced atomically: a shard is complete. A preparation killed at any point (``kill -9``,
out of memory, a node failure) is resumed by the same command from its last complete shard:
the files are cut back to what ``progress.json`` records and the pass skips the documents
already written. When every pass is done the folder gets its manifest and is renamed to
``<fingerprint>/``.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np


SHARD_BYTES = 64 << 20  # tokens written between two complete shards


class Partial:
    """The ``.partial`` folder of a preparation: lock, tokenizer, resumable state."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out.with_name(f".{out.name}.partial")
        self.progress = self.dir / "progress.json"
        self._lock = None

    def lock(self, log=print) -> None:
        """Take the preparation's lock. While another process holds it, wait for that process
        (saying so once), as a second job sharing ``data.cache_dir`` must: it then finds the
        folder prepared, or resumes a preparation that was killed, or prepares anew when the
        other one stopped on bad input (and removed its folder)."""
        said = False
        while True:
            self.dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.dir / "lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if not said:
                    log(f"data: another process is preparing {self.out} (it holds "
                        f"{self.dir / 'lock'}): waiting for it")
                    said = True
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                except BaseException:
                    fh.close()
                    raise
            if self._same_file(fh):
                self._lock = fh
                return
            fh.close()  # the holder finished (its folder renamed) or removed it: look again

    def _same_file(self, fh) -> bool:
        """Whether the lock held is still the one at the lock's path."""
        try:
            return os.fstat(fh.fileno()).st_ino == os.stat(self.dir / "lock").st_ino
        except FileNotFoundError:
            return False

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def tokenizer(self) -> Optional[bytes]:
        """The tokenizer of a preparation to resume (None: start from zero)."""
        f = self.dir / "tokenizer.model"
        return f.read_bytes() if f.is_file() and self.progress.is_file() else None

    def start(self, model_bytes: bytes) -> Dict:
        """The state to continue from: the recorded one when it was made with this tokenizer,
        else a fresh one (old token files removed)."""
        sha = hashlib.sha256(model_bytes).hexdigest()
        try:
            state = json.loads(self.progress.read_text())
            files_ok = all((self.dir / f"{name}.bin").is_file() and
                           (self.dir / f"{name}.bin").stat().st_size >= rec["bytes"]
                           for name, rec in state["outputs"].items())
            if state.get("tokenizer_sha256") == sha and files_ok:
                return state
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for f in self.dir.glob("*.bin"):
            f.unlink()
        (self.dir / "tokenizer.model").write_bytes(model_bytes)
        state = {"tokenizer_sha256": sha, "outputs": {}, "passes": {}}
        self.save(state)
        return state

    def save(self, state: Dict) -> None:
        tmp = self.progress.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.progress)

    def finish(self, manifest: Dict) -> Path:
        """Write the manifest and rename the folder into place, the lock still held: a process
        waiting for it wakes to find the folder prepared."""
        (self.dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        self.progress.unlink(missing_ok=True)
        try:
            os.replace(self.dir, self.out)
        except OSError:  # another process finished first
            if not (self.out / "manifest.json").is_file():
                raise
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.out / "lock").unlink(missing_ok=True)
        self.unlock()
        return self.out

    def remove(self) -> None:
        """Delete the folder, then release the lock (a waiting process finds no folder and
        starts its own)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.unlock()


class StreamWriter:
    """Appends token arrays to ``<name>.bin`` files; :meth:`commit` completes a shard."""

    def __init__(self, partial: Partial, state: Dict, names, itemsize: int):
        self.partial, self.state, self.itemsize = partial, state, itemsize
        self.files = {}
        self.live = copy.deepcopy(state["outputs"])
        for name in names:
            rec = self.live.setdefault(name, {"bytes": 0, "tokens": 0, "documents": 0})
            path = partial.dir / f"{name}.bin"
            fh = open(path, "r+b" if path.exists() else "w+b")
            fh.truncate(rec["bytes"])  # drop what the last complete shard does not cover
            fh.seek(rec["bytes"])
            self.files[name] = fh
        self.pending = 0

    def write(self, name: str, ids: np.ndarray, documents: int) -> None:
        self.files[name].write(ids.tobytes())
        rec = self.live[name]
        rec["bytes"] += ids.nbytes
        rec["tokens"] += int(ids.size)
        rec["documents"] += documents
        self.pending += ids.nbytes

    def due(self) -> bool:
        return self.pending >= SHARD_BYTES

    def commit(self, pass_name: str, docs_read: int, done: bool = False,
               cursor: Optional[Dict] = None) -> int:
        """Flush to disk and record a complete shard (``cursor``: where in the sources the
        pass goes on, when known); returns the shard number."""
        for fh in self.files.values():
            fh.flush()
            os.fsync(fh.fileno())
        p = self.state["passes"].setdefault(pass_name, {"documents_read": 0, "shards": 0,
                                                        "done": False})
        p.update(documents_read=docs_read, shards=p["shards"] + 1, done=done, cursor=cursor)
        self.state["outputs"] = copy.deepcopy(self.live)
        self.partial.save(self.state)
        self.pending = 0
        return p["shards"]

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
