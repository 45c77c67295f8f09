"""Reliability: tampered links, cache faults, interrupted captures.

Each test states the fault, how often it is tried, and what must survive (README, "Fault tests").
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.store import ArrayDisk, Store
from capture.api import cached, run
from conftest import cache_with_models
from core.errors import CacheError
from core.types import RunSpec
from state import PAGES, SCALES, VIEWS, ViewState, allowed_models

ROOT = Path(__file__).resolve().parents[2]
FIELDS = [f for f in ViewState.__dataclass_fields__]
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["", "-1", "99999999999999999999", "1e9", "NaN", "../../etc/passwd", "/etc/passwd", "C:\\x", "file:///x",
     "sha256:" + "0" * 64, "sha256:zz", "<script>alert(1)</script>", "smollm2\x00", "1\n2", "ﬁ", "🙂" * 50,
     "x" * 5000, "none", "0123456789abcdef", "0123456789abcdef0123"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), any_text | st.lists(any_text, max_size=3),
                       max_size=8))
def test_any_link_parses_to_a_valid_state(params):
    state, warnings = ViewState.from_params(params)
    assert isinstance(warnings, list)
    assert state.page in PAGES and state.view in VIEWS and state.scale in SCALES
    assert state.model in allowed_models()
    for picture in (state.image, state.corrupted_image):
        assert not picture or not any(c in picture for c in "/\\.") or picture.startswith("sha256:")
    assert all(ch.isprintable() or ch in "\n\t" for ch in state.prompt)
    assert ViewState.from_params(state.to_params()) == (state, [])  # what a link says, it says again


def test_links_cannot_name_local_paths_or_unlisted_models(monkeypatch, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for value in (str(folder), "gpt2", "~/models/x", "file://" + str(folder)):
        state, warnings = ViewState.from_params({"model": value})
        assert state.model == "smollm2" and warnings
    monkeypatch.setenv("HEADSCOPE_ALLOWED_MODELS", "gpt2, org/model")
    assert ViewState.from_params({"model": "org/model"})[0].model == "org/model"
    assert ViewState.from_params({"model": str(folder)})[0].model == "smollm2"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["page", "view", "layer", "head", "token", "q0", "k0", "scale", "model",
                                        "key", "image", "prompt", "max_new_tokens", "chat", "corrupted_image",
                                        "positions", "junk"]),
                       any_text, min_size=1, max_size=6))
def test_no_link_ever_shows_a_traceback(params):
    from streamlit.testing.v1 import AppTest

    params = {k: v for k, v in params.items() if k not in ("prompt", "max_new_tokens")}  # no new captures
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.query_params.update(params)
    at.run()
    assert not at.exception, (params, [e.value for e in at.exception])


APP_PAGES = [p for p in PAGES if (ROOT / "pages" / f"{p}.py").exists()]  # the pages app.py serves
LINK_FIELDS = [f for f in FIELDS if f not in ("page", "prompt", "max_new_tokens")] + ["junk"]
link_value = any_text | st.sampled_from(list(allowed_models())) | st.integers(-3, 40).map(str)


@pytest.mark.parametrize("page", APP_PAGES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(LINK_FIELDS), link_value, min_size=1, max_size=7))
def test_no_link_to_any_page_shows_a_traceback(page, params):
    """Every page, opened from a link whose other parameters are fuzzed (valid models and small numbers
    included, so the pages really render): no traceback, the state stays valid."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.query_params.update({"page": page, **params})
    at.run()
    assert not at.exception, (page, params, [e.value for e in at.exception])
    state = at.session_state["view"]
    assert ViewState.from_params(state.to_params())[0] == state


ODD_PROMPTS = ["\x00\x01\x1b[31m bell\x07 and a\x7f delete",
               "ﬁ ﬂ ǅ ẞ 🙂🙃 \u202eRTL override\u200b زبان 中文 \U0001F9EC",
               "\t\n  \r\n "]


@pytest.mark.parametrize("page,model", [("explorer", "smollm2"), ("atlas", "smollm2"), ("intervene", "smollm2"),
                                        ("explorer", "minilm"), ("dit", "shapes-dit")])
@pytest.mark.parametrize("prompt", ODD_PROMPTS, ids=["control", "unicode", "whitespace"])
def test_odd_prompts_get_a_run_or_a_clear_message(page, model, prompt):
    """Control characters and odd Unicode typed into the sidebar: the page either shows the run or says
    what is wrong (whitespace only: "empty"), never a traceback; a rejected prompt leaves nothing cached."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.query_params.update({"page": page, "model": model})
    at.run()
    at.sidebar.text_area[0].input(prompt)
    at.sidebar.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    spec = RunSpec(model=model, prompt=prompt, **({"steps": 20} if model == "shapes-dit" else {}))
    if prompt.strip():
        assert cached(spec) is not None and not at.error, [e.value for e in at.error]
    else:
        assert any("empty" in e.value for e in at.error), [e.value for e in at.error]
        assert cached(spec) is None


# ---- cache faults --------------------------------------------------------------------------------

def test_disk_full_midway_leaves_nothing_that_looks_complete(smollm2, store, monkeypatch):
    spec = RunSpec(model="smollm2", prompt="A disk that fills up halfway through a capture.")
    real_store = ArrayDisk.store
    calls = {"n": 0}

    def failing_store(self, value, read, key=None):
        if isinstance(value, np.ndarray):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_store(self, value, read, key)

    monkeypatch.setattr(ArrayDisk, "store", failing_store)
    with pytest.raises(CacheError, match="could not be written"):
        run(spec, store=store)
    assert cached(spec, store) is None and store.keys() == []
    assert store.volume() < 1_000_000  # the layers written before the failure were evicted
    monkeypatch.setattr(ArrayDisk, "store", real_store)
    capture = run(spec, store=store)  # the next try completes
    assert not capture.from_cache and cached(spec, store) is not None


def test_unwritable_cache_directory_falls_back_to_a_temporary_store(monkeypatch, tmp_path):
    import capture.api as run_module

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="not writable"):
        Store(blocker / "cache")
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(run_module, "_default_store", None)
    fallback = run_module.default_store()
    assert fallback.temporary and "not writable" in fallback.problem
    assert not str(fallback.directory).startswith(str(blocker))


WORKER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises, even if the parent ignores SIGINT
from capture.api import run
from core.types import RunSpec
def slowly(share, text):  # 0.2 s after each layer: the signal lands mid-capture even on a loaded machine
    if text.startswith("captured layer"):
        time.sleep(0.2)
run(RunSpec(model="smollm2", prompt=sys.argv[1]), progress=slowly)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_capture_leaves_the_cache_consistent_and_a_rerun_completes(smollm2, tmp_path, sig):
    root = cache_with_models(tmp_path / "cache")
    prompt = " ".join(["The keeper wound the clockwork that turned the lens."] * 60)  # ~700 tokens
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(root), OMP_NUM_THREADS="1")
    log = tmp_path / "worker.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, prompt], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 240
        while not list(root.glob("index/**/*.npy")):  # wait until layers are being written
            assert proc.poll() is None, f"the worker ended (rc {proc.returncode}) before it could be interrupted: " \
                                        f"{log.read_text()[-800:]}"
            assert time.time() < deadline
            time.sleep(0.05)
        assert proc.poll() is None, "the worker finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert proc.returncode != 0, "the worker finished the capture instead of being interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
    store = Store(root)
    spec = RunSpec(model="smollm2", prompt=prompt)
    assert store.keys() == [] and cached(spec, store) is None  # half a capture is never visible
    capture = run(spec, store=store)
    assert not capture.from_cache and capture.n_tokens > 600
    again = cached(spec, store)
    assert again is not None and np.array_equal(np.asarray(again.head(7, 3)), np.asarray(capture.head(7, 3)))


# ---- concurrency ---------------------------------------------------------------------------------

@pytest.mark.browser
def test_eight_browser_sessions_and_two_cli_processes_at_once(smollm2, tmp_path):
    from urllib.parse import quote

    from harness import browser, streamlit_server, wait_idle

    root = cache_with_models(tmp_path / "cache")
    prompts = [f"Keeper number {i % 3} lit the lamp at six." for i in range(8)]  # 3 distinct inputs, shared
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(root))
    with streamlit_server(env={"HEADSCOPE_CACHE_DIR": str(root)}) as url, browser() as b:
        pages = []
        for i, prompt in enumerate(prompts):
            page = b.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.goto(f"{url}/?page=explorer&view=head&layer={i}&prompt={quote(prompt)}")
            pages.append(page)
        clis = [subprocess.Popen([sys.executable, "-m", "headscope", "run", "--model", "smollm2", "--prompt", p],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for p in prompts[:2]]
        for i, page in enumerate(pages):
            wait_idle(page, ".hs-pic img", timeout=300_000)
            assert page.locator("[data-testid='stException']").count() == 0
            assert page.locator("input[aria-label='Layer']").input_value() == str(i)
        for cli in clis:
            out, err = cli.communicate(timeout=300)
            assert cli.returncode == 0, err.decode()[-500:]
        peak = url.peak_rss_bytes()
    assert peak < 3 * 2**30, f"server peak memory {peak / 2**30:.1f} GB: more than one model copy?"
    store = Store(root)
    keys = store.keys()
    assert len(keys) == 3  # one entry per distinct input, however many asked at once
    for prompt in set(prompts):
        capture = cached(RunSpec(model="smollm2", prompt=prompt), store)
        assert capture is not None and capture.key in keys
        rows = np.asarray(capture.attention(5), dtype=np.float32).sum(-1)
        assert np.allclose(rows, 1.0, atol=2e-2)
