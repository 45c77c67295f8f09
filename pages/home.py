"""Landing page: what HeadScope is and what each page is for."""
import streamlit as st

from pages import shared

st.title("HeadScope")
capture = shared.current_capture()
st.markdown(
    "Explore the attention heads of language models, vision-language models, vision transformers and diffusion "
    "transformers: "
    "capture every head's attention "
    "into a disk cache, score heads with published methods, and switch interventions on chosen heads "
    "to see what changes. Every view is a link you can share."
)
shared.show_link_warnings()
st.markdown(
    """
| Page | What it is for |
|---|---|
| **Attention explorer** | Every head at a glance (model view), one head's full map with token labels (head view), and which tokens one token attends to (token view). |
| **Head atlas** | Any head metric (sinks, locality, entropy, previous-token / induction / echo, retrieval, ablation and gradient importance, DuoAttention gates) as a layer × head map, per-token metrics over the text, and the long probes with a progress bar. |
| **Intervene** | Toggle heads and presets (ablation, ACT, sink redistribution, DuoAttention streaming, SoftPAG, ITI steering, retrieval-head masking), rerun, and compare before \| after: text diff, log-probabilities, maps. |
| **Vision** | For image models (DINOv2-small): attention from the CLS token or a clicked patch over the picture, per head; attention distance by layer; strength vs distance; attention rollout. |
| **Diffusion (DiT)** | The embedded text-to-image DiT trained on shapes: word-by-word heatmaps over the image per head and timestep, sink tokens, head grounding, and before \| after pictures for SoftPAG / PAG, masked heads or attention moved off sink tokens. |
| **Gaze (VLM)** | For vision-language models (shapes-vlm): a picture and a question; where the gaze moves word by word while the model reads the question (GIFT filmstrip and saliency), visual sinks, image-centric heads, VHD, and before \| after answers under VAR, GIFT or masked image attention, alone or over held-out scenes. |
| **Pattern atlas** | An autoencoder over many heads' maps, clustered: what kinds of head exist, where they sit by layer and model, before vs after an intervention. |
"""
)
shared.status_line(capture)
if capture is not None:
    shared.show_text(capture)
    st.page_link("pages/explorer.py", label="Open the attention explorer", icon=":material/search:")
