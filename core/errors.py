"""Every error HeadScope explains to a person, in one hierarchy.

A user-facing error's message is one sentence that says what is wrong and what to do.  Pages, the
command line and notebooks catch `USER_ERRORS` and show that sentence, never a traceback; anything
else is a bug and is reported as one.

    HeadScopeError
    ├── InputError          the input cannot be run: empty prompt, bad picture, too long for memory
    │   └── CliError        a command-line argument that names nothing (no such capture key ...)
    ├── InterventionError   an edit that cannot be applied to this model or input
    ├── ModelUnavailable    the model cannot be had: not on this machine, needs remote code, unknown
    ├── CacheError          the cache directory cannot be written: not writable, disk full
    └── ProbeMissing        a metric reads a probe result that is not in the cache yet

Each keeps the built-in base it had before the hierarchy existed (`ValueError`, `LookupError`), so
`except ValueError` around an intervention still works.

`CorruptEntry` is not for people: the cache raises it when an entry fails its checksum or is half
written, and the reader evicts the entry and recomputes it (DESIGN.md, "Cache").
"""
from __future__ import annotations


class HeadScopeError(Exception):
    """Something the user can fix; the message is one sentence meant for them."""


class InputError(HeadScopeError, ValueError):
    """The input cannot be run (empty prompt, unreadable picture, more tokens than memory allows)."""


class CliError(InputError):
    """A command-line argument that names nothing HeadScope has (a capture key not in the cache ...)."""


class InterventionError(HeadScopeError, ValueError):
    """An edit that cannot be applied (unknown op, head outside the model, bad position set)."""


class ModelUnavailable(HeadScopeError):
    """The model cannot be had; the message says why and what to do."""


class CacheError(HeadScopeError):
    """The cache cannot be written (not writable, disk full)."""


class ProbeMissing(HeadScopeError, LookupError):
    """A metric needs a probe result that is not in the cache; the message says how to make it."""


class CorruptEntry(Exception):
    """A cache entry that exists but cannot be trusted (truncated, corrupt or half-written)."""


USER_ERRORS: tuple[type[Exception], ...] = (HeadScopeError,)

__all__ = ["HeadScopeError", "InputError", "CliError", "InterventionError", "ModelUnavailable", "CacheError",
           "ProbeMissing", "CorruptEntry", "USER_ERRORS"]
