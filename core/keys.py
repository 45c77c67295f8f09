"""Cache keys: short, stable, URL-safe hashes of JSON-able records."""
from __future__ import annotations

import hashlib
import json

KEY_LEN = 20  # hex digits: 80 bits, plenty for a local cache, short enough for a link


def stable_hash(record: object, length: int = KEY_LEN) -> str:
    """sha256 of the canonical JSON of `record`, cut to `length` hex digits."""
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def is_key(text: str) -> bool:
    """True if `text` looks like a key this module made (so it is safe in a path or a link)."""
    return len(text) == KEY_LEN and all(c in "0123456789abcdef" for c in text)
