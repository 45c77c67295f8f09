"""Real-browser tests of the Intervene, Vision, Head atlas and DiT pages (Debian chromium + Playwright).

Screenshots land in tests/artifacts/.
"""
from __future__ import annotations

import pytest

from harness import LINK, PICTURE, wait_for_link, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 800}
PROMPT = "The cat sat on the mat. The cat sat on the"


def fresh(chromium):
    return chromium.new_context(viewport=VIEWPORT).new_page()


FIGURE = f"{PICTURE}, .js-plotly-plot"  # a page's figures: pictures (pages/widgets.picture) or Plotly charts


def opened(chromium, url: str, selector: str = FIGURE):
    """A page in a fresh context at `url`, once `selector` is drawn and the script run has finished."""
    page = fresh(chromium)
    page.goto(url)
    wait_idle(page, selector, timeout=300_000)
    return page


def test_intervene_toggle_heads_rerun_and_share(server, chromium, artifacts):
    from urllib.parse import quote

    page = fresh(chromium)
    page.goto(f"{server}/?page=intervene&max_new_tokens=6&prompt={quote(PROMPT)}")
    wait_idle(page, "text=Pick heads and a preset", timeout=300_000)
    heads = page.locator("[data-testid='stMultiSelect']").first
    for label in ("L10H3", "L11H4", "L12H5"):
        heads.click()
        page.keyboard.type(label)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    wait_idle(page, "text=Rerun with this intervention")  # each chosen head reran the page: let it settle
    page.get_by_role("button", name="Rerun with this intervention").click()
    page.wait_for_selector("text=Before | after", timeout=300_000)
    wait_idle(page, "text=Before | after", timeout=300_000)
    assert page.get_by_text("Before", exact=False).count() > 0
    page.screenshot(path=str(artifacts / "browser_intervene.png"))
    link = wait_for_link(page, "intervention=", timeout=60_000)  # written at the end of the run
    assert "intervention=" in link and "page=intervene" in link
    before_after = page.locator("text=Before | after").first.inner_text()

    shared = fresh(chromium)  # a fresh context: no session state, only the link
    shared.goto(link)
    shared.wait_for_selector("text=Before | after", timeout=300_000)
    assert shared.locator("text=Before | after").first.inner_text() == before_after
    shared.screenshot(path=str(artifacts / "browser_intervene_shared.png"))


def test_vision_click_a_patch_and_switch_heads(server, chromium, artifacts):
    page = opened(chromium, f"{server}/?page=vision&model=dinov2-s&image=cat&layer=11&head=-1")
    assert page.get_by_text("Query: CLS token").count() == 1
    plot = page.locator(PICTURE).first  # the overlay: one cell per patch
    box = plot.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    page.wait_for_selector("text=Query: patch", timeout=60_000)
    wait_idle(page, PICTURE)
    head = page.locator("input[aria-label='Head']")
    head.click()
    head.fill("head 2")
    page.get_by_role("option", name="head 2").click()
    wait_for_link(page, "head=2", timeout=60_000)
    wait_idle(page, PICTURE)
    assert "patch=" in page.url
    page.screenshot(path=str(artifacts / "browser_vision.png"))


def test_atlas_shows_a_metric_map(server, chromium, artifacts):
    page = opened(chromium, f"{server}/?page=atlas&metric=sink_alpha")
    assert page.locator("h1").first.inner_text() == "Head atlas"
    page.screenshot(path=str(artifacts / "browser_atlas.png"))


def test_dit_page_draws_the_image_and_heatmaps(server, chromium, artifacts):
    page = opened(chromium, f"{server}/?page=dit")
    assert page.locator("[data-testid='stException']").count() == 0
    # the sidebar's inputs hold their values before anything is typed (a busy server can paint them empty
    # first, and Run then samples an empty prompt)
    try:
        page.wait_for_function("() => document.querySelector(\"textarea[aria-label='Prompt']\")?.value.length > 0",
                               timeout=120_000)
    except Exception:  # seen once in a clean-clone run (2026-12-05, not reproduced): keep what the page showed
        page.screenshot(path=str(artifacts / "browser_dit_no_prompt.png"), full_page=True)
        areas = page.evaluate("() => [...document.querySelectorAll('textarea')].map(t => [t.ariaLabel, t.value])")
        raise AssertionError(f"the sidebar's prompt stayed empty at {page.url}; text areas {areas}; "
                             "see tests/artifacts/browser_dit_no_prompt.png") from None
    page.screenshot(path=str(artifacts / "browser_dit.png"))
    seed = page.locator("input[aria-label='Seed']")  # a new seed from the sidebar, then Run
    seed.fill("5")
    seed.press("Enter")
    page.get_by_role("button", name="Run").click()
    wait_for_link(page, "seed=5")
    wait_idle(page, ".js-plotly-plot", timeout=300_000)
    link = wait_for_link(page, "seed=5")
    assert "seed=5" in link and "page=dit" in link and "model=shapes-dit" in link

    shared = fresh(chromium)  # a fresh context opens the same picture from the link alone
    shared.goto(link)
    shared.wait_for_selector("text=seed 5, 20 steps", timeout=300_000)
    wait_idle(shared, ".js-plotly-plot", timeout=300_000)
    assert shared.locator("[data-testid='stException']").count() == 0
    shared.screenshot(path=str(artifacts / "browser_dit_shared.png"))


def test_dit_patch_tab_asks_from_a_clicked_patch(server, chromium, artifacts):
    """The Diffusion page's "Where a patch looks", opened from a link: the patch's picture and its reading of
    the prompt; then a click on another patch asks from that one, and the link carries it."""
    page = opened(chromium, f"{server}/?page=dit&model=shapes-dit&prompt=a+red+circle+at+the+top+left&steps=4"
                            "&step=2&layer=1&head=-1&patch=2,2")
    page.get_by_role("tab", name="Where a patch looks").click()
    page.wait_for_selector("text=What patch (2, 2) reads of the prompt", timeout=120_000)
    page.wait_for_selector("text=Where patch (2, 2) looks", timeout=120_000)
    overlay = page.locator(PICTURE).last  # the tab's overlay: one cell per patch (8 x 8)
    overlay.scroll_into_view_if_needed()
    box = overlay.bounding_box()  # its size; the click waits until it stands still (charts above may still draw)
    overlay.click(position={"x": box["width"] * (6 + 0.5) / 8, "y": box["height"] * (1 + 0.5) / 8})
    try:
        wait_for_link(page, "patch=1%2C6", timeout=120_000)
        wait_idle(page, PICTURE)
        page.wait_for_selector("text=Where patch (1, 6) looks", timeout=120_000)
    except Exception as error:  # keep what the page showed
        page.screenshot(path=str(artifacts / "browser_dit_patch_failed.png"), full_page=True)
        state = page.locator("[data-testid='stApp']").get_attribute("data-test-script-state")
        links = page.locator(LINK).all_inner_texts()
        raise AssertionError(f"after the click: script {state}, url {page.url}, link {links}; "
                             "see tests/artifacts/browser_dit_patch_failed.png") from error
    assert page.locator("[data-testid='stException']").count() == 0
    page.locator(PICTURE).last.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "browser_dit_patch.png"))


@pytest.mark.parametrize("family", ["sd3", "chroma", "pixart", "sana", "qwenimage", "flux2", "flux2dev", "cogview4",
                                    "auraflow", "hunyuandit", "lumina2", "zimage"])
def test_dit_page_on_a_saved_pipeline(family, chromium, artifacts, tmp_path):
    """A diffusers folder on the DiT page, from its link: SD3's joint attention with CLIP and T5 tokens
    (shown as words, without CLIP's "</w>"), Chroma's (Flux's blocks; guidance a second call per step),
    PixArt's layers that store only their image block
    (core.layouts.PaddedBlock), Sana's linear attention, Qwen-Image's byte-level tokens (without "Ġ"),
    FLUX.2 [klein]'s Qwen3 chat template padded to 512 tokens (a capture in the layout of real sizes), FLUX.2
    [dev]'s Mistral chat template with its system message (no word panels, as Mistral's markers), CogView 4's text
    padded on the left, AuraFlow's register tokens, HunyuanDiT's BERT and T5 tokens in one cross-attention, Lumina 2's
    system prompt before the prompt (read by the model, no word panels) and its refiner layers (said), Z-Image's
    Qwen3 chat template and the padding its transformer adds; the page draws them all."""
    from urllib.parse import urlencode

    import tiny_pipelines
    from harness import streamlit_server

    folder = tiny_pipelines.save(family, tmp_path / family)
    env = {"HEADSCOPE_ALLOWED_MODELS": str(folder), "HEADSCOPE_CACHE_DIR": str(tmp_path / "cache")}
    link = {"page": "dit", "model": str(folder), "prompt": "a red circle at the top left", "seed": "3",
            "steps": "2", "width": str(tiny_pipelines.size(family)), "height": str(tiny_pipelines.size(family)),
            "step": "1", "layer": "1", "head": "1"}
    if family == "zimage":  # Z-Image-Turbo samples without guidance: the link's scale, in the sidebar and the notes
        link["guidance"] = "0"
    with streamlit_server(env=env) as url:
        page = opened(chromium, f"{url}/?{urlencode(link)}", ".js-plotly-plot")
        assert page.locator("[data-testid='stException']").count() == 0
        assert page.locator("[data-testid='stAlert']").filter(has_text="cannot").count() == 0
        assert page.locator(".js-plotly-plot").count() >= 4
        words = page.locator(".js-plotly-plot").first
        red = "red · T5" if family in ("sd3", "hunyuandit") else "red"
        assert words.get_by_text(red, exact=True).count() >= 1 and words.get_by_text("</w>").count() == 0
        assert words.get_by_text("Ġ").count() == 0
        if family == "auraflow":  # its registers are tokens of the transformer's own, no words (no "· T5" either)
            assert words.get_by_text("register").count() == 0 and words.get_by_text("·").count() == 0
        if family == "hunyuandit":  # BERT's words, then T5's, in one cross-attention
            assert words.get_by_text("red · BERT").count() == 1 and words.get_by_text("red · T5").count() == 1
        if family == "sd3":  # its prompt twice, CLIP's tokens then T5's: each word says whose it is
            assert words.get_by_text("red · CLIP").count() == 1 and words.get_by_text("red · T5").count() == 1
        if family in ("qwenimage", "flux2", "flux2dev", "cogview4", "zimage"):  # chat markers, thinking tags,
            title = {"qwenimage": "Qwen-Image", "flux2": "FLUX.2 [klein]", "flux2dev": "FLUX.2 [dev]",  # newlines,
                     "cogview4": "CogView 4", "zimage": "Z-Image"}[family]  # GLM's opening: special
            assert page.get_by_text(f"a {title} diffusion pipeline").count() == 1
            assert words.get_by_text("⏎").count() == 0 and words.get_by_text("im_end").count() == 0
            assert words.get_by_text("think").count() == 0 and words.get_by_text("gMASK").count() == 0
            assert words.get_by_text("assistant").count() == 0 and words.get_by_text("user").count() == 0
        if family == "flux2dev":  # its system message's words and Mistral's markers are no panels
            assert words.get_by_text("speculation").count() == 0 and words.get_by_text("INST").count() == 0
            assert words.get_by_text("SYSTEM_PROMPT").count() == 0
            assert words.get_by_text("circle", exact=True).count() >= 1
        if family == "lumina2":  # the system prompt's words are no panels; the notes say what is not recorded
            assert page.get_by_text("a Lumina 2 diffusion pipeline").count() == 1
            assert words.get_by_text("superior").count() == 0 and words.get_by_text("assistant").count() == 0
            assert words.get_by_text("circle", exact=True).count() >= 1
            said = "its image-only refiners are layer 0, its caption-only refiners layer 1"
            assert page.get_by_text(said).count() == 1
            assert page.get_by_text("Layer 1 reads within the picture or within the caption only").count() == 1
        if family == "zimage":
            assert page.get_by_text("Guidance scale 0 (the model's default: 5)").count() == 1
            sidebar = page.locator("[data-testid='stSidebar']")
            scale = sidebar.get_by_role("spinbutton", name="Guidance scale")
            assert scale.input_value() == "0.00"
            scale.scroll_into_view_if_needed()
            sidebar.screenshot(path=str(artifacts / "browser_dit_zimage_sidebar.png"))
        if family in ("pixart", "sana"):
            # the T5 / Gemma padding is masked: left out of the sink chart (and of the sinks' median: no "(sink)"
            # on every word, as before analytics.dit.sink_stats left masked columns out)
            assert page.get_by_text("292 masked tokens").count() == 1
            assert words.get_by_text("(sink)").count() == 0
        page.screenshot(path=str(artifacts / f"browser_dit_{family}.png"))
        words.scroll_into_view_if_needed()
        words.screenshot(path=str(artifacts / f"browser_dit_{family}_words.png"))
        page.locator(".js-plotly-plot").nth(1).scroll_into_view_if_needed()  # the word maps and the sink tab
        page.wait_for_timeout(500)
        page.screenshot(path=str(artifacts / f"browser_dit_{family}_maps.png"))
