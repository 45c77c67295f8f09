"""The disk cache: keys, arrays and metadata; it knows nothing of models."""
from cache.keys import is_key, stable_hash
from cache.store import CacheError, CorruptEntry, Store, cache_dir

__all__ = ["CacheError", "CorruptEntry", "Store", "cache_dir", "is_key", "stable_hash"]
