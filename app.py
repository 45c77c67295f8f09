"""HeadScope: the Streamlit entry point.  Navigation, the shared sidebar, the URL state.

Run with `make run` (or `streamlit run app.py`).  Each page is a short script in pages/.
"""
from __future__ import annotations

# pandas first, in every session's thread alike: Plotly's validators and Streamlit import it lazily from
# different modules, and two sessions doing so at once can meet in a lock cycle, where Python hands one of
# them the module half initialised ("partially initialized module 'pandas' has no attribute 'Series'": the
# DiT page's browser test under load)
import pandas  # noqa: F401
import plotly.graph_objects  # noqa: F401
import streamlit as st

from pages import resend, shared, sidebar, widgets

# an emoji icon is drawn in the browser (a :material/...: page icon is fetched from a font CDN)
st.set_page_config(page_title="HeadScope", page_icon="🔎", layout="wide")
st.html("<style>.hs-tokens{line-height:2.0;font-family:ui-monospace,monospace;font-size:0.92rem;overflow-wrap:anywhere}"
        ".hs-tok{padding:1px 0;border-radius:3px}"
        ".hs-label{font-weight:600;display:inline-block;min-width:8.5em}"
        # less empty space above the title: the main comparison of each page sits higher at 1280 x 800
        "[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")

widgets.early()
state = shared.view_state()
link_opened = st.session_state.pop("link_opened", False)
PAGES = {
    "home": st.Page("pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
    "explorer": st.Page("pages/explorer.py", title="Attention explorer", icon=":material/search:", url_path="explorer"),
    "atlas": st.Page("pages/atlas.py", title="Head atlas", icon=":material/grid_on:", url_path="atlas"),
    "intervene": st.Page("pages/intervene.py", title="Intervene", icon=":material/tune:", url_path="intervene"),
    "vision": st.Page("pages/vision.py", title="Vision", icon=":material/image:", url_path="vision"),
    "dit": st.Page("pages/dit.py", title="Diffusion (DiT)", icon=":material/brush:", url_path="dit"),
    "gaze": st.Page("pages/gaze.py", title="Gaze (VLM)", icon=":material/center_focus_strong:", url_path="gaze"),
    "patterns": st.Page("pages/patterns.py", title="Pattern atlas", icon=":material/scatter_plot:", url_path="patterns"),
    "attribution": st.Page("pages/attribution.py", title="Attribution", icon=":material/account_tree:",
                           url_path="attribution"),
}
page = st.navigation(list(PAGES.values()))
if link_opened and state.page in PAGES and PAGES[state.page] is not page:
    st.switch_page(PAGES[state.page])  # a shared link opens on the page it names
state.page = next(name for name, p in PAGES.items() if p is page)
sidebar.resolve_link_key()
sidebar.page_model()
sidebar.render()
with shared.page_run():  # a page's shared.stop() ends the page only: the link and the share box still come
    page.run()
st.query_params.from_dict(state.to_params())
with st.sidebar:
    st.markdown("**Share this view**")
    widgets.share_link(shared.share_link(state))
if st.session_state.pop("plotly_waiting", False):  # the page held its Plotly charts back (shared.plotly_chart)
    widgets.paint_signal(shared.painted)
resend.run_completed()
