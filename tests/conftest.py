"""Shared fixtures: an isolated cache per test session, the embedded models loaded once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The converted SmolLM2 folder is kept between runs (under ./cache_data/models): converting takes ~20 s.
os.environ.setdefault("HEADSCOPE_CACHE_DIR", str(ROOT / "cache_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture
def store(tmp_path):
    """An empty capture store in a temporary directory."""
    from cache.store import Store

    s = Store(tmp_path / "cache", size_limit=4 * 2**30)
    yield s
    s.close()


@pytest.fixture(scope="session")
def smollm2():
    from capture import registry

    return registry.load("smollm2")


@pytest.fixture(scope="session")
def minilm():
    from capture import registry

    return registry.load("minilm")


def cache_with_models(root: Path) -> Path:
    """A fresh cache directory whose models/ points at the converted SmolLM2 (converting takes ~20 s)."""
    from cache.store import cache_dir

    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def server():
    """`streamlit run app.py` on a free loopback port, for the browser tests of one module."""
    from browser import streamlit_server

    with streamlit_server() as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    """Debian chromium driven by Playwright, for the browser tests of one module."""
    from browser import browser

    with browser() as b:
        yield b
