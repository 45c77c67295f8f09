"""Real-browser tests: Debian chromium + Playwright against `streamlit run app.py` on loopback.

Screenshots land in tests/artifacts/ (look at them after a change).
"""
from __future__ import annotations

import time

import pytest

from harness import PICTURE, shown_link, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 800}


def fresh_page(chromium):
    context = chromium.new_context(viewport=VIEWPORT)
    return context, context.new_page()


def layer_head(page) -> tuple[str, str]:
    return field(page, "Layer").input_value(), field(page, "Head").input_value()


def field(page, label: str):
    """The input element of a labelled Streamlit widget (not its help button)."""
    return page.locator(f"input[aria-label='{label}'], textarea[aria-label='{label}']").first


def test_run_a_prompt_and_see_the_heatmap(server, chromium, artifacts):
    context, page = fresh_page(chromium)
    page.goto(server + "/?page=explorer&view=head")
    wait_idle(page, PICTURE)
    field(page, "Prompt").fill("Alice gave Bob a book because Bob")
    field(page, "Prompt").press("Control+Enter")
    field(page, "Max new tokens").fill("5")
    field(page, "Max new tokens").press("Enter")
    page.get_by_role("button", name="Run").click()
    page.wait_for_selector(".hs-pic .ylab:has-text('Alice')", timeout=120_000)
    wait_idle(page, PICTURE)
    labels = page.locator(".hs-pic .ylab").all_text_contents()
    assert len(labels) > 9 + 1  # the prompt's 9 tokens and the generated ones
    # hover a cell: query token, key token, weight
    box = page.locator(PICTURE).bounding_box()
    n = len(labels)
    page.mouse.move(box["x"] + box["width"] * 0.5 / n, box["y"] + box["height"] * (n - 0.5) / n)
    tip = page.locator(".hs-pic .tip").text_content()
    assert tip.startswith(f"query {n - 1} ") and "key 0 " in tip and "weight 0." in tip, tip
    page.locator(".hs-pic button", has_text="+").click()  # zoom: the picture doubles and scrolls
    page.wait_for_timeout(300)
    assert page.locator(PICTURE).bounding_box()["width"] > box["width"] * 1.5
    page.screenshot(path=str(artifacts / "browser_head_view.png"))
    context.close()


def test_share_link_reproduces_the_view_in_a_fresh_context(server, chromium, artifacts):
    context, page = fresh_page(chromium)
    page.goto(server + "/?page=explorer&view=head&layer=5&head=4&scale=log")
    wait_idle(page, PICTURE)
    link = shown_link(page)
    assert "layer=5" in link and "head=4" in link
    context.close()

    context, page = fresh_page(chromium)
    started = time.perf_counter()
    page.goto(link)
    wait_idle(page, PICTURE)
    print(f"shared link first paint: {time.perf_counter() - started:.2f} s")
    assert layer_head(page) == ("5", "4")
    assert "Layer 5, head 4" in page.locator(".hs-pic .title").first.text_content()
    assert page.locator(".hs-pic .bartitle").first.text_content() == "log10 weight"
    page.screenshot(path=str(artifacts / "browser_shared_link.png"))
    context.close()


def test_page_switch_keeps_state_and_model_view_click_opens_a_head(server, chromium, artifacts):
    context, page = fresh_page(chromium)
    page.goto(server + "/?page=explorer&view=model&layer=2&head=3")
    wait_idle(page, PICTURE)
    page.screenshot(path=str(artifacts / "browser_model_view.png"))
    with page.expect_download() as download:  # the mosaic as a picture, built when asked for
        page.get_by_role("button", name="Picture (PNG)").click()
    assert open(download.value.path(), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as download:
        page.get_by_role("button", name="Picture (SVG)").click()
    svg = open(download.value.path()).read()
    assert svg.startswith("<svg") and ">L29<" in svg and ">H8<" in svg
    with page.expect_download() as download:  # the numbers behind the mosaic, built when asked for
        page.get_by_role("button", name="Numbers (CSV)").click()
    lines = open(download.value.path()).read().splitlines()
    assert lines[0] == "layer,head,query_block,key_block,max_weight" and lines[1].startswith("0,0,0,0,")
    bins = int(len(lines[1:]) ** 0.5 / (30 * 9) ** 0.5)
    assert len(lines) - 1 == 30 * 9 * bins * bins and bins >= 8
    page.get_by_role("link", name="Home", exact=True).click()
    wait_idle(page, "h1:has-text('HeadScope')")
    page.screenshot(path=str(artifacts / "browser_home.png"))
    # the URL is written at the end of the run, after Home's recipe numbers are read from the cache (a cache
    # holding many recipe results takes longer than wait_idle's grace)
    page.wait_for_function("() => location.search.includes('layer=2') && location.search.includes('head=3')",
                           timeout=30_000)
    page.get_by_role("link", name="Attention explorer", exact=True).click()
    wait_idle(page, PICTURE)
    assert layer_head(page) == ("2", "3")

    # hover and click the thumbnail of layer 6, head 1 in the mosaic
    box = page.locator(PICTURE).bounding_box()
    n_layers, n_heads = 30, 9
    x = box["x"] + box["width"] * (1 + 0.5) / n_heads
    y = box["y"] + box["height"] * (6 + 0.5) / n_layers
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    hover = page.locator(".hs-pic .tip").text_content()
    assert "layer 6, head 1" in hover, hover
    page.mouse.click(x, y)
    page.wait_for_function("() => document.querySelector('input[aria-label=\"Layer\"]')?.value === '6'",
                           timeout=60_000)
    wait_idle(page, PICTURE)
    assert layer_head(page) == ("6", "1")
    page.screenshot(path=str(artifacts / "browser_after_click.png"))
    context.close()


def test_token_view_highlights_text(server, chromium, artifacts):
    context, page = fresh_page(chromium)
    page.goto(server + "/?page=explorer&view=token&layer=8")
    wait_idle(page, ".hs-tokens")
    assert page.locator(".hs-tokens").count() == 1 + 9  # mean + one line per head
    page.screenshot(path=str(artifacts / "browser_token_view.png"))
    # below the lines: which heads wrote the next token (DLA), computed on request unless stored
    run = page.get_by_role("button", name="Attribute the next token to the heads")
    if run.count():
        run.click()
    heading = page.get_by_text("Which heads wrote the next token", exact=False)
    heading.wait_for(timeout=120_000)
    wait_idle(page, PICTURE)
    heading.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    assert page.get_by_text("DLA onto", exact=False).count() or page.locator(PICTURE).count()
    page.screenshot(path=str(artifacts / "browser_token_view_dla.png"))
    context.close()


def test_long_input_overview_click_moves_the_detail_window(server, chromium, artifacts):
    """Over 160 tokens the head view is a pooled overview plus a detail window; a click on the overview
    centres the window there (and the link carries it)."""
    from urllib.parse import quote

    prompt = " ".join(str(i % 10) for i in range(200))  # ~400 tokens in 399 characters (a link carries <= 600)
    context, page = fresh_page(chromium)
    page.goto(f"{server}/?page=explorer&view=head&layer=3&head=1&prompt={quote(prompt)}")
    wait_idle(page, PICTURE, timeout=300_000)
    overview = page.locator(PICTURE).first
    assert "overview" in page.locator(".hs-pic .title").first.text_content()
    box = overview.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.8)
    page.wait_for_function("() => location.href.includes('q0=')", timeout=60_000)
    wait_idle(page, PICTURE)
    detail = page.locator(".hs-pic .title").nth(1).text_content()
    assert detail.startswith("Detail: queries ") and not detail.startswith("Detail: queries 0–"), detail
    page.screenshot(path=str(artifacts / "browser_long_head_view.png"))
    context.close()
