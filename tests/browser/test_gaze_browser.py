"""Real-browser test of the Gaze page (Debian chromium + Playwright): the embedded shapes-vlm when its
weights exist, else a tiny random LLaVA folder the operator allows.  Screenshots land in tests/artifacts/."""
from __future__ import annotations

from urllib.parse import quote

import pytest
from test_vlm_capture import tiny_vlm  # noqa: F401 - the fixture

from harness import shown_link, streamlit_server, wait_idle
from capture.vlm import model as vlm_model

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def gaze_model(tiny_vlm):  # noqa: F811
    return "shapes-vlm" if vlm_model.trained_path().is_file() else str(tiny_vlm)


@pytest.fixture(scope="module")
def gaze_server(gaze_model):
    with streamlit_server(env={"HEADSCOPE_ALLOWED_MODELS": gaze_model}) as url:
        yield url


def test_gaze_page_draws_filmstrip_saliency_and_heads(gaze_server, gaze_model, chromium, artifacts):
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    question = "what colour is the circle?"
    page.goto(f"{gaze_server}/?page=gaze&model={quote(gaze_model, safe='')}&image=scene-3&prompt={quote(question)}")
    wait_idle(page, "text=Filmstrip", timeout=300_000)
    assert page.locator("h1").first.inner_text() == "Gaze"
    assert page.get_by_text(question).count() >= 1
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 4", timeout=60_000)
    page.screenshot(path=str(artifacts / "browser_gaze.png"))
    page.get_by_text("Filmstrip").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "browser_gaze_filmstrip.png"))
    page.locator("[data-testid='stDataFrame']").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "browser_gaze_heads.png"))
    # which heads wrote the answer (DLA), computed on request unless stored
    page.get_by_role("tab", name="Which heads wrote it").click()
    run = page.get_by_role("button", name="Attribute the next token to the heads")
    if run.count():
        run.click()
    page.get_by_text("DLA onto", exact=False).first.wait_for(timeout=120_000)
    page.get_by_text("DLA onto", exact=False).first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "browser_gaze_dla.png"))
    page.get_by_role("tab", name="Intervene").click()
    page.get_by_text("VAR: sink attention to the image", exact=True).click()
    page.wait_for_selector("text=After (VAR", state="attached", timeout=120_000)
    wait_idle(page, "[data-testid='stApp']", timeout=120_000)
    if not page.get_by_text("After (VAR").first.is_visible():  # the rerun may show the first tab again
        page.get_by_role("tab", name="Intervene").click()
    page.get_by_text("After (VAR").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "browser_gaze_intervene.png"))
    link = shown_link(page)
    assert "page=gaze" in link and "image=scene-3" in link and "intervention=" in link

    shared = chromium.new_context(viewport=VIEWPORT).new_page()  # a fresh context: only the link
    shared.goto(link)
    wait_idle(shared, "text=Filmstrip", timeout=300_000)
    assert shared.get_by_text(question).count() >= 1
    # the link's intervention, reopened (rendered inside the Intervene tab, which need not be the open one)
    shared.wait_for_selector("text=After (VAR", state="attached", timeout=120_000)
