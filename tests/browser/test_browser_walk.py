"""The page-to-page walk (issue 23, bug 1): every page, each modality's page after each other modality's
page, through the sidebar's navigation as a person clicks it, and Run pressed on each.  One server, one
browser page, the embedded models' default inputs (cached after the first walk).

The walk is an Eulerian circuit of the four kinds of page (text, vision, diffusion, gaze): each ordered
pair of kinds appears once, so a draft widget that one kind's sidebar draws and another's does not
(f_chat, f_seed, f_scene_seed ...) is exercised in both directions.
"""
from __future__ import annotations

import time

import pytest

from harness import LINK, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 800}
TITLES = {"home": "Home", "explorer": "Attention explorer", "atlas": "Head atlas", "intervene": "Intervene",
          "vision": "Vision", "dit": "Diffusion (DiT)", "gaze": "Gaze (VLM)", "patterns": "Pattern atlas",
          "attribution": "Attribution"}
KIND = {"vision": "vision", "dit": "dit", "gaze": "vlm"}  # every other page is a text page
WALK = ["home", "dit", "gaze", "vision", "dit", "vision", "gaze", "dit", "explorer", "vision", "atlas", "gaze",
        "intervene", "patterns", "attribution"]


def test_the_walk_covers_every_page_and_every_pair_of_kinds():
    kinds = [KIND.get(p, "text") for p in WALK]
    pairs = {(a, b) for a, b in zip(kinds, kinds[1:]) if a != b}
    assert len(pairs) == 12 and set(WALK) == set(TITLES)


def broken(page) -> list[str]:
    """Streamlit's error boxes and exceptions on the page (the redacted crash box included)."""
    return page.locator("[data-testid='stException'], [data-testid='stAlertContentError']").all_inner_texts()


def test_walk_every_page_after_every_other_kind_and_run(server, chromium, artifacts):
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    page.goto(server + "/")
    wait_idle(page, "h1", timeout=300_000)
    timings = []
    for step, name in enumerate(WALK):
        try:
            started = time.perf_counter()
            page.get_by_role("link", name=TITLES[name], exact=True).click()
            paths = ["/home", "/"] if name == "home" else [f"/{name}"]
            page.wait_for_function(f"() => {paths}.some(p => location.pathname === p)", timeout=60_000)
            wait_idle(page, "h1", timeout=300_000)
            assert not broken(page), (step, name, broken(page))
            if name == "explorer":  # bug 1's second path: a DiT model was loaded; switch to SmolLM2, then Run
                menu = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").first
                menu.click()
                page.get_by_role("option", name="SmolLM2-135M (causal LM)").click()
                wait_idle(page, "h1", timeout=300_000)
            run = page.locator("[data-testid='stSidebar']").get_by_role("button", name="Run")
            if run.count():  # a picture model's input (Vision) applies at once: its sidebar has no Run
                run.click()
                wait_idle(page, "h1", timeout=300_000)
            page.wait_for_selector(LINK, timeout=60_000)  # the sidebar (and its share box) is still there
            assert not broken(page), (step, name, broken(page))
            timings.append(f"{name} {time.perf_counter() - started:.1f}s")
        except Exception:
            page.screenshot(path=str(artifacts / "walk_failure.png"))
            raise AssertionError(f"walk step {step} ({name}), after {WALK[step - 1] if step else 'the start'}")
    page.screenshot(path=str(artifacts / "walk_last_page.png"))
    print("walk:", ", ".join(timings))
