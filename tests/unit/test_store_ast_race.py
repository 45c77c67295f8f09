"""The cache reads an array again when CPython 3.11's AST race (python/cpython#106905) fails numpy's header parse
once (cache.store._np_load); any other SystemError, or the race every time, still raises."""
from __future__ import annotations

import numpy as np
import pytest

from cache import store


def _flaky(failures: int, message: str = store.AST_RACE):
    calls = []

    def load():
        calls.append(1)
        if len(calls) <= failures:
            raise SystemError(f"{message} (before=54, after=50)")
        return np.arange(3)

    return load, calls


def test_a_spurious_ast_error_is_read_again():
    load, calls = _flaky(2)
    np.testing.assert_array_equal(store._np_load(load), np.arange(3))
    assert len(calls) == 3


def test_other_errors_and_a_lasting_race_raise():
    load, _calls = _flaky(1, "something else")
    with pytest.raises(SystemError, match="something else"):
        store._np_load(load)
    load, calls = _flaky(5)
    with pytest.raises(SystemError, match="recursion depth"):
        store._np_load(load)
    assert len(calls) == 3
