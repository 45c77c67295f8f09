"""The attribution page in a real browser at 1280 x 800: the IOI link opens with its maps (pictures, painted
before Plotly's bundle loads: issue 23; the per-layer terms in Plotly a moment later), a click on the DLA map's
cell selects a head (before | after, the frame and the link follow), the head graph and the patching map draw.
Screenshots land in tests/artifacts/attribution_*.png.  The probes come from the default cache
(tests/models/test_attribution_smollm2.py fills it; computed here otherwise)."""
from __future__ import annotations

import pytest

from harness import PICTURE, browser, streamlit_server, wait_for_link, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def ioi_patching(smollm2):
    from capture import default_store
    from probes import run_probe

    return run_probe("patching", "smollm2", {}, store=default_store())


def test_attribution_page_click_selects_a_head_and_the_link_follows(ioi_patching, artifacts):
    with streamlit_server() as server, browser() as chromium:
        context = chromium.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(f"{server}/?page=attribution&layer=20&head=0")
        wait_idle(page, PICTURE, timeout=300_000)
        assert page.get_by_text("Attribution: which heads made this token").count() == 1
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)  # the per-layer terms, once the pictures painted
        wait_idle(page, PICTURE)
        page.screenshot(path=str(artifacts / "attribution_top.png"))
        dla_map = page.locator(f"{PICTURE}[alt='DLA per head: click a head']")
        dla_map.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "attribution_dla.png"))
        # the cell of layer 23, head 3 (L23 H3, the top name mover): 30 layers x 9 heads, layer 0 at the top
        box = dla_map.bounding_box()
        x, y = box["x"] + box["width"] * 3.5 / 9, box["y"] + box["height"] * 23.5 / 30
        page.mouse.move(x, y)
        page.wait_for_timeout(300)
        hover = page.locator(".hs-pic .tip").first.text_content()
        assert "layer 23, head 3: DLA (logit difference)" in hover, hover
        page.mouse.click(x, y)
        link = wait_for_link(page, "layer=23&head=3")
        assert "page=attribution" in link
        wait_idle(page, PICTURE)
        frame, box = page.locator(".hs-pic .sel").first.bounding_box(), dla_map.bounding_box()
        # the red frame moved to the clicked cell
        assert abs(frame["x"] + frame["width"] / 2 - (box["x"] + box["width"] * 3.5 / 9)) < 3
        assert abs(frame["y"] + frame["height"] / 2 - (box["y"] + box["height"] * 23.5 / 30)) < 3
        assert page.get_by_text("L23 H3 patched").count() == 1
        page.get_by_role("tab", name="Head graph").click()
        page.wait_for_timeout(800)
        graph = page.locator("[role=tabpanel]:visible .js-plotly-plot").first
        graph.scroll_into_view_if_needed()
        assert graph.locator(".scatterlayer .trace").count() > 10  # edges and nodes
        page.screenshot(path=str(artifacts / "attribution_graph.png"))
        page.get_by_role("tab", name="Activation patching").click()
        page.wait_for_timeout(800)
        patch_map = page.locator(f"[role=tabpanel]:visible {PICTURE}").first
        assert patch_map.get_attribute("alt") == "Share of the gap each head restores: click a head"
        patch_map.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "attribution_patching.png"))
        context.close()


@pytest.fixture(scope="module")
def picture_patching():
    """shapes-vlm's and shapes-dit's default patching sweeps (the page's first view on each), in the default cache."""
    from capture import default_store
    from probes import run_probe

    store = default_store()
    return {model: run_probe(kind, model, {}, store=store)
            for model, kind in (("shapes-vlm", "vlm_patching"), ("shapes-dit", "dit_patching"))}


@pytest.mark.parametrize("model, name", [("shapes-vlm", "vlm"), ("shapes-dit", "dit")])
def test_attribution_link_on_the_picture_kinds_draws_before_after_and_the_map(picture_patching, artifacts, model,
                                                                             name):
    """The page's first view on shapes-vlm (scene-3's red circle vs scene-4's yellow one) and shapes-dit ('a red
    circle' vs 'a blue circle'): the two pictures, before | after and the patching map, at 1280 x 800."""
    with streamlit_server() as server, browser() as chromium:
        context = chromium.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(f"{server}/?page=attribution&model={model}&layer=1&head=2")
        page.wait_for_selector(f"{PICTURE}[alt^='Share of the gap each head restores']", timeout=300_000)
        wait_idle(page, PICTURE)
        assert page.get_by_text("L1 H2 patched").count() == 1 and page.get_by_text("share of the gap").count() >= 1
        assert page.locator("[data-testid='stMain'] [data-testid='stImage'] img").count() == 2  # clean | corrupted
        page.screenshot(path=str(artifacts / f"attribution_{name}.png"))
        page.locator(f"{PICTURE}[alt^='Share of the gap']").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / f"attribution_{name}_map.png"))
        context.close()
