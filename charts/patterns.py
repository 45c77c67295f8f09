"""Figures of the pattern atlas: the 2-D map of maps, tiles of encoded maps, prototype gallery,
layer x head grids of the dominant cluster, profile shifts, layer composition and head profiles.

Pure: numpy arrays and lists in, `go.Figure` out; no streamlit, no torch.  The scatter uses WebGL
(`Scattergl`) and numeric customdata (map index first) so 10,000 points stay light, and Streamlit's
`on_select` reports the map index of each selected point in `customdata[0]`.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from charts.attention import click_targets
from charts.theme import ATTENTION_SCALE, METRIC_SCALE, base_layout

# distinct colours for clusters (Plotly's D3 + a few), cycled beyond 12
CLUSTER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#ad494a"]
SELECTED = "#ff4b4b"
TEXT_COLUMNS_HINT = ("text maps: rows = 32 query positions from start to end; columns 0–3 = the first four keys "
                     "(sink), 18 = the diagonal, 17 = the previous token, 4–16 = further back (log bins), "
                     "19–31 = keys ahead (encoders)")
VISION_HINT = ("image maps: the query patch's attention on the patch grid, re-centred on the query patch "
               "(centre = itself); the bottom row = attention to CLS / non-patch tokens")


def cluster_colour(c: int) -> str:
    return CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)] if c >= 0 else "#bbbbbb"


def scatter(xy: np.ndarray, values: np.ndarray, names: list[str] | None = None, hover: np.ndarray | None = None,
            hover_text: list[str] | None = None, selected: np.ndarray | None = None, title: str = "",
            colour_title: str = "", colours: list[str] | None = None, height: int = 600) -> go.Figure:
    """The atlas: one point per map at its 2-D embedding.

    values  # [map]: int category codes with `names` (one trace per category, so the legend names
    them and toggles them), or floats without `names` (one trace, colour bar).  hover  # [map, 4] ints
    (layer, head, query, source) and hover_text  # [map] (the input each map comes from) go in the
    tooltip; customdata[0] is the map index.  `selected` (map indices) are drawn solid, the rest faint.
    """
    xy = np.asarray(xy, dtype=np.float32)
    n = len(xy)
    idx = np.arange(n)
    extra = np.zeros((n, 4), np.int64) if hover is None else np.asarray(hover, dtype=np.int64)
    custom = np.concatenate([idx[:, None], extra], 1)
    text = np.asarray(hover_text if hover_text is not None else [""] * n, dtype=object)
    template = ("map %{customdata[0]}<br>layer %{customdata[1]}, head %{customdata[2]}"
                "<br>%{text}<extra>%{fullData.name}</extra>")
    chosen = None if selected is None or len(selected) == 0 else np.zeros(n, bool)
    if chosen is not None:
        chosen[np.asarray(selected, dtype=np.int64)] = True
    fig = go.Figure()
    marker_size = 5 if n > 3000 else 7
    if names is not None:
        codes = np.asarray(values, dtype=np.int64)
        for c, name in enumerate(names):
            members = idx[codes == c]
            if members.size == 0:
                continue
            trace = go.Scattergl(
                x=xy[members, 0], y=xy[members, 1], mode="markers", name=name, customdata=custom[members],
                text=text[members], hovertemplate=template,
                marker=dict(size=marker_size, color=(colours or CLUSTER_COLOURS)[c % len(colours or CLUSTER_COLOURS)],
                            line=dict(width=0)),
                unselected=dict(marker=dict(opacity=0.12)), selected=dict(marker=dict(opacity=1.0, size=marker_size + 3)),
            )
            if chosen is not None:
                trace.selectedpoints = np.flatnonzero(chosen[members]).tolist()
            fig.add_trace(trace)
        fig.update_layout(legend=dict(title=dict(text=colour_title), itemsizing="constant", orientation="v",
                                      x=1.01, y=1.0, xanchor="left", font=dict(size=12)))
    else:
        v = np.asarray(values, dtype=np.float32)
        trace = go.Scattergl(
            x=xy[:, 0], y=xy[:, 1], mode="markers", name=colour_title or "value", customdata=custom, text=text,
            hovertemplate=template.replace("<extra>", f"<br>{colour_title} %{{marker.color:.3g}}<extra>"),
            marker=dict(size=marker_size, color=v, colorscale=METRIC_SCALE, line=dict(width=0),
                        colorbar=dict(title=dict(text=colour_title, side="right"), thickness=12)),
            unselected=dict(marker=dict(opacity=0.12)), selected=dict(marker=dict(opacity=1.0)), showlegend=False,
        )
        if chosen is not None:
            trace.selectedpoints = np.flatnonzero(chosen).tolist()
        fig.add_trace(trace)
    fig.update_layout(**base_layout(title=title, height=height), dragmode="lasso", clickmode="event+select",
                      uirevision="atlas")
    fig.update_layout(margin=dict(l=10, r=10, t=50 if title else 20, b=10))
    fig.update_xaxes(title="UMAP 1", showticklabels=False, zeroline=False)
    fig.update_yaxes(title="UMAP 2", showticklabels=False, zeroline=False, scaleanchor=None)
    return fig


def tiles(images: np.ndarray, titles: list[str], cols: int = 6, row_titles: list[str] | None = None,
          title: str = "", tile_px: int = 84) -> go.Figure:
    """Encoded maps side by side, as ONE heatmap (a mosaic with gaps): fast for dozens of tiles.

    images  # [n, SIZE, SIZE] in mass units; shown as sqrt(mass) scaled to each tile's max, so the
    structure shows whatever the weights.  `titles` go above each tile; with `row_titles`, tiles are
    laid out `cols` per row and each row gets a title on its left.  The figure has a fixed size
    (tiles of `tile_px` pixels): show it with st.plotly_chart(..., width="content")."""
    imgs = np.sqrt(np.clip(np.asarray(images, dtype=np.float32), 0, None))
    n = len(imgs)
    size = imgs.shape[-1] if n else 32
    rows = max(1, -(-n // cols))
    gap = 6
    top = 12  # room for a tile's title
    cell_w, cell_h = size + gap, size + gap + top
    z = np.full((rows * cell_h, cols * cell_w - gap), np.nan, dtype=np.float32)
    annotations = []
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        peak = float(np.nanmax(img)) if np.isfinite(img).any() and np.nanmax(img) > 0 else 1.0
        y0, x0 = r * cell_h + top, c * cell_w
        z[y0 : y0 + size, x0 : x0 + size] = img / peak
        if i < len(titles) and titles[i]:
            annotations.append(dict(x=x0 + size / 2 - 0.5, y=y0 - 1, text=titles[i], showarrow=False,
                                    yanchor="bottom", xanchor="center", font=dict(size=11)))
    if row_titles:
        for r, text in enumerate(row_titles[:rows]):
            annotations.append(dict(x=0, xref="paper", xshift=-6, y=r * cell_h + top + size / 2, text=text,
                                    showarrow=False, xanchor="right", yanchor="middle", font=dict(size=12),
                                    align="right"))
    fig = go.Figure(go.Heatmap(z=z, colorscale=ATTENTION_SCALE, zmin=0, zmax=1, hoverongaps=False,
                               showscale=False, hovertemplate="row %{y}, column %{x}<br>√mass / tile max %{z:.2f}"
                                                              "<extra></extra>"))
    unit = tile_px / size  # pixels per map cell
    left = 10 if not row_titles else 16 + int(6.6 * max(len(t) for t in row_titles))
    margin = dict(l=left, r=10, t=50 if title else 10, b=10)
    layout = base_layout(title=title, height=int(rows * cell_h * unit) + margin["t"] + margin["b"])
    layout.update(margin=margin, width=int((cols * cell_w - gap) * unit) + margin["l"] + margin["r"])
    fig.update_layout(**layout, annotations=annotations)
    fig.update_yaxes(autorange="reversed", visible=False, range=[rows * cell_h - 0.5, -0.5])
    fig.update_xaxes(visible=False, range=[-0.5, cols * cell_w - gap - 0.5])
    return fig


def prototype_gallery(prototypes: np.ndarray, nearest: np.ndarray, images: np.ndarray, names: list[str],
                      counts: list[int], title: str = "") -> go.Figure:
    """One row per cluster: its decoded centre, then the maps nearest to it.

    prototypes  # [k, SIZE, SIZE]; nearest  # [k, m] map indices (-1 = none) into images  # [map, SIZE, SIZE]."""
    k, m = nearest.shape
    size = prototypes.shape[-1] if k else 32
    tiles_, titles = [], []
    for c in range(k):
        tiles_.append(prototypes[c])
        titles.append("<b>centre</b>")
        for j in range(m):
            i = nearest[c, j]
            tiles_.append(images[i] if i >= 0 else np.full((size, size), np.nan))
            titles.append(f"map {i}" if i >= 0 else "")
    rows = [f"{c}: {names[c]} ({counts[c]:,})" for c in range(k)]
    return tiles(np.asarray(tiles_).reshape(-1, size, size) if tiles_ else np.zeros((0, size, size)), titles,
                 cols=m + 1, row_titles=rows, title=title, tile_px=76)


def _discrete_scale(k: int) -> list:
    """A stepwise colour scale for integer z in 0..k-1 (each integer its cluster colour)."""
    if k <= 1:
        return [[0, cluster_colour(0)], [1, cluster_colour(0)]]
    scale = []
    for c in range(k):
        lo, hi = c / k, (c + 1) / k
        scale += [[lo, cluster_colour(c)], [hi, cluster_colour(c)]]
    return scale


def dominant_grid(cluster: np.ndarray, share: np.ndarray, names: list[str], title: str = "",
                  selected: tuple[int, int] | None = None, height: int | None = None) -> go.Figure:
    """cluster  # [layer, head] int (-1 = no maps): each head coloured by its most frequent cluster;
    the hover gives that cluster's share of the head's maps.  Cells are clickable (customdata = [layer, head])."""
    L, H = cluster.shape
    k = max(len(names), 1)
    z = np.where(cluster >= 0, cluster, np.nan).astype(np.float64)
    label = np.asarray([[names[c] if c >= 0 else "no maps" for c in row] for row in cluster], dtype=object)
    text = np.where(np.isfinite(share), np.char.mod("%.0f%%", np.nan_to_num(share) * 100), "")
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(H)), y=list(range(L)), zmin=-0.5, zmax=k - 0.5, colorscale=_discrete_scale(k),
        customdata=np.dstack([label, text]), xgap=1, ygap=1, showscale=False,
        hovertemplate="layer %{y}, head %{x}<br>%{customdata[0]}: %{customdata[1]} of its maps<extra></extra>",
    ))
    fig.add_trace(click_targets(np.arange(H), np.arange(L), "layer %{customdata[0]}, head %{customdata[1]}",
                                size=max(6, 260 // max(H, 1))))
    present = sorted({int(c) for c in np.unique(cluster) if c >= 0})
    for c in present:  # legend entries (the heatmap itself has none): only the clusters that lead a head
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=names[c], showlegend=True,
                                 marker=dict(size=11, symbol="square", color=cluster_colour(c)), hoverinfo="skip"))
    if selected is not None:
        layer, head = selected
        if 0 <= layer < L and 0 <= head < H:
            fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                          line=dict(color=SELECTED, width=3))
    fig.update_layout(**base_layout(title, height or max(320, 17 * L + 60 + 20 * len(present))),
                      clickmode="event+select", dragmode=False,
                      legend=dict(orientation="h", y=-60 / max(200, 17 * L), yanchor="top", x=0, font=dict(size=11)))
    fig.update_yaxes(range=[L - 0.5, -0.5], title="layer", dtick=max(1, L // 15), showgrid=False, zeroline=False)
    fig.update_xaxes(range=[-0.5, H - 0.5], title="head", dtick=1 if H <= 16 else max(1, H // 16), showgrid=False,
                     zeroline=False)
    return fig


def shift_grid(shift: np.ndarray, title: str = "", selected: tuple[int, int] | None = None) -> go.Figure:
    """shift  # [layer, head] in [0, 1]: how far each head's cluster mix moved (total variation)."""
    L, H = shift.shape
    fig = go.Figure(go.Heatmap(
        z=shift, x=list(range(H)), y=list(range(L)), zmin=0, zmax=1, colorscale=METRIC_SCALE, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="profile change (TV)", side="right"), thickness=12),
        hovertemplate="layer %{y}, head %{x}<br>profile change %{z:.2f}<extra></extra>",
    ))
    fig.add_trace(click_targets(np.arange(H), np.arange(L), "layer %{customdata[0]}, head %{customdata[1]}",
                                size=max(6, 260 // max(H, 1))))
    if selected is not None and 0 <= selected[0] < L and 0 <= selected[1] < H:
        fig.add_shape(type="rect", x0=selected[1] - 0.5, x1=selected[1] + 0.5, y0=selected[0] - 0.5,
                      y1=selected[0] + 0.5, line=dict(color=SELECTED, width=3))
    fig.update_layout(**base_layout(title, max(300, 17 * L + 90)), clickmode="event+select", dragmode=False)
    fig.update_yaxes(range=[L - 0.5, -0.5], title="layer", dtick=max(1, L // 15), showgrid=False, zeroline=False)
    fig.update_xaxes(range=[-0.5, H - 0.5], title="head", dtick=1 if H <= 16 else max(1, H // 16), showgrid=False,
                     zeroline=False)
    return fig


def composition(per_group: dict[str, np.ndarray], names: list[str], title: str = "") -> go.Figure:
    """How each layer splits over the clusters, one panel per group (model · intervention).

    per_group: {group: [layer, k] mean profile of the layer's heads}; stacked bars, legend once."""
    groups = list(per_group)
    fig = make_subplots(rows=1, cols=max(1, len(groups)), shared_yaxes=True, subplot_titles=groups,
                        horizontal_spacing=0.04)
    seen: set[str] = set()
    for g, group in enumerate(groups):
        comp = np.nan_to_num(per_group[group])
        layers = np.arange(comp.shape[0])
        for c, name in enumerate(names):
            if not comp[:, c].any():
                continue
            shown = name in seen
            seen.add(name)
            fig.add_trace(go.Bar(x=layers, y=comp[:, c], name=name, legendgroup=name, showlegend=not shown,
                                 marker_color=cluster_colour(c),
                                 hovertemplate=f"layer %{{x}}<br>{name}: %{{y:.0%}}<extra>{group}</extra>"),
                          row=1, col=g + 1)
        fig.update_xaxes(title_text="layer", row=1, col=g + 1)
    fig.update_layout(**base_layout(title, 380), barmode="stack", bargap=0.05,
                      legend=dict(orientation="h", y=-0.25, x=0, font=dict(size=11)))
    fig.update_layout(margin=dict(l=10, r=10, t=60 if title else 40, b=10))
    fig.update_yaxes(title_text="share of heads", tickformat=".0%", range=[0, 1], row=1, col=1)
    for ann in fig.layout.annotations:  # subplot titles: long group names must not overlap
        ann.font = dict(size=11)
    return fig


def head_profile(profiles: np.ndarray, labels: list[str], names: list[str], title: str = "") -> go.Figure:
    """One head's distribution over the clusters, one horizontal stacked bar per input (plus "all").

    profiles  # [row, k] shares; labels  # [row] what each bar is."""
    fig = go.Figure()
    short = [lab if len(lab) <= 40 else lab[:39] + "…" for lab in labels]
    present = [c for c in range(len(names)) if np.nansum(profiles[:, c]) > 0]
    for c in present:
        name = names[c]
        fig.add_trace(go.Bar(y=short, x=np.nan_to_num(profiles[:, c]), name=name, orientation="h",
                             marker_color=cluster_colour(c),
                             hovertemplate=f"%{{y}}<br>{name}: %{{x:.0%}}<extra></extra>"))
    fig.update_layout(**base_layout(title, max(240, 28 * len(labels) + 80 + 22 * len(present))), barmode="stack",
                      legend=dict(orientation="h", y=-0.08, yanchor="top", x=0, font=dict(size=11),
                                  traceorder="normal"))
    fig.update_xaxes(tickformat=".0%", range=[0, 1], side="top")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


__all__ = ["scatter", "tiles", "prototype_gallery", "dominant_grid", "shift_grid", "composition", "head_profile",
           "cluster_colour", "CLUSTER_COLOURS"]
