"""One report folder per explained input: heatmaps of every layer's matrix, token relevance of every
method (full and S6-only matrices), and the exactness of each layer, as PNGs and plain HTML."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .explain import METHODS
from .recording import record


def progress(items: Iterable, *, desc: str, enabled: bool = True, total: int | None = None) -> Iterable:
    """``items`` with a progress bar on stderr when tqdm is installed and ``enabled``."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, desc=desc, total=total, leave=False)


def exactness_table(rec) -> str:
    """An HTML table: per block, its kind, view shape and ``‖A·x + bias − y‖ / ‖y‖``."""
    rows = []
    for r in rec:
        try:
            err = f"{r.output_error():.2e}"
        except Exception as exc:  # the real output may not be observable on this path
            err = html.escape(str(exc))
        rows.append(
            f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.kind)}</td>"
            f"<td>{tuple(r.attention.shape)}</td><td>{err}</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>exactness</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:left}</style></head><body>"
        "<h1>Exactness per block</h1><p>Relative error of <code>A·x + bias</code> against the block's real "
        "output before its output projection (Frobenius norms).</p><table><tr><th>block</th><th>kind</th>"
        f"<th>view shape</th><th>error</th></tr>{''.join(rows)}</table></body></html>"
    )


def build_report(
    model: nn.Module,
    inputs: dict[str, Any],
    tokens: Sequence[str],
    folder: str | Path,
    *,
    query: int = -1,
    target: Any = None,
    methods: Sequence[str] = ("raw", "rollout", "attribution", "grad_attention"),
    show_progress: bool = True,
    title: str = "implicit_hooks report",
) -> Path:
    """Explain batch row 0 of ``inputs`` at ``query`` and write the report; returns ``index.html``.

    Files: ``heatmaps.png`` (rows: layers at several depths; columns: full matrix, S6-only, without
    conv), ``relevance.html`` (tokens shaded by every method's relevance, hover shows the value),
    ``exactness.html`` and ``index.html`` linking them.
    """
    from . import viz

    with torch.no_grad(), record(model) as rec:
        model(**inputs)
    depths = viz.spread(len(rec), 3)
    columns = ["full", "S6 only", "without conv"]
    grid = []
    for i in progress(depths, desc="heatmaps", enabled=show_progress):
        view = rec[i].attention
        s6 = view.only("ssm") if rec[i].kind != "attention" else view
        no_conv = view.without("conv") if "conv" in view.components else view
        grid.append([v.mean(absolute=True, batch=[0])[0] for v in (view, s6, no_conv)])
    labels = [f"{rec[i].name} ({rec[i].kind})" for i in depths]
    figure = viz.heatmap_grid(grid, row_labels=labels, col_labels=columns, tokens=list(tokens), title=title)
    relevance = {}
    jobs = [(m, matrix) for m in methods for matrix in ("full", "s6")]
    for name, matrix in progress(jobs, desc="explanations", enabled=show_progress):
        method = METHODS[name](model, matrix=matrix)
        r = method.attribute(inputs, target=target, query=query)
        relevance[f"{name} ({'S6 only' if matrix == 's6' else 'full'})"] = r[0].float().cpu()
    L = len(tokens)
    page = viz.token_html(list(tokens), relevance, title=title, query=query % L)
    return viz.save_report(
        folder,
        pngs={"heatmaps": figure},
        html={"relevance": page, "exactness": exactness_table(rec)},
        title=title,
    )
