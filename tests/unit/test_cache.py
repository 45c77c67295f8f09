"""cache.store: arrays as read-only memory maps, JSON metadata written last, whole-capture eviction,
corruption detected on read, and nothing in a cache directory ever unpickled."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import diskcache
import numpy as np
import pytest

from cache.store import MODE_NPY, ArrayDisk, Store
from core.errors import CorruptEntry

KEY = "0123456789abcdef0123"


def npy_files(store: Store) -> list[Path]:
    return sorted(store.directory.rglob("*.npy"))


def index_keys(store: Store) -> list[str]:
    """Every key row in the index (complete or not), read with plain sqlite."""
    with sqlite3.connect(store.directory / "index" / "cache.db") as db:
        return sorted(k for (k,) in db.execute("SELECT key FROM Cache"))


def random_maps(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[:4] = [np.nan, np.inf, -0.0, np.finfo(dtype).tiny]  # bit patterns that a lossy path would change
    return a


# ---- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, uint", [(np.float16, np.uint16), (np.float32, np.uint32)])
def test_array_round_trip_is_bit_exact_read_only_memmap(store, dtype, uint):
    rng = np.random.default_rng(0)
    a = random_maps(rng, (3, 7, 11), dtype)
    store.put_array(KEY, "L000", a)
    got = store.get_array(KEY, "L000")
    assert isinstance(got, np.memmap)
    assert got.dtype == dtype and got.shape == a.shape
    assert np.array_equal(got.view(uint), a.view(uint))  # bit-exact, NaN and -0.0 included
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0, 0, 0] = 1
    # a second Store on the same directory (another process, say) reads the same bits
    other = Store(store.directory, size_limit=store.size_limit)
    try:
        assert np.array_equal(other.get_array(KEY, "L000").view(uint), a.view(uint))
    finally:
        other.close()


def test_non_contiguous_array_is_stored_as_its_values(store):
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)[:, ::2, ::-1]
    store.put_array(KEY, "L000", a)
    assert np.array_equal(store.get_array(KEY, "L000"), a)


def test_metadata_json_round_trip(store):
    record = {"spec": {"model": "smollm2", "prompt": "héllo ↵ \"quoted\"", "max_new_tokens": 3},
              "tokens": ["a", "␣", "↵"], "spans": {"prompt": [0, 3]}, "nested": [[1.5, -2], None, True]}
    store.put_meta(KEY, record)
    got = store.get_meta(KEY)
    assert isinstance(got.pop("stored_at"), float)
    assert got == record


def test_missing_metadata_is_none(store):
    assert store.get_meta(KEY) is None
    assert store.keys() == []


# ---- completeness and eviction -----------------------------------------------------------------

def test_capture_without_metadata_is_invisible(store):
    store.put_array(KEY, "L000", np.zeros((2, 3), np.float16))
    store.put_array(KEY, "L001", np.zeros((2, 3), np.float16))
    assert store.keys() == []
    assert store.get_meta(KEY) is None
    store.put_meta(KEY, {"n": 2})
    assert store.keys() == [KEY]


def test_keys_lists_complete_captures_oldest_first(store):
    keys = [f"{i:020x}" for i in (3, 1, 2)]
    for k in keys:
        store.put_array(k, "L000", np.ones(4, np.float16))
        store.put_meta(k, {})
    assert store.keys() == keys


def test_evict_removes_the_whole_capture(store):
    other = "f" * 20
    for k in (KEY, other):
        store.put_array(k, "L000", np.ones((4, 4), np.float16))
        store.put_array(k, "L001", np.ones((4, 4), np.float16))
        store.put_meta(k, {"k": k})
    assert len(npy_files(store)) == 4
    assert store.evict(KEY) == 3
    assert store.keys() == [other]
    assert store.get_meta(KEY) is None
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L000")
    assert len(npy_files(store)) == 2  # its files are gone from disk too
    assert index_keys(store) == sorted(f"{other}/{n}" for n in ("L000", "L001", "meta"))
    assert np.array_equal(store.get_array(other, "L001"), np.ones((4, 4), np.float16))


def test_size_limit_evicts_whole_oldest_captures_never_parts(tmp_path):
    mib = 2**20
    probe = Store(tmp_path / "probe", size_limit=2**40)
    base = probe.volume()  # the empty index itself counts towards the volume
    probe.close()
    # each capture: three 256 KiB layers; room for about three and a half captures
    store = Store(tmp_path / "c", size_limit=base + int(3.5 * 0.75 * mib) + 64 * 1024)
    layer = np.ones(128 * 1024, np.float16)  # 256 KiB
    keys = [f"{i:020x}" for i in range(6)]
    try:
        for i, k in enumerate(keys):
            for n in range(3):
                store.put_array(k, f"L{n:03d}", layer * (i + 1))
            store.put_meta(k, {"i": i})
            assert store.volume() <= store.size_limit
            assert k in store.keys()  # the capture just written is never the one evicted
        kept = store.keys()
        assert kept == keys[-len(kept):] and 2 <= len(kept) < len(keys)  # newest kept, oldest gone
        rows = index_keys(store)
        for k in keys:
            mine = [r for r in rows if r.startswith(k + "/")]
            if k in kept:
                assert len(mine) == 4
                for n in range(3):
                    assert np.array_equal(store.get_array(k, f"L{n:03d}"), layer * (keys.index(k) + 1))
            else:
                assert mine == []  # nothing half-evicted
        assert len(npy_files(store)) == 3 * len(kept)
    finally:
        store.close()


def test_size_limit_oldest_by_stored_time_not_by_key_order(tmp_path):
    store = Store(tmp_path / "c", size_limit=2**40)
    layer = np.ones(128 * 1024, np.float16)
    try:
        for k in ("b" * 20, "a" * 20):  # "a..." sorts first but is the newer capture
            store.put_array(k, "L000", layer)
            store.put_meta(k, {})
        store.size_limit = store.volume() - 1024  # just over: one capture must go
        store.put_array("c" * 20, "L000", np.ones(8, np.float16))
        store.put_meta("c" * 20, {})
        assert set(store.keys()) == {"a" * 20, "c" * 20}
    finally:
        store.close()


# ---- corruption --------------------------------------------------------------------------------

def _one_array(store: Store) -> tuple[np.ndarray, Path]:
    a = np.arange(4096, dtype=np.float16).reshape(8, 512)
    store.put_array(KEY, "L000", a)
    store.put_meta(KEY, {})
    (path,) = npy_files(store)
    return a, path


def test_truncated_npy_is_corrupt(store):
    _, path = _one_array(store)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L000")


def test_truncated_npy_is_corrupt_even_after_a_good_read(store):
    """The CRC is checked once per process; a file cut short later must still not be served."""
    a, path = _one_array(store)
    assert np.array_equal(store.get_array(KEY, "L000"), a)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L000")


def test_flipped_bytes_fail_the_checksum(store):
    a, path = _one_array(store)
    raw = bytearray(path.read_bytes())
    raw[-1000] ^= 0x01  # one bit of the data, header untouched: np.load alone would not notice
    path.write_bytes(bytes(raw))
    assert np.load(path, allow_pickle=False).shape == a.shape
    with pytest.raises(CorruptEntry, match="checksum"):
        store.get_array(KEY, "L000")


def test_deleted_npy_is_corrupt(store):
    _, path = _one_array(store)
    path.unlink()
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L000")


def test_missing_array_is_corrupt(store):
    _one_array(store)
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L999")


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "\"a string\"", ""])
def test_corrupt_inline_metadata(store, text):
    store._cache.set(f"{KEY}/meta", text, tag=KEY)  # as if the index row had been damaged
    with pytest.raises(CorruptEntry):
        store.get_meta(KEY)


def test_corrupt_metadata_file(store):
    """A large record lives in its own file (diskcache MODE_TEXT); damage there is caught too."""
    store.put_meta(KEY, {"tokens": ["tok"] * 20000})
    (path,) = [p for p in store.directory.rglob("*.val")]
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CorruptEntry):
        store.get_meta(KEY)
    path.write_bytes(b"\xff\xfe\x00garbage")  # not even UTF-8
    with pytest.raises(CorruptEntry):
        store.get_meta(KEY)
    path.unlink()
    with pytest.raises(CorruptEntry):
        store.get_meta(KEY)


# ---- types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [1, 2.5, b"bytes", ("tuple",), None])
def test_keys_must_be_str(tmp_path, key):
    cache = diskcache.Cache(str(tmp_path / "index"), disk=ArrayDisk)
    try:
        with pytest.raises(TypeError):
            cache.set(key, np.zeros(3, np.float16))
        with pytest.raises(TypeError):
            cache.get(key)
    finally:
        cache.close()


@pytest.mark.parametrize("value", [
    {"a": 1},
    [1, 2],
    np.array([1, "a", None], dtype=object),
    np.zeros(2, dtype=[("x", "f4"), ("o", "O")]),
    object(),
])
def test_values_of_other_types_are_refused(store, value):
    with pytest.raises(TypeError):
        store.put_array(KEY, "L000", value)
    assert index_keys(store) == [] and npy_files(store) == []


# ---- no pickles --------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker directory: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return self is other


def test_pickled_value_is_refused_not_executed(store, tmp_path):
    marker = tmp_path / "pwned_value"
    stock = diskcache.Cache(str(store.directory / "index"))  # the stock Disk pickles what it cannot store raw
    try:
        stock.set(f"{KEY}/meta", Payload(str(marker)), tag=KEY)
        stock.set(f"{KEY}/L000", Payload(str(marker)), tag=KEY)
        with sqlite3.connect(store.directory / "index" / "cache.db") as db:
            modes = {m for (m,) in db.execute("SELECT mode FROM Cache")}
        assert modes == {diskcache.core.MODE_PICKLE}

        assert store.keys() == [KEY]  # listing never reads values
        with pytest.raises(CorruptEntry):
            store.get_meta(KEY)
        with pytest.raises(CorruptEntry):
            store.get_array(KEY, "L000")
        assert not marker.exists()

        # capture.api's reader turns that into "absent" and evicts it, still without unpickling
        from capture.api import load_capture

        assert load_capture(KEY, store) is None
        assert not marker.exists()
        assert store.keys() == []

        # the payload is live: a stock reader would have run it
        stock.set("bait", Payload(str(marker)))
        stock.get("bait")
        assert marker.exists()
    finally:
        stock.close()


def test_pickled_key_is_refused_not_executed(store, tmp_path):
    marker = tmp_path / "pwned_key"
    store.put_array(KEY, "L000", np.ones(3, np.float16))
    store.put_meta(KEY, {})
    stock = diskcache.Cache(str(store.directory / "index"))
    try:
        stock.set(Payload(str(marker)), "x")  # a key that only unpickling can rebuild
        assert store.keys() == [KEY]  # the foreign row is skipped, never unpickled
        store.put_meta("f" * 20, {})  # and it does not break writing (size-limit checks list keys)
        assert not marker.exists()
    finally:
        stock.close()


def test_npy_with_object_dtype_is_never_loaded(store):
    """An .npy swapped for one holding pickled objects fails the CRC, and np.load refuses it anyway."""
    _, path = _one_array(store)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptEntry):
        store.get_array(KEY, "L000")


def test_mode_constant_is_ours():
    assert MODE_NPY not in (diskcache.core.MODE_NONE, diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY,
                            diskcache.core.MODE_TEXT, diskcache.core.MODE_PICKLE)


def test_metadata_is_plain_json_on_disk(store):
    store.put_meta(KEY, {"x": 1})
    with sqlite3.connect(store.directory / "index" / "cache.db") as db:
        ((mode, value),) = db.execute("SELECT mode, value FROM Cache WHERE key = ?", (f"{KEY}/meta",))
    assert mode == diskcache.core.MODE_RAW
    assert json.loads(value)["x"] == 1


def test_a_capture_keeps_its_files_in_one_folder(store):
    """The arrays of one capture share one folder (one mkdir per capture), which eviction removes; a
    key that is not a plain name gets a hashed folder inside the cache directory."""
    for name in ("L000", "L001", "overview"):
        store.put_array(KEY, name, np.ones((2, 2), np.float16))
    odd = "../../outside"
    store.put_array(odd, "x y", np.zeros(3, np.float32))
    folders = {p.parent for p in npy_files(store)}
    assert {p.name for p in folders} >= {KEY} and len(folders) == 2
    assert all(store.directory in p.parents for p in folders)
    assert np.array_equal(store.get_array(odd, "x y"), np.zeros(3, np.float32))
    store.put_array(KEY, "L000", np.full((2, 2), 2, np.float16))  # rewritten: a new file, the old one removed
    assert np.array_equal(store.get_array(KEY, "L000"), np.full((2, 2), 2, np.float16))
    assert len(npy_files(store)) == 4
    store.evict(KEY)
    store.evict(odd)
    assert npy_files(store) == [] and not any(p.exists() for p in folders)


# ---- many openers at once ----------------------------------------------------------------------

def test_threads_opening_one_new_cache_at_once_all_get_it(tmp_path):
    """The app's first sessions are threads that open the cache together: none may read another's
    write probe or the index being created as "not writable" (CI once served a page from a stand-in
    temporary store this way, and its capture never reached the shared cache)."""
    import threading

    from core.errors import CacheError

    start, problems = threading.Barrier(12), []

    def open_it():
        start.wait()
        try:
            Store(tmp_path / "cache").put_meta(f"k{threading.get_ident()}", {"kind": "test"})
        except (CacheError, sqlite3.OperationalError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_it) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert len(Store(tmp_path / "cache").keys()) == 12


def test_default_store_is_one_store_for_all_threads(tmp_path, monkeypatch):
    import threading

    from capture import api

    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setattr(api, "_default_store", None)
    start, got = threading.Barrier(8), []

    def ask():
        start.wait()
        got.append(api.default_store())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in got}) == 1 and not got[0].temporary
    assert got[0].directory == (tmp_path / "fresh").resolve()
