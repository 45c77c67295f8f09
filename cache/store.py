"""The capture cache: diskcache for the index, .npy files for arrays, JSON for metadata.

Layout of one capture with key K (DESIGN.md, "Cache"):

    K/<name>   one entry per array (e.g. "K/L007" = layer 7's maps), a .npy file read as a memory map;
               the files of one capture share a folder of the cache directory (`ArrayDisk.array_filename`);
               a small array written with `put_array(..., inline=True)` keeps its .npy bytes in its index
               row instead (no file: a file costs more to create than such an array to write), read back
               as a read-only array
    K/meta     a JSON record, written LAST: a capture without it is incomplete and invisible

Every entry of K carries the tag K, so a capture is evicted whole (`evict(K)`), never in parts.

Safety: keys are plain strings and values are ndarrays or JSON-able dicts; the `ArrayDisk` below
refuses to pickle or unpickle anything, and arrays are read with `allow_pickle=False`, so nothing
in a shared cache directory can run code when it is read.

Integrity: each array's CRC-32 is stored in its index row and checked the first time this process
opens that file (about 10 ms per 40 MB); a truncated or corrupt file, a missing file or unreadable
metadata raises `CorruptEntry`, and the caller evicts the capture and recomputes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import diskcache
import numpy as np

from core.errors import CacheError, CorruptEntry

MODE_NPY = 5  # our own diskcache mode: an .npy file, db value = CRC-32 of its bytes
MODE_NPY_INLINE = 6  # our own diskcache mode: a small array, db value = its .npy bytes (no file)
DEFAULT_DIR = "cache_data"
DEFAULT_GB = 20.0
META = "meta"
_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,79}")  # a key part usable as a file name as it is


class _InlineNpy(bytes):
    """The .npy bytes of a small array that goes in its index row (`Store.put_array(..., inline=True)`)."""


class ArrayDisk(diskcache.Disk):
    """A diskcache `Disk` that stores ndarrays as .npy files and returns read-only memory maps."""

    _verified: set[str] = set()  # files whose CRC this process has checked (filenames are unique)
    _verified_lock = threading.Lock()

    # keys: strings only, stored raw (never pickled)
    def put(self, key):
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, not {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise CorruptEntry("cache index holds a pickled key; refusing to unpickle it")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if isinstance(value, _InlineNpy):
            return 0, MODE_NPY_INLINE, None, sqlite3.Binary(value)
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError("object arrays cannot be cached")
            filename = self.array_filename(key)
            full_path = os.path.join(self._directory, filename)
            array = np.ascontiguousarray(value)
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
            parts = (header.getbuffer(), array.reshape(-1).view(np.uint8).data)  # .npy = header + raw data
            try:
                fh = open(full_path, "xb")
            except FileNotFoundError:  # the capture's first file: its folder does not exist yet
                os.makedirs(os.path.dirname(full_path), exist_ok=True)
                fh = open(full_path, "xb")
            crc = 0
            with fh:
                for part in parts:  # checksummed as written, not read back
                    fh.write(part)
                    crc = zlib.crc32(part, crc)
            return sum(len(p) for p in parts), MODE_NPY, filename, crc
        if isinstance(value, (str, bytes, int, float)):
            return super().store(value, read, key)
        raise TypeError(f"the capture cache stores arrays, str, bytes and numbers, not {type(value).__name__}")

    def array_filename(self, key) -> str:
        """A new file name for an array entry: one folder per capture ("K/L007" -> "K/L007-<random>.npy"),
        so a capture costs one mkdir, not diskcache's two random sub-folders per file.  Keys that are
        not plain names (other clients) get a hashed folder."""
        folder, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
        if not (_PLAIN.fullmatch(folder) and _PLAIN.fullmatch(name)):
            folder, name = "x" + hashlib.sha1(repr(key).encode()).hexdigest()[:20], "entry"
        return os.path.join(folder, f"{name}-{os.urandom(6).hex()}.npy")

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise CorruptEntry("cache entry is a pickle; refusing to unpickle it")
        if mode == MODE_NPY_INLINE:
            try:
                array = _np_load(lambda: np.load(io.BytesIO(value), allow_pickle=False))
            except (TypeError, ValueError, EOFError) as exc:
                raise CorruptEntry(f"unreadable inline array: {exc}") from exc
            array.flags.writeable = False  # as the memory maps of file entries
            return array
        if mode != MODE_NPY:
            try:
                return super().fetch(mode, filename, value, read)
            except (OSError, UnicodeDecodeError) as exc:
                raise CorruptEntry(f"unreadable cache file {filename}: {exc}") from exc
        path = os.path.join(self._directory, filename)
        try:
            if filename not in self._verified:
                with open(path, "rb") as fh:
                    if zlib.crc32(fh.read()) != value:
                        raise CorruptEntry(f"checksum mismatch in {filename}")
                with self._verified_lock:
                    self._verified.add(filename)
            return _np_load(lambda: np.load(path, mmap_mode="r", allow_pickle=False))
        except CorruptEntry:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise CorruptEntry(f"unreadable array file {filename}: {exc}") from exc


AST_RACE = "AST constructor recursion depth mismatch"


def _np_load(load, tries: int = 3):
    """`load()` (an np.load), tried again when it fails with CPython 3.11's spurious SystemError "AST constructor
    recursion depth mismatch": numpy parses an .npy header with ast.literal_eval, and the interpreter's AST state is
    shared by threads (python/cpython#106905, fixed in later 3.11 releases), so another thread parsing at the same
    moment (Streamlit compiling a page) can make one parse fail; parsed again, the header reads as it is."""
    for attempt in range(tries):
        try:
            return load()
        except SystemError as exc:
            if AST_RACE not in str(exc) or attempt == tries - 1:
                raise


def cache_dir() -> Path:
    return Path(os.environ.get("HEADSCOPE_CACHE_DIR", DEFAULT_DIR)).resolve()


def size_limit_bytes() -> int:
    gb = float(os.environ.get("HEADSCOPE_CACHE_GB", DEFAULT_GB))
    return int(gb * 2**30)


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file at `path` (flock: it excludes other threads and processes alike, as each
    opens the file anew, and it is released if the holder dies)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Store:
    """The cache of captures and probe results, addressed by capture key."""

    def __init__(self, directory: str | os.PathLike | None = None, size_limit: int | None = None):
        self.directory = Path(directory).resolve() if directory else cache_dir()
        self.size_limit = size_limit if size_limit is not None else size_limit_bytes()
        self.temporary = False  # True for the stand-in store used when the configured one is unusable
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # a probe file of this Store's own (mkstemp: a unique name), so that threads opening the same
            # directory at once never delete each other's probe and misread that as "not writable"
            handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.directory)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise CacheError(f"The cache directory {self.directory} is not writable ({exc.strerror}); "
                             "set HEADSCOPE_CACHE_DIR to a writable folder.") from exc
        # eviction_policy none: diskcache would cull single entries; `_enforce_limit` evicts whole captures.
        # Opening writes the index's schema and settings: one opener at a time (threads and processes), or
        # SQLite can answer "database is locked" at once instead of waiting its timeout
        with _flocked(self.directory / ".open.lock"):
            self._cache = diskcache.Cache(
                str(self.directory / "index"),
                disk=ArrayDisk,
                eviction_policy="none",
                size_limit=self.size_limit,
                tag_index=True,
                timeout=60,
            )

    # ---- arrays and metadata ------------------------------------------------------------------
    def put_array(self, key: str, name: str, array: np.ndarray, inline: bool = False) -> None:
        """Store one array of capture `key`; with `inline`, an array under diskcache's min_file_size (32 KB)
        goes in its index row, not in a file of its own (larger ones still get a file)."""
        if inline and array.nbytes < self._cache.disk_min_file_size and not array.dtype.hasobject:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            self._cache.set(f"{key}/{name}", _InlineNpy(buffer.getvalue()), tag=key)
            return
        self._cache.set(f"{key}/{name}", array, tag=key)

    def transaction(self):
        """A context in which many writes share one index transaction (diskcache `transact`)."""
        return self._cache.transact()

    def get_array(self, key: str, name: str) -> np.ndarray:
        """A read-only memory map of one stored array; raises CorruptEntry if missing or bad."""
        value = self._cache.get(f"{key}/{name}", default=None)
        if value is None:
            raise CorruptEntry(f"capture {key} has no array {name!r}")
        return value

    def put_meta(self, key: str, meta: dict) -> None:
        """Write the metadata record; call it last: it is what makes a capture visible."""
        record = dict(meta, stored_at=time.time())
        self._cache.set(f"{key}/{META}", json.dumps(record, separators=(",", ":")), tag=key)
        self._enforce_limit(keep=key)

    def get_meta(self, key: str) -> dict | None:
        """The metadata of a complete capture, None if absent; raises CorruptEntry if unreadable."""
        raw = self._cache.get(f"{key}/{META}", default=None)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise CorruptEntry(f"metadata of {key} is not valid JSON") from exc
        if not isinstance(meta, dict):
            raise CorruptEntry(f"metadata of {key} is not a record")
        return meta

    def evict(self, key: str) -> int:
        """Remove every entry of one capture; returns how many entries went."""
        return self._cache.evict(key)

    def keys(self) -> list[str]:
        """Keys of complete captures (those with a metadata record), oldest first."""
        # straight from the index, in insertion order, and only keys stored as plain text: a row some
        # other client wrote with a pickled key is skipped, never unpickled (and never breaks `ls`)
        rows = self._cache._sql("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid").fetchall()
        suffix = "/" + META
        return [k[: -len(suffix)] for (k,) in rows if isinstance(k, str) and k.endswith(suffix)]

    def volume(self) -> int:
        return self._cache.volume()

    def _enforce_limit(self, keep: str) -> None:
        """Evict whole captures, oldest stored first, until the cache fits its size limit."""
        if self._cache.volume() <= self.size_limit:
            return
        metas = []
        for k in self.keys():
            if k == keep:
                continue
            try:
                metas.append(((self.get_meta(k) or {}).get("stored_at", 0.0), k))
            except CorruptEntry:
                metas.append((0.0, k))
        for _, k in sorted(metas):
            if self._cache.volume() <= self.size_limit:
                break
            self.evict(k)

    # ---- cross-process single flight ----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive per-key lock across processes (flock: released if the holder dies)."""
        lock_dir = self.directory / "locks"
        lock_dir.mkdir(exist_ok=True)
        with _flocked(lock_dir / f"{key}.lock"):
            yield

    def close(self) -> None:
        self._cache.close()
