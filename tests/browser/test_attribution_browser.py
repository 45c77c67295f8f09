"""The attribution page in a real browser at 1280 x 800: the IOI link opens with its maps, a click on the DLA
map selects a head (before | after and the link follow), the head graph and the patching map draw.
Screenshots land in tests/artifacts/attribution_*.png.  The probes come from the default cache
(tests/models/test_attribution_smollm2.py fills it; computed here otherwise)."""
from __future__ import annotations

import pytest

from harness import browser, streamlit_server, wait_for_link, wait_idle

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
        wait_idle(page, ".js-plotly-plot", timeout=300_000)
        assert page.get_by_text("Attribution: which heads made this token").count() == 1
        page.screenshot(path=str(artifacts / "attribution_top.png"))
        dla_map = page.locator(".js-plotly-plot").first
        dla_map.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "attribution_dla.png"))
        # the cell of layer 23, head 3 (L23 H3, the top name mover), placed by Plotly's own axes
        x, y = dla_map.evaluate("""el => {
            const f = el._fullLayout, r = el.getBoundingClientRect();
            return [r.left + f._size.l + f.xaxis.l2p(3), r.top + f._size.t + f.yaxis.l2p(23)];
        }""")
        page.mouse.click(x, y)
        link = wait_for_link(page, "layer=23&head=3")
        assert "page=attribution" in link
        wait_idle(page, ".js-plotly-plot")
        assert page.get_by_text("L23 H3 patched").count() == 1
        page.get_by_role("tab", name="Head graph").click()
        page.wait_for_timeout(800)
        graph = page.locator("[role=tabpanel]:visible .js-plotly-plot").first
        graph.scroll_into_view_if_needed()
        assert graph.locator(".scatterlayer .trace").count() > 10  # edges and nodes
        page.screenshot(path=str(artifacts / "attribution_graph.png"))
        page.get_by_role("tab", name="Activation patching").click()
        page.wait_for_timeout(800)
        page.locator("[role=tabpanel]:visible .js-plotly-plot").first.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "attribution_patching.png"))
        context.close()
