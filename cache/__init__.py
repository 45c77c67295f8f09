"""The disk cache: keys, arrays and metadata; it knows nothing of models."""
from cache.store import Store, cache_dir
from core.errors import CacheError, CorruptEntry
from core.keys import is_key, stable_hash

__all__ = ["CacheError", "CorruptEntry", "Store", "cache_dir", "is_key", "stable_hash"]
