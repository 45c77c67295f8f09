"""Figures of the attribution page: the per-layer terms, the two prompts' tokens, and the head graph of one
prediction (analytics.attribution.HeadGraph).  Its layer x head maps are pictures (charts.pictures.metric_grid),
so the page paints before Plotly's bundle has loaded.

Pure: numpy arrays and dataclasses in, `go.Figure` out; no streamlit, no torch.
"""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from charts.theme import base_layout, plotly_text

UP, DOWN = "#c0392b", "#2471a3"  # pushes the answer up / down (the diverging scale's ends)
READS, PATH = "rgba(120, 120, 120, 0.45)", "#e67e22"  # a token a head reads; a sender -> receiver path


def layer_terms(heads: np.ndarray, mlps: np.ndarray, embed: float, bias: float, title: str = "",
                value_name: str = "DLA") -> go.Figure:
    """The logit (difference) split by where it is written: per layer the attention (sum of its heads,
    heads  # [layer, head]) and the MLP (mlps  # [layer]), plus the embedding and the biases."""
    heads, mlps = np.asarray(heads, dtype=np.float64), np.asarray(mlps, dtype=np.float64)
    layers = [str(l) for l in range(len(mlps))]
    fig = go.Figure([
        go.Bar(x=["emb", "bias"], y=[embed, bias], name="embedding / biases", marker_color="#7f8c8d",
               hovertemplate=f"%{{x}}<br>{value_name} %{{y:.4g}}<extra></extra>"),
        go.Bar(x=layers, y=heads.sum(axis=1), name="attention (sum of heads)", marker_color=UP,
               hovertemplate=f"layer %{{x}} attention<br>{value_name} %{{y:.4g}}<extra></extra>"),
        go.Bar(x=layers, y=mlps, name="MLP", marker_color=DOWN,
               hovertemplate=f"layer %{{x}} MLP<br>{value_name} %{{y:.4g}}<extra></extra>"),
    ])
    fig.update_layout(**base_layout(title, 300), barmode="group", bargap=0.15,
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    fig.update_xaxes(type="category", title="layer")
    fig.update_yaxes(title=value_name, zeroline=True)
    return fig


def graph_figure(graph, n_layers: int, n_tokens: int, selected: tuple[int, int] | None = None,
                 value_name: str = "attribution", height: int = 520) -> go.Figure:
    """The head graph (analytics.attribution.HeadGraph: nodes, edges) across layers: tokens on the left (by
    position), components in one column per layer that has any, the output on the right.
    Nodes are sized by |attribution| (red up, blue down); edges by weight (direct: to the output; grey:
    the tokens a head reads at the answer position, attention x |attribution|; orange: path patching).
    Nodes are clickable: customdata [layer, head, value] (head -1: an MLP)."""
    place: dict[str, tuple[float, float]] = {}
    tokens = sorted((n for n in graph.nodes if n.kind == "token"), key=lambda n: n.position)
    for node in tokens:
        place[node.id] = (0.0, 1.0 - node.position / max(n_tokens - 1, 1))
    by_layer: dict[int, list] = {}
    for node in graph.nodes:
        if node.kind in ("head", "mlp"):
            by_layer.setdefault(node.layer, []).append(node)
    layers = sorted(by_layer)  # one evenly spaced column per layer that has a component
    for column, layer in enumerate(layers, start=1):
        nodes = sorted(by_layer[layer], key=lambda n: -abs(n.value))
        step = min(0.2, 1.0 / len(nodes))
        for i, node in enumerate(nodes):
            place[node.id] = (float(column), 0.5 + ((i + 1) // 2) * (1 if i % 2 else -1) * step)
    place["out"] = (len(layers) + 1.0, 0.5)
    peak_edge = max((abs(e.weight) for e in graph.edges), default=1.0) or 1.0
    fig = go.Figure()
    for edge in sorted(graph.edges, key=lambda e: abs(e.weight)):
        if edge.source not in place or edge.target not in place:
            continue
        (x0, y0), (x1, y1) = place[edge.source], place[edge.target]
        colour = {"attention": READS, "path": PATH}.get(edge.kind, UP if edge.weight >= 0 else DOWN)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=colour, width=0.8 + 6 * abs(edge.weight) / peak_edge),
                                 opacity=0.85 if edge.kind != "attention" else 1.0))
    components = [n for n in graph.nodes if n.kind in ("head", "mlp")]
    peak = max((abs(n.value) for n in components), default=1.0) or 1.0
    for kind, symbol in (("mlp", "square"), ("head", "circle")):
        nodes = [n for n in components if n.kind == kind]
        if not nodes:
            continue
        outline = [3 if selected == (n.layer, n.head) else 1 for n in nodes]
        fig.add_trace(go.Scatter(
            x=[place[n.id][0] for n in nodes], y=[place[n.id][1] for n in nodes], mode="markers+text",
            marker=dict(size=[10 + 34 * np.sqrt(abs(n.value) / peak) for n in nodes], symbol=symbol,
                        color=[UP if n.value >= 0 else DOWN for n in nodes],
                        line=dict(color="#ff4b4b" if kind == "head" else "white", width=outline)),
            text=[n.label for n in nodes], textposition="top center", name=kind, showlegend=False,
            customdata=[[n.layer, n.head, n.value] for n in nodes],
            hovertemplate=f"%{{text}}<br>{value_name} %{{customdata[2]:.4g}}<extra></extra>",
        ))
    if tokens:
        fig.add_trace(go.Scatter(x=[place[n.id][0] for n in tokens], y=[place[n.id][1] for n in tokens],
                                 mode="markers+text", text=[plotly_text(n.label) for n in tokens], textposition="middle left",
                                 marker=dict(size=8, color="#7f8c8d"), hoverinfo="text", showlegend=False))
    out = graph.node("out")
    fig.add_trace(go.Scatter(x=[place["out"][0]], y=[place["out"][1]], mode="markers+text", showlegend=False,
                             text=[out.label if out else "output"], textposition="bottom center", hoverinfo="text",
                             marker=dict(size=18, symbol="diamond", color="#2c3e50")))
    fig.update_layout(**base_layout("", height), clickmode="event+select", dragmode=False)
    fig.update_xaxes(range=[-1.3, len(layers) + 1.6], title=f"layer (of {n_layers}; only layers with a component)",
                     zeroline=False, showgrid=False, tickvals=list(range(1, len(layers) + 1)),
                     ticktext=[f"L{layer}" for layer in layers])
    fig.update_yaxes(visible=False, range=[-0.15, 1.1])
    return fig


def token_pair_html(clean: list[str], corrupted: list[str], differs: list[int]) -> str:
    """The two prompts' tokens one above the other, the positions where they differ marked (escaped HTML)."""
    rows = []
    for label, tokens in (("clean", clean), ("corrupted", corrupted)):
        cells = [f'<span class="hs-label">{label}</span>']
        for i, token in enumerate(tokens):
            mark = "background: rgba(230, 126, 34, 0.35); outline: 1px solid #e67e22;" if i in differs else ""
            text = html.escape(token).replace(" ", "&nbsp;")
            cells.append(f'<span class="hs-tok" style="{mark}" title="{i}">{text}</span>')
        rows.append('<div class="hs-tokens">' + "".join(cells) + "</div>")
    return "".join(rows)


__all__ = ["graph_figure", "layer_terms", "token_pair_html"]
