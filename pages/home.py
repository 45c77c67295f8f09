"""Landing page: what HeadScope is, the papers' findings in one click (pages/recipes.py), what each page is for."""
from urllib.parse import urlencode

import streamlit as st

from pages import shared
from pages.recipes import RECIPES

st.title("HeadScope")
capture = shared.current_capture()
st.markdown(
    "Explore the attention heads of language models, vision-language models, vision transformers and diffusion "
    "transformers: capture every head's attention into a disk cache, score heads with published methods, and switch "
    "interventions on chosen heads to see what changes. Every view is a link you can share."
)
shared.show_link_warnings()


@st.cache_data(ttl=120, show_spinner=False)
def measured(name: str) -> str | None:
    """A recipe's numbers from this server's cache (kept two minutes: a probe run elsewhere shows up soon)."""
    recipe = next(r for r in RECIPES if r.name == name)
    try:
        return recipe.numbers()
    except Exception as exc:  # noqa: BLE001 - a card never takes the page down; it says what went wrong
        return f"(could not read the cached results: {type(exc).__name__})"


@st.cache_data(ttl=120, show_spinner=False)
def link_of(name: str) -> str:
    recipe = next(r for r in RECIPES if r.name == name)
    return "/?" + urlencode(recipe.link())


st.subheader("Recipes: the papers' findings in one click")
st.caption("Each card opens the view that shows the finding on an embedded model; the numbers are measured on this "
           "server (bench/recipes.py computes them all; the README lists them).")
for i, recipe in enumerate(RECIPES):
    if i % 2 == 0:  # a row of two cards at a time: the page reads (and its links come) in the recipes' order
        columns = st.columns(2, gap="medium")
    with columns[i % 2].container(border=True):
        st.markdown(f"**{recipe.title}** · *{recipe.papers}*")
        st.markdown(f"{recipe.finding} {recipe.measures}")
        numbers = measured(recipe.name)
        if numbers:
            st.markdown(f"**Measured here:** {numbers}")
        else:
            st.caption(f"Not measured on this server yet: the view runs {recipe.missing} (it says so first).")
        st.markdown(f'<a class="hs-recipe" href="{link_of(recipe.name)}" target="_self">Open the view →</a>',
                    unsafe_allow_html=True)

with st.expander("What each page is for"):
    st.markdown(
        """
| Page | What it is for |
|---|---|
| **Attention explorer** | Every head at a glance (model view), one head's full map with token labels (head view), and which tokens one token attends to (token view). |
| **Head atlas** | Any head metric (sinks, locality, entropy, previous-token / induction / echo, retrieval, ablation and gradient importance, DuoAttention gates) as a layer × head map with its layer profile, per-token metrics over the text, and the long probes with an estimate, a progress line and a Stop button. |
| **Intervene** | Toggle heads and presets (ablation, ACT, sink redistribution, DuoAttention streaming, SoftPAG, ITI steering, retrieval-head masking), rerun, and compare before \\| after: text diff, log-probabilities, the map that moved most. |
| **Vision** | For image models (DINOv2-small): attention from the CLS token or a clicked patch over the picture, per head; attention distance by layer; strength vs distance; attention rollout; high-norm tokens. |
| **Diffusion (DiT)** | Text-to-image DiTs (shapes-dit embedded): word-by-word heatmaps over the image per head and timestep, sink tokens, head grounding, and before \\| after pictures for SoftPAG / PAG, masked heads or attention moved off sink tokens. |
| **Gaze (VLM)** | For vision-language models (shapes-vlm): a picture and a question; where the gaze moves word by word while the model reads the question (GIFT filmstrip and saliency), visual sinks, image-centric heads, VHD, and before \\| after answers under VAR, GIFT or masked image attention, alone or over held-out scenes. |
| **Pattern atlas** | An autoencoder over many heads' maps, clustered: what kinds of head exist, where they sit by layer and model, before vs after an intervention. |
| **Attribution** | Which heads made a token: direct logit attribution, activation patching between a clean and a corrupted prompt, the head graph, path patching. |
"""
    )
shared.status_line(capture)
if capture is not None:
    shared.show_text(capture)
    st.page_link("pages/explorer.py", label="Open the attention explorer", icon="🔍")
