"""Shared fixtures: an isolated cache per test session, the embedded models loaded once; the tiers.

Tests live in three tiers, each a folder and a marker given here (`pytest -m unit` runs one alone):
- tests/unit     no model: hand-made maps, keys, the cache, links (seconds);
- tests/models   the embedded and tiny random models, captures, probes, the CLI and AppTest pages;
- tests/browser  the app in Debian's chromium through Playwright (tests/browser/harness.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIERS = ("unit", "models", "browser")
sys.path.insert(0, str(ROOT))
# the tiers' helper modules (tiny_vlms, tiny_pipelines; harness) import by name from any tier
sys.path[1:1] = [str(TESTS / "models"), str(TESTS / "browser")]
# The converted SmolLM2 folder is kept between runs (under ./cache_data/models): converting takes ~20 s.
os.environ.setdefault("HEADSCOPE_CACHE_DIR", str(ROOT / "cache_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARTIFACTS = ROOT / "tests" / "artifacts"


def open_app(params: dict, timeout: int = 300):
    """app.py in AppTest opened on a link's query parameters, run once; no exception on the page."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    at.query_params.update(params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def one_head_at_a_time(meta, metric_with, z_source):
    """The reference a batched patching sweep is checked against: for each head alone, the metric of one
    forward with that head's output z from `z_source`  # [layer, head]; `metric_with(patches)` runs it."""
    import numpy as np
    import torch

    single = np.zeros((meta.n_layers, meta.n_heads))
    for l in range(meta.n_layers):
        for h in range(meta.n_heads):
            mask = torch.zeros(1, meta.n_heads, dtype=torch.bool)
            mask[0, h] = True
            single[l, h] = metric_with({l: (mask, z_source[l])})
    return single


def pytest_collection_modifyitems(items):
    """Each test gets the marker of its tier, the folder it lives in."""
    for item in items:
        if item.path.parent.name in TIERS:
            item.add_marker(item.path.parent.name)


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

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)  # on a fresh clone nothing has built a model yet
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def server():
    """`streamlit run app.py` on a free loopback port, for the browser tests of one module."""
    from harness import streamlit_server

    with streamlit_server() as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    """Debian chromium driven by Playwright, for the browser tests of one module."""
    from harness import browser

    with browser() as b:
        yield b


def save_tiny_llava(folder: Path, image_size: int, lm_layers: int) -> Path:
    """A tiny random LLaVA saved in `folder` (Dinov2 vision tower with 14 px patches, a Llama LM with 4 heads
    over 2 KV heads, SmolLM2's tokenizer plus <image>, a preprocessor for `image_size` px); no downloads."""
    import json

    import torch
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from capture.vlm import model as vlm_model

    tokenizer = vlm_model.base_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=14)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=lm_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         image_seq_length=(image_size // 14) ** 2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration._from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
         "do_center_crop": False, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return folder


def component_data(at, name: str) -> list[dict]:
    """The data of each st.components.v2 component `name` on an AppTest page (AppTest shows them as
    unknown elements; pages/widgets.py)."""
    import json

    return [json.loads(e.proto.json) for e in at.get("bidi_component") if e.proto.component_name == name]
