"""Dashboard speed with a warm cache (issue 4), and BertViz's model_view on the same inputs.

Server time is measured with streamlit's AppTest (the script run that answers an interaction);
first paint with Debian chromium + Playwright against `streamlit run` (time until the figure is drawn).
BertViz needs transformers' eager output_attentions for every layer and embeds all weights in its HTML,
so each length runs in a subprocess with a 20 GB address-space cap and a 10-minute limit; failures
are recorded, not fatal.  Usage: .venv/bin/python bench/app.py [--lengths 128 512 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from urllib.parse import quote

from common import ROOT, prompt_of, table

BERTVIZ_CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (20 * 2**30, 20 * 2**30))
sys.path.insert(0, sys.argv[1])
import torch
from bertviz import model_view
from capture import registry
handle = registry.load("smollm2")
tok, model = handle.tokenizer, handle.model
ids = torch.tensor([tok(sys.argv[2])["input_ids"]])
model.set_attn_implementation("eager")
t0 = time.perf_counter()
with torch.inference_mode():
    out = model(input_ids=ids, use_cache=False, output_attentions=True)
html = model_view(out.attentions, tok.convert_ids_to_tokens(ids[0]), html_action="return")
print(json.dumps({"s": time.perf_counter() - t0, "mb": len(html.data) / 2**20}))
"""


def bertviz(prompt: str) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", BERTVIZ_CHILD, str(ROOT), prompt], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "gave up after 10 min"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return "failed: " + ("out of memory" if "MemoryError" in done.stderr or done.returncode < 0 else last[:60])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{result['s']:.1f} s, {result['mb']:.0f} MB HTML"


def server_times(key: str) -> dict:
    """Seconds of server time: open a link to the model view, switch head, switch layer, head view."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.query_params.update({"page": "explorer", "view": "model", "key": key})
    t0 = time.perf_counter()
    at.run()
    times = {"open model view": time.perf_counter() - t0}
    assert not at.exception, at.exception

    def timed(label, action):
        start = time.perf_counter()
        action().run()
        times[label] = time.perf_counter() - start
        assert not at.exception, at.exception

    timed("model view: switch head", lambda: next(w for w in at.number_input if w.label == "Head").increment())
    at.session_state["view"].view = "head"
    at.session_state["w_view"] = "head"
    at.run()
    timed("head view: switch head", lambda: next(w for w in at.number_input if w.label == "Head").increment())
    timed("head view: switch layer", lambda: next(w for w in at.number_input if w.label == "Layer").increment())
    return times


PAINTED = {"model": ".hs-pic img",  # the model view's mosaic (pages/widgets.py)
           "head": ".hs-pic img"}  # one head's map


def first_paint(key: str, repeats: int = 3) -> dict[str, float]:
    """Seconds from opening a shared link in a fresh browser context until its figure is drawn, per view
    (median of `repeats`; the server has run the page once, as a server in use has)."""
    sys.path.insert(0, str(ROOT / "tests" / "browser"))
    (ROOT / "tests" / "artifacts").mkdir(parents=True, exist_ok=True)
    from harness import browser, streamlit_server, wait_idle

    out = {}
    with streamlit_server() as url, browser() as b:
        for view, selector in PAINTED.items():
            warm = b.new_page()
            warm.goto(f"{url}/?page=explorer&view={view}&key={key}")  # the server's first script run imports
            wait_idle(warm, selector)
            times = []
            for _ in range(repeats):
                context = b.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(f"{url}/?page=explorer&view={view}&layer=3&head=2&key={key}")
                page.wait_for_selector(selector, timeout=120_000)
                times.append(time.perf_counter() - t0)
                context.close()
            out[view] = statistics.median(times)
    return out


FIGURE = ".hs-pic img, .js-plotly-plot .main-svg, [data-testid='stImage'] img"  # any page's first figure
# In the page, from its first moment: every 20 ms look for a drawn figure (a picture's or an image's <img> sized
# and decoded, or Plotly's SVG), also inside components' shadow roots; the frame after it is found is when it
# paints (a main thread busy parsing a script delays that frame, and so the time).  Playwright's own polling
# can lag a busy page by a second, so the clock is read in the page: ms since the navigation started.
PAINT_CLOCK = """
window.__painted = null;
const sel = %r;
const found = () => {
  const roots = [document, ...[...document.querySelectorAll('*')].filter(e => e.shadowRoot).map(e => e.shadowRoot)];
  return roots.some(r => [...r.querySelectorAll(sel)].some(e => {
    const b = e.getBoundingClientRect();
    return b.width > 0 && b.height > 0 && (e.tagName !== 'IMG' || (e.complete && e.naturalWidth > 0));
  }));
};
const timer = setInterval(() => {
  if (window.__painted === null && found()) {
    clearInterval(timer);
    requestAnimationFrame(() => { window.__painted = performance.now(); });
  }
}, 20);
"""


def page_links() -> list[tuple[str, str, str]]:
    """(page, shared link query, what counts as its first figure) for every page, inputs cached first."""
    import probes
    from capture import default_store, load, presets, remember
    from capture.api import run
    from core.types import RunSpec

    prompt = "The cat sat on the mat. The cat sat on the"
    intervention = presets.prune(load("smollm2").meta, [(10, 3), (11, 4), (12, 5)])
    pruned = remember(intervention)
    run(RunSpec(model="smollm2", prompt=prompt, max_new_tokens=6))
    run(RunSpec(model="smollm2", prompt=prompt, max_new_tokens=6, intervention=intervention))
    atlases = probes.stored_atlases(default_store())
    links = [("home", "page=home", "a.hs-recipe"),
             ("explorer", "page=explorer&view=model&layer=3&head=2", ".hs-pic img"),
             ("explorer (head)", "page=explorer&view=head&layer=3&head=2", ".hs-pic img"),
             ("atlas", "page=atlas&metric=sink_alpha", FIGURE),
             ("intervene", f"page=intervene&max_new_tokens=6&prompt={quote(prompt)}&intervention={pruned}", FIGURE),
             ("vision", "page=vision&model=dinov2-s&image=cat&layer=11&head=-1", FIGURE),
             ("dit", "page=dit", FIGURE),
             ("gaze", "page=gaze", FIGURE)]
    if atlases:
        links.append(("patterns", f"page=patterns&atlas={atlases[-1][0]}", FIGURE))
    links.append(("attribution", "page=attribution", FIGURE))  # the IOI example (its probes cached: bench/recipes.py)
    return links


def page_paint(repeats: int = 3) -> dict[str, float]:
    """Seconds from opening each page's shared link in a fresh browser context until its first figure paints
    (PAINT_CLOCK; median of `repeats`; the server has run every page once, as a server in use has)."""
    sys.path.insert(0, str(ROOT / "tests" / "browser"))
    (ROOT / "tests" / "artifacts").mkdir(parents=True, exist_ok=True)
    from harness import browser, streamlit_server, wait_idle

    links = page_links()
    out = {}
    with streamlit_server() as url, browser() as b:
        warm = b.new_page()
        for _, query, selector in links:  # the server's first run of each page imports and reads
            warm.goto(f"{url}/?{query}")
            wait_idle(warm, selector, timeout=600_000)
        for name, query, selector in links:
            times = []
            for _ in range(repeats):
                context = b.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                page.add_init_script(PAINT_CLOCK % selector)
                page.goto(f"{url}/?{query}")
                page.wait_for_selector(selector, timeout=120_000)
                page.wait_for_function("() => window.__painted !== null", timeout=120_000)
                times.append(page.evaluate("window.__painted") / 1000)
                context.close()
            out[name] = statistics.median(times)
            print(f"{name}: {out[name]:.2f} s ({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--no-bertviz", action="store_true")
    parser.add_argument("--pages", action="store_true", help="only the first paint of every page's shared link")
    args = parser.parse_args()
    if args.pages:
        paint = page_paint()
        print(table(["page", "shared link first figure s (<= 2), median of 3"],
                    [[name, f"{seconds:.2f}"] for name, seconds in paint.items()]))
        return
    from capture import registry
    from capture.api import run
    from core.types import RunSpec

    tokenizer = registry.load("smollm2").tokenizer
    rows = []
    for n in args.lengths:
        prompt = prompt_of(tokenizer, n)
        capture = run(RunSpec(model="smollm2", prompt=prompt))  # warm the cache
        times = server_times(capture.key)
        paint = first_paint(capture.key)
        peer = "not run" if args.no_bertviz else bertviz(prompt)
        rows.append([n, f"{paint['model']:.2f}", f"{paint['head']:.2f}", f"{times['open model view']:.2f}",
                     f"{times['model view: switch head'] * 1000:.0f}",
                     f"{times['head view: switch head'] * 1000:.0f}",
                     f"{times['head view: switch layer'] * 1000:.0f}", peer])
        print(f"done {n} tokens", flush=True)
    print(table(["tokens", "shared link first paint s, model view (<=2)", "same, head view",
                 "model view server s (<=2)",
                 "switch head, model view ms", "switch head, head view ms (<=300)",
                 "switch layer, head view ms (<=300)", "BertViz model_view (eager + HTML)"], rows))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
