"""Re-sending the sidebar's values after a link switched its model (sidebar.page_model).

A value the server sets reaches the browser only in a run that draws its widget. When a rerun cut short the
run in which a link switched the sidebar's model (under load), the browser kept showing the widgets' own
defaults: the DiT page beside shapes-dit's picture showed SmolLM2, an empty prompt and 1 step, and Run would
have sampled that. So after a switch the values go with every run until one completes; not always, nor after
every set_fields: a value sent while someone types replaces what they typed (the explorer's Stop test failed
both ways).  The drafts also take their value as the widget's default (pages.sidebar.text_inputs): a browser
shows a widget it was never sent a value for at that default, and sends it back with the next rerun.  Without
it, it showed the widget's own defaults (an empty prompt, 1 step) when the values went in a run whose drawing
it never got (a clean-clone browser test, after the re-send above was in).  Every widget bound to the view
does the same (pages.shared.bind): Streamlit drops the messages of a run it cuts short that the browser has not
had yet (ForwardMsgQueue.clear when the next run starts), so any value set only in such a run can be lost.
"""
from __future__ import annotations

import streamlit as st

RESEND = "resend_widgets"  # sidebar.page_model changed widget values: send them with every run until one completes


def resend(key: str, value) -> None:
    """Give widget `key` its value before it is drawn: `value` when it has none, and while RESEND is on its own
    again, so the browser is sent it."""
    if key not in st.session_state or st.session_state.get(RESEND):
        st.session_state[key] = st.session_state.get(key, value)


def as_default(widget, args: tuple, kwargs: dict, value) -> dict:
    """`value` as the keyword that makes it `widget`'s own default (a selectbox's index, a segmented control's
    default, the others' value); nothing when the options do not hold it.  A keyed widget's identity leaves its
    default out, so the widget stays the same one as the value changes."""
    name = getattr(widget, "__name__", "")

    def given(position: int, keyword: str):
        return kwargs[keyword] if keyword in kwargs else args[position] if len(args) > position else None

    if name in ("selectbox", "segmented_control", "select_slider"):
        options = list(given(1, "options") or [])
        if value not in options:
            return {}
        return {"index": options.index(value)} if name == "selectbox" else \
            {"default": value} if name == "segmented_control" else {"value": value}
    if name in ("slider", "number_input"):  # a default out of its bounds is an error: then none
        low, high = given(1, "min_value"), given(2, "max_value")
        inside = isinstance(value, (int, float)) and (low is None or low <= value) and (high is None or value <= high)
        return {"value": value} if inside else {}
    if name == "checkbox":
        return {"value": bool(value)}
    if name in ("text_input", "text_area"):
        return {"value": value} if isinstance(value, str) else {}
    return {}


def run_completed() -> None:
    """The end of app.py's run: the values page_model changed have been sent."""
    st.session_state.pop(RESEND, None)


__all__ = ["RESEND", "as_default", "resend", "run_completed"]
