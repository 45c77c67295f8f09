"""Pattern atlas in a real browser: lasso-select points in the UMAP scatter, see their maps and heads,
and the share link carries the selection.  Screenshots land in tests/artifacts/patterns_*.png."""
from __future__ import annotations

import pytest

from harness import browser, shown_link, streamlit_server, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1400, "height": 900}
PROMPTS = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
           "In 1851 the lighthouse keeper wrote that the storm had broken three windows and the lamp.")


@pytest.fixture(scope="module")
def atlas_key():
    """The SmolLM2 atlas of tests/unit/test_patterns.py (from the default cache when it is there)."""
    from analytics.patterns import AtlasParams
    from capture.api import run
    from core.types import RunSpec
    from probes.pattern_atlas import build_atlas

    return build_atlas([run(RunSpec(model="smollm2", prompt=p)) for p in PROMPTS], AtlasParams()).key


def test_lasso_selection_shows_maps_and_heads_and_travels_in_the_link(atlas_key, artifacts):
    with streamlit_server() as server, browser() as chromium:
        context = chromium.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(f"{server}/?page=patterns&atlas={atlas_key}")
        wait_idle(page, ".js-plotly-plot")
        scatter = page.locator(".js-plotly-plot").first
        scatter.scroll_into_view_if_needed()
        box = scatter.locator(".nsewdrag").first.bounding_box()
        assert box is not None
        page.screenshot(path=str(artifacts / "patterns_atlas.png"))
        # a lasso around the middle of the plot (dragmode is lasso)
        cx, cy, rx, ry = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"] * 0.3, box["height"] * 0.3
        page.mouse.move(cx - rx, cy - ry)
        page.mouse.down()
        for x, y in [(cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry), (cx - rx, cy - ry)]:
            page.mouse.move(x, y, steps=8)
        page.mouse.up()
        page.wait_for_selector("text=/selected maps?$/", timeout=120_000)
        wait_idle(page, ".js-plotly-plot")
        heading = page.locator("h3", has_text="selected map").first
        count = int(heading.inner_text().split()[0].replace(",", ""))
        assert count >= 1
        heading.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "patterns_selection.png"))
        link = shown_link(page)
        assert "page=patterns" in link and f"atlas={atlas_key}" in link and "points=" in link
        context.close()

        # the link in a fresh browser (a tall window, to see the whole page): the same selection
        context = chromium.new_context(viewport={"width": 1400, "height": 3600})
        page = context.new_page()
        page.goto(link)
        wait_idle(page, ".js-plotly-plot")
        page.wait_for_selector("text=/selected maps?$/", timeout=120_000)
        assert int(page.locator("h3", has_text="selected map").first.inner_text().split()[0].replace(",", "")) == count
        page.screenshot(path=str(artifacts / "patterns_shared_link.png"))
        page.get_by_role("tab", name="Heads").click()
        wait_idle(page, ".js-plotly-plot")
        page.get_by_role("tab", name="Heads").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "patterns_heads.png"))
        context.close()
