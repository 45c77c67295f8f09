"""Real-browser tests of issue 23: every recipe link on Home opens its view from a fresh context and draws
its figure (or says what it must run first), with no request leaving the machine (bug 6: page icons from a
font CDN); DiT sliders keep their values across mode and page switches (bug 4); Stop ends a running capture
and nothing half-made is cached.  One server and one browser for the module.
"""
from __future__ import annotations

import time
from urllib.parse import urlencode, urlsplit

import pytest

from harness import LINK, PICTURE, wait_idle

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 800}
ERRORS = "[data-testid='stException'], [data-testid='stAlertContentError']"


def fresh(chromium, outside: list[str]):
    """A page in a fresh context that records every request to another host than the test server's."""
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    page.on("request", lambda r: outside.append(r.url) if urlsplit(r.url).hostname not in ("127.0.0.1", None)
            and not r.url.startswith("data:") else None)
    return page


def test_every_recipe_link_opens_its_view_and_nothing_leaves_the_machine(server, chromium, artifacts):
    from pages.recipes import RECIPES

    outside: list[str] = []
    home = fresh(chromium, outside)
    home.goto(server + "/")
    wait_idle(home, "a.hs-recipe", timeout=300_000)
    links = home.locator("a.hs-recipe").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    home.screenshot(path=str(artifacts / "recipes_home.png"))
    assert len(links) == len(RECIPES)
    timings = []
    assert links == [f"/?{urlencode(r.link())}" for r in RECIPES]  # Home's cards, in the recipes' order
    for recipe, link in zip(RECIPES, links):
        measured = recipe.numbers() is not None
        page = fresh(chromium, outside)
        started = time.perf_counter()
        page.goto(server + link)
        # measured: the view draws its figure; not yet: it says what it must run, with the page's primary button
        # to run it (not the sidebar's Run), or (a view whose capture is quick, as Vision's) computes and draws it
        wait_idle(page, recipe.figure if measured else
                  f"{recipe.figure}, [data-testid='stMain'] [data-testid='stBaseButton-primary']", timeout=300_000)
        timings.append(f"{recipe.name} {time.perf_counter() - started:.1f}s")
        assert not page.locator(ERRORS).count(), (recipe.name, page.locator(ERRORS).all_inner_texts())
        page.screenshot(path=str(artifacts / f"recipe_{recipe.name}.png"))
        page.context.close()
    print("recipes:", ", ".join(timings))
    assert not outside, outside[:5]


def test_dit_sliders_keep_their_values_across_mode_and_page_switches(server, chromium, artifacts):
    page = fresh(chromium, [])
    page.goto(server + "/?page=dit")
    wait_idle(page, PICTURE, timeout=300_000)

    def intervene_tab():
        page.get_by_role("tab", name="Intervene").click()
        page.wait_for_timeout(300)

    def sliders() -> list[str]:
        return [t.split("\n\n")[:2] for t in page.locator("[data-testid='stSlider']").all_inner_texts()]

    intervene_tab()
    scale = page.locator("[data-testid='stSlider']", has_text="Guidance scale").get_by_role("slider")
    scale.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # 3.00 -> 3.50
    wait_idle(page, "h1")
    intervene_tab()
    assert ["Guidance scale s", "3.50"] in sliders()
    page.get_by_text("Scale / mask heads", exact=True).click()
    wait_idle(page, "h1")
    page.get_by_role("link", name="Head atlas", exact=True).click()  # away and back: the widgets are dropped
    wait_idle(page, "h1")
    page.get_by_role("link", name="Diffusion (DiT)", exact=True).click()
    wait_idle(page, PICTURE)
    intervene_tab()
    page.get_by_text("SoftPAG / PAG guidance", exact=True).click()
    wait_idle(page, "h1")
    intervene_tab()
    shown = sliders()
    page.screenshot(path=str(artifacts / "browser_dit_sliders.png"))
    assert ["Guidance scale s", "3.50"] in shown and ["u (toward identity; 1 = PAG)", "1.00"] in shown, shown


def test_stop_ends_a_running_capture_and_keeps_nothing(server, chromium, artifacts):
    from capture import RunSpec, cached

    prompt = " ".join(f"Line {i}: the keeper trimmed the lamp and wrote the weather down." for i in range(120))
    page = fresh(chromium, [])
    page.goto(server + "/?page=explorer")
    wait_idle(page, ".hs-pic img", timeout=300_000)
    box = page.locator("textarea[aria-label='Prompt']")
    box.fill(prompt)
    box.press("Control+Enter")
    page.locator("[data-testid='stSidebar']").get_by_role("button", name="Run").click()
    page.get_by_role("button", name="Stop").click(timeout=120_000)
    page.wait_for_selector("text=Stopped: Running smollm2", timeout=120_000)
    wait_idle(page, "h1")
    page.screenshot(path=str(artifacts / "browser_stopped.png"))
    assert page.get_by_role("button", name="Start again").count() == 1
    assert page.locator(LINK).count()  # the share box is still there
    assert cached(RunSpec(model="smollm2", prompt=prompt)) is None  # nothing half-made reads as a capture
