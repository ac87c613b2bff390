"""Pictures of implicit attention: heatmap grids, token relevance as HTML, patch-grid overlays.

Pure functions over tensors and arrays; they know nothing of HF models, patchers or recordings::

    from implicit_hooks import viz

    fig = viz.heatmap_grid(
        [[A0_full, A0_ssm], [A5_full, A5_ssm]],        # [rows][cols] of (L, L)
        row_labels=["layer 0", "layer 5"], col_labels=["full", "S6 only"], path="grid.png")
    page = viz.token_html(tokens, relevance)            # one self-contained HTML document
    fig = viz.patch_overlay(relevance, grid=(14, 14), cls_position=0, image=img)
    index = viz.save_report("report", pngs={"grid": fig}, html={"tokens": page})

Figures are :class:`matplotlib.figure.Figure` objects built without ``pyplot``: the user's backend and
pyplot state are left alone, and saving uses Agg. Importing this module does not import matplotlib
either; the figure functions import it on first use, so :func:`token_html` works without it.

Pixel sizes are predictable (no tight bounding box): a :func:`heatmap_grid` PNG is exactly
:func:`grid_pixels` ``(rows, cols, panel_size, dpi)`` and a :func:`patch_overlay` PNG exactly
:func:`overlay_pixels` ``(grid, image, size, dpi)`` pixels (width, height).
"""

from __future__ import annotations

import html as _html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "grid_pixels",
    "heatmap_grid",
    "overlay_pixels",
    "patch_overlay",
    "save_report",
    "spread",
    "token_html",
    "visible_token",
]

#: Margins of a heatmap grid in inches: row labels (left), colour bars (right), title and column
#: labels (top), bottom. A grid is ``cols · panel_size + 1.5`` by ``rows · panel_size + 1.0`` inches.
GRID_MARGINS = {"left": 0.6, "right": 0.9, "top": 0.8, "bottom": 0.2}
#: Margins of a patch overlay in inches: the map is ``size`` wide, the colour bar sits to its right.
OVERLAY_MARGINS = {"left": 0.1, "right": 0.9, "top": 0.6, "bottom": 0.1}

_SIGNED_CMAP = "RdBu_r"
_POSITIVE_CMAP = "viridis"
_OVERLAY_CMAP = "inferno"
# End colours of the HTML shading (those of RdBu): positive relevance red, negative blue.
_RED = (178, 24, 43)
_BLUE = (33, 102, 172)
_CONTROL_NAMES = {"\n": "↵", "\t": "⇥", "\r": "␍", "\x7f": "␡"}


# ----------------------------------------------------------------------------------------- helpers


def _array(x: Any, what: str) -> np.ndarray:
    """A float64 numpy copy of a tensor (any device, grad, dtype) or array-like."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it here
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"{what}: expected real numbers, got a {x.dtype} tensor")
        x = x.double().numpy()
    try:
        out = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what}: expected a tensor or array of real numbers, got {type(x).__name__}"
        ) from err
    return out


def visible_token(token: str) -> str:
    """The token with whitespace and control characters made visible.

    ``"\\n"`` → ``"↵"``, ``"\\t"`` → ``"⇥"``, other control characters → their Unicode control
    pictures (``"\\x00"`` → ``"␀"``), a token of spaces only → ``"␣"`` per space, ``""`` → ``"∅"``.
    Leading and inner spaces of other tokens are kept (``" the"`` stays ``" the"``).

    >>> visible_token("\\n"), visible_token("  "), visible_token(" a\\tb")
    ('↵', '␣␣', ' a⇥b')
    """
    if token == "":
        return "∅"
    if token.strip(" ") == "":
        return "␣" * len(token)
    out = []
    for ch in token:
        if ch in _CONTROL_NAMES:
            out.append(_CONTROL_NAMES[ch])
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))
        else:
            out.append(ch)
    return "".join(out)


def spread(n: int, k: int = 3) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (layers at several depths).

    >>> spread(24, 3), spread(2, 3)
    ([0, 12, 23], [0, 1])
    """
    if n <= 0 or k <= 0:
        raise ValueError(f"spread needs n > 0 and k > 0, got n={n}, k={k}")
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _format(value: float, precision: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{precision}g}"


def _matplotlib():
    try:
        import matplotlib
        import matplotlib.colors
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'implicit_hooks[viz]'") from err
    return matplotlib, Figure


def _colormap(cmap: Any, default: str):
    matplotlib, _ = _matplotlib()
    cmap = default if cmap is None else cmap
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    return cmap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # masked (causal) entries: transparent


def _limits(values: list[np.ndarray], signed: bool, clip: float | None) -> tuple[float, float]:
    """Colour limits of a group of panels: ``[-m, m]`` when signed, else ``[0, m]``; ``m`` the largest
    absolute finite value, or its ``clip`` quantile."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = np.concatenate(finite) if finite else np.zeros(0)
    if finite.size == 0:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    mag = np.abs(finite)
    top = float(np.quantile(mag, clip)) if clip is not None else float(mag.max())
    top = top if top > 0 else 1.0
    return (-top, top) if signed else (0.0, top)


def _colorbar(fig: Figure, image: Any, cax: Any, fontsize: float) -> None:
    """A colour bar with five ticks evenly spaced in colour (also under a power-law norm)."""
    bar = fig.colorbar(image, cax=cax)
    lo, hi = image.get_clim()
    gamma = getattr(image.norm, "gamma", 1.0)
    ticks = [lo + (hi - lo) * (k / 4) ** (1 / gamma) for k in range(5)]
    bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    bar.ax.tick_params(labelsize=fontsize)


def _save_png(fig: Figure, path: str | os.PathLike, dpi: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower() or "png"
    fig.savefig(path, dpi=dpi, format=fmt, facecolor="white")


# ------------------------------------------------------------------------------------ heatmap grid


def grid_pixels(rows: int, cols: int, *, panel_size: float = 2.5, dpi: float = 100) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a :func:`heatmap_grid` PNG.

    ``width = round(dpi · (cols · panel_size + 1.5))``, ``height = round(dpi · (rows · panel_size + 1.0))``:
    each panel is a ``panel_size``-inch square cell (ticks and per-panel colour bars inside it), plus
    fixed margins for row labels and colour bars (1.5 in) and for the title and column labels (1.0 in).

    >>> grid_pixels(3, 2)
    (650, 850)
    """
    m = GRID_MARGINS
    return (
        round(dpi * (cols * panel_size + m["left"] + m["right"])),
        round(dpi * (rows * panel_size + m["top"] + m["bottom"])),
    )


def heatmap_grid(
    maps: Sequence[Sequence[Any]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    cmap: Any = None,
    scale: str = "row",
    signed: bool | None = None,
    clip: float | None = None,
    gamma: float = 1.0,
    panel_size: float = 2.5,
    dpi: float = 100,
    max_token_ticks: int = 32,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A grid of causal attention heatmaps: ``maps[i][j]`` of shape ``(L, L)`` in row ``i``, column ``j``.

    Typically rows are layers at several depths (see :func:`spread`) and columns models or ablations
    (full / S6 only / without conv). Entry ``[t, s]`` is drawn at row ``t`` (query, top to bottom),
    column ``s`` (key, left to right); the causal upper triangle ``s > t`` is left blank.

    Args:
        maps: nested sequence ``[rows][cols]`` of ``(L, L)`` tensors (any device or dtype) or arrays;
            ``None`` leaves a panel empty. ``L`` may differ between panels.
        row_labels, col_labels: one label per row / column.
        tokens: ``L`` token strings shared by all panels, or one list per column; used as tick labels
            when ``L ≤ max_token_ticks`` (positions are shown otherwise). Whitespace is made visible
            (:func:`visible_token`); no mathtext is parsed.
        cmap: a matplotlib colormap or its name; default ``"RdBu_r"`` (centred on 0) when signed,
            else ``"viridis"``.
        scale: colour limits per ``"panel"``, per ``"row"`` (layer; compares columns) or ``"shared"``
            by all panels. Non-negative maps use ``[0, m]``, signed maps ``[-m, m]``, with ``m`` the
            largest absolute value in the group (or its ``clip`` quantile, e.g. ``0.99``, when a large
            diagonal would wash out the rest).
        signed: force the signed (diverging) scale; default: whether any entry is negative.
        gamma: a power-law colour scale ``(v / m) ** gamma`` for non-negative maps (``0.5`` lifts the
            exponentially decaying entries far from the diagonal); ``1`` is linear.
        panel_size, dpi: the cell of one panel in inches and the resolution. The PNG is exactly
            :func:`grid_pixels` ``(rows, cols, panel_size=..., dpi=...)`` pixels:
            ``(round(dpi·(cols·panel_size + 1.5)), round(dpi·(rows·panel_size + 1.0)))``.
        path: when given, the figure is also saved there (PNG unless the suffix says otherwise).

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot). Its heatmap axes carry the label
        ``"heatmap[i][j]"`` (``fig.axes`` order is row-major over non-empty panels).

    Example:
        >>> import torch
        >>> A = torch.rand(2, 3, 13, 13).tril()
        >>> fig = heatmap_grid(A, row_labels=["layer 0", "layer 7"], col_labels=["full", "S6", "no conv"])
        >>> fig.get_size_inches().tolist()
        [9.0, 6.0]
    """
    if scale not in ("panel", "row", "shared"):
        raise ValueError(f"scale must be 'panel', 'row' or 'shared', got {scale!r}")
    if clip is not None and not 0.0 < clip <= 1.0:
        raise ValueError(f"clip is a quantile in (0, 1], got {clip}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if panel_size < 1.0:
        raise ValueError(f"panel_size must be at least 1 inch, got {panel_size}")
    grid = [
        [None if m is None else _array(m, f"maps[{i}][{j}]") for j, m in enumerate(row)]
        for i, row in enumerate(maps)
    ]
    nrows = len(grid)
    if nrows == 0:
        raise ValueError("maps is empty: expected a nested sequence [rows][cols] of (L, L) matrices")
    ncols = len(grid[0])
    for i, row in enumerate(grid):
        if len(row) != ncols:
            raise ValueError(
                f"maps row {i} has {len(row)} panels, row 0 has {ncols}: rows must be equally long"
            )
        for j, m in enumerate(row):
            if m is not None and (m.ndim != 2 or m.shape[0] != m.shape[1]):
                raise ValueError(
                    f"maps[{i}][{j}] has shape {tuple(m.shape)}, expected a square (L, L) matrix"
                )
    if ncols == 0:
        raise ValueError("maps has rows without panels")
    if len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row_labels for {nrows} rows of maps")
    if len(col_labels) != ncols:
        raise ValueError(f"{len(col_labels)} col_labels for {ncols} columns of maps")
    col_tokens = _column_tokens(tokens, grid, ncols)

    matplotlib, Figure = _matplotlib()
    signed = (
        any(bool((m < 0).any()) for row in grid for m in row if m is not None) if signed is None else signed
    )
    if signed and gamma != 1.0:
        raise ValueError("gamma applies to non-negative maps; for signed maps use clip, or pass |A|")
    colormap = _colormap(cmap, _SIGNED_CMAP if signed else _POSITIVE_CMAP)
    causal = [
        [None if m is None else np.where(np.tri(len(m), dtype=bool), m, np.nan) for m in row] for row in grid
    ]

    def lower(m):  # values of the lower triangle (diagonal included), for the colour limits
        return m[np.tril_indices(len(m))]

    panels = [(i, j) for i in range(nrows) for j in range(ncols) if grid[i][j] is not None]
    if scale == "shared":
        lim = _limits([lower(grid[i][j]) for i, j in panels], signed, clip)
        limits = {p: lim for p in panels}
    elif scale == "row":
        row_lim = [_limits([lower(m) for m in row if m is not None], signed, clip) for row in grid]
        limits = {(i, j): row_lim[i] for i, j in panels}
    else:
        limits = {(i, j): _limits([lower(grid[i][j])], signed, clip) for i, j in panels}

    width, height = grid_pixels(nrows, ncols, panel_size=panel_size, dpi=dpi)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    W, H = width / dpi, height / dpi  # inches
    m = GRID_MARGINS

    def box(x, y, w, h):  # inches from the bottom left → figure fraction
        return [x / W, y / H, w / W, h / H]

    labelled = any(t is not None and len(t) <= max_token_ticks for t in col_tokens)
    pad_lb = 0.5 if labelled else 0.3  # room for tick labels, left and bottom
    pad_r = 0.1 + (0.3 if scale == "panel" else 0.0)
    pad_t = 0.1
    side = min(panel_size - pad_lb - pad_r, panel_size - pad_lb - pad_t)

    def bottom(i):  # the square of row i hangs from the top of its cell; spare room goes to the ticks
        return m["bottom"] + (nrows - i) * panel_size - pad_t - side

    images = {}
    for i, j in panels:
        A = causal[i][j]
        L = len(A)
        x0, y0 = m["left"] + j * panel_size + pad_lb, bottom(i)
        ax = fig.add_axes(box(x0, y0, side, side), label=f"heatmap[{i}][{j}]")
        vmin, vmax = limits[(i, j)]
        norm = matplotlib.colors.PowerNorm(gamma, vmin=vmin, vmax=vmax, clip=True) if gamma != 1.0 else None
        images[(i, j)] = ax.imshow(
            A,
            cmap=colormap,
            norm=norm,
            vmin=None if norm else vmin,
            vmax=None if norm else vmax,
            interpolation="nearest",
            aspect="equal",
        )
        toks = col_tokens[j]
        if toks is not None and L <= max_token_ticks:
            # every token while a label fits in 4 pt or more, else every stride-th token
            stride = math.ceil(L / max(1, math.floor(72 * side * 0.75 / 4)))
            ticks = list(range(0, L, stride))
            labels = [visible_token(toks[t]) for t in ticks]
            size = float(np.clip(72 * side / len(ticks) * 0.75, 4, 8))
            ax.set_xticks(ticks, labels, rotation=90, fontsize=size, parse_math=False)
            ax.set_yticks(ticks, labels, fontsize=size, parse_math=False)
        else:
            ticks = sorted({0, (L - 1) // 2, L - 1})
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6)
            ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=6)
        ax.tick_params(length=2, pad=1)
        if scale == "panel":
            cax = fig.add_axes(box(x0 + side + 0.08, y0, 0.1, side), label=f"colorbar[{i}][{j}]")
            _colorbar(fig, images[(i, j)], cax, 6)
    right = m["left"] + ncols * panel_size + 0.15
    if scale == "shared" and panels:
        span = bottom(0) + side - bottom(nrows - 1)
        cax = fig.add_axes(box(right, bottom(nrows - 1), 0.15, span), label="colorbar")
        _colorbar(fig, images[panels[0]], cax, 7)
    elif scale == "row":
        for i in range(nrows):
            first = next((images[(i, j)] for j in range(ncols) if (i, j) in images), None)
            if first is not None:
                cax = fig.add_axes(box(right, bottom(i), 0.15, side), label=f"colorbar[{i}]")
                _colorbar(fig, first, cax, 7)
    for i, label in enumerate(row_labels):
        y = bottom(i) + side / 2
        fig.text(
            0.3 / W, y / H, str(label), rotation=90, ha="center", va="center", fontsize=10, parse_math=False
        )
    for j, label in enumerate(col_labels):
        x = m["left"] + j * panel_size + pad_lb + side / 2
        y = bottom(0) + side + 0.08
        fig.text(x / W, y / H, str(label), ha="center", va="bottom", fontsize=10, parse_math=False)
    if title is not None:
        fig.text(0.5, 1 - 0.3 / H, str(title), ha="center", va="center", fontsize=12, parse_math=False)
    if path is not None:
        _save_png(fig, path, dpi)
    return fig


def _column_tokens(tokens, grid, ncols) -> list[list[str] | None]:
    """Tokens per column (shared or one list per column), checked against the panels' ``L``."""
    if tokens is None:
        return [None] * ncols
    tokens = list(tokens)
    per_column = len(tokens) > 0 and isinstance(tokens[0], (list, tuple))
    if per_column and len(tokens) != ncols:
        raise ValueError(
            f"tokens has {len(tokens)} lists for {ncols} columns (pass one list per column, or one list)"
        )
    cols = [list(t) if t is not None else None for t in tokens] if per_column else [tokens] * ncols
    for j, toks in enumerate(cols):
        if toks is not None and not all(isinstance(t, str) for t in toks):
            raise TypeError(f"tokens must be strings (column {j})")
        for i, row in enumerate(grid):
            if toks is not None and row[j] is not None and len(row[j]) != len(toks):
                raise ValueError(
                    f"maps[{i}][{j}] is {len(row[j])} × {len(row[j])} but column {j} has {len(toks)} tokens"
                )
    return cols


# -------------------------------------------------------------------------------------- token HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
.row { margin: 0.8em 0 1.2em; }
.label { font-weight: 600; margin-bottom: 0.3em; }
.scale { font-weight: normal; color: #666; font-size: 0.85em; margin-left: 0.6em; }
.tokens { line-height: 2.1; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
.tok { position: relative; white-space: pre; padding: 0.15em 0.05em; margin: 0 1px; border-radius: 3px;
       border: 1px solid #ddd; }
.tok.query { outline: 2px solid #000; }
.tok:hover { border-color: #000; }
.tok:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 100%; z-index: 1;
       background: #222; color: #fff; padding: 0.1em 0.4em; border-radius: 3px; font-size: 0.8em;
       white-space: pre; pointer-events: none; }
.legend { display: inline-block; width: 12em; height: 0.8em; vertical-align: middle;
          border: 1px solid #ccc; margin: 0 0.4em; }
.note { color: #666; font-size: 0.85em; }
"""


def _shade(t: float, colour: tuple[int, int, int]) -> str:
    """White mixed with ``colour`` by ``t ∈ [0, 1]``, as CSS."""
    r, g, b = (round(255 + t * (c - 255)) for c in colour)
    return f"rgb({r}, {g}, {b})"


def token_html(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    relevance: Any,
    *,
    title: str | None = None,
    colormap: str = "signed",
    precision: int = 3,
    labels: Sequence[str] | None = None,
    normalize: str = "row",
    query: int | None = None,
) -> str:
    """One self-contained HTML page of tokens shaded by relevance; hovering a token shows its value.

    Args:
        tokens: ``L`` token strings shared by every row, or one list per row (rows of different texts).
        relevance: ``(L,)`` for one row, ``(R, L)`` for ``R`` rows (methods, batch items), a sequence of
            1-D rows, or a mapping ``{label: (L,)}``; tensors on any device or arrays.
        colormap: ``"signed"``: positive red, negative blue, white at 0, intensity ``|r| / max|r|``;
            ``"positive"``: red by ``max(r, 0) / max r``, negative values left white.
        precision: significant digits of the values shown on hover (``title`` attribute and a CSS tooltip).
        labels: one label per row (default: the mapping's keys, else ``"row i"``).
        normalize: the intensity scale per ``"row"`` or shared by the whole ``"page"``.
        query: a position outlined in every row (e.g. the query token of the explanation); negative
            values count from the end.

    Tokens are HTML-escaped; whitespace and control characters are made visible (``"\\n"`` → ``"↵"``,
    see :func:`visible_token`). No scripts, no external assets: inline CSS only.

    Example:
        >>> page = token_html(["a", "<b>", "\\n"], [0.5, -1.0, 0.25], title="demo")
        >>> "&lt;b&gt;" in page and "-1" in page and "↵" in page
        True
    """
    if colormap not in ("signed", "positive"):
        raise ValueError(f"colormap must be 'signed' or 'positive', got {colormap!r}")
    if normalize not in ("row", "page"):
        raise ValueError(f"normalize must be 'row' or 'page', got {normalize!r}")
    if isinstance(relevance, Mapping):
        labels = list(relevance.keys()) if labels is None else labels
        rows = [_array(v, f"relevance[{k!r}]") for k, v in relevance.items()]
    else:
        arr = None if isinstance(relevance, (list, tuple)) else _array(relevance, "relevance")
        if arr is not None and arr.ndim in (1, 2):
            rows = [arr] if arr.ndim == 1 else list(arr)
        elif arr is not None:
            raise ValueError(f"relevance has shape {tuple(arr.shape)}, expected (L,) or (rows, L)")
        elif len(relevance) > 0 and np.ndim(_array(relevance[0], "relevance[0]")) == 0:
            rows = [_array(relevance, "relevance")]
        else:
            rows = [_array(r, f"relevance[{i}]") for i, r in enumerate(relevance)]
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"relevance row {i} has shape {tuple(r.shape)}, expected (L,)")
    labels = [f"row {i}" for i in range(len(rows))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows of relevance")
    tokens = list(tokens)
    per_row = len(tokens) > 0 and isinstance(tokens[0], (list, tuple))
    if per_row and len(tokens) != len(rows):
        raise ValueError(f"tokens has {len(tokens)} lists for {len(rows)} rows of relevance")
    row_tokens = [list(t) for t in tokens] if per_row else [tokens] * len(rows)
    for i, (toks, r) in enumerate(zip(row_tokens, rows)):
        if len(toks) != len(r):
            raise ValueError(f"relevance row {i} ({labels[i]!r}) has {len(r)} values for {len(toks)} tokens")
        bad = [t for t in toks if not isinstance(t, str)]
        if bad:
            raise TypeError(f"tokens must be strings, got {type(bad[0]).__name__} in row {i}")

    def top(r):  # the value that gets full intensity
        finite = r[np.isfinite(r)]
        if finite.size == 0:
            return 1.0
        m = float(np.abs(finite).max() if colormap == "signed" else max(finite.max(), 0.0))
        return m if m > 0 else 1.0

    page_top = max((top(r) for r in rows), default=1.0)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_html.escape(title or 'token relevance')}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    if title is not None:
        parts.append(f"<h1>{_html.escape(title)}</h1>")
    low = _shade(1.0, _BLUE) if colormap == "signed" else "rgb(255, 255, 255)"
    gradient = f"linear-gradient(to right, {low}, rgb(255, 255, 255), {_shade(1.0, _RED)})"
    if colormap == "positive":
        gradient = f"linear-gradient(to right, rgb(255, 255, 255), {_shade(1.0, _RED)})"
    scale_words = "per row" if normalize == "row" else "shared by all rows"
    span = "−max|r| … 0 … +max|r|" if colormap == "signed" else "0 … max r"
    parts.append(
        f'<p class="note">shade: {span}<span class="legend" style="background: {gradient}"></span>'
        f"({scale_words}); hover a token for its position and value</p>"
    )
    for label, toks, r in zip(labels, row_tokens, rows):
        full = page_top if normalize == "page" else top(r)
        q = None if query is None else (query + len(r) if query < 0 else query)
        if q is not None and not 0 <= q < len(r):
            raise ValueError(f"query position {query} is outside the {len(r)} tokens of row {label!r}")
        scale_note = (
            f"max |r| = {_format(full, precision)}"
            if colormap == "signed"
            else f"max r = {_format(full, precision)}"
        )
        parts.append(
            f'<div class="row"><div class="label">{_html.escape(label)}'
            f'<span class="scale">{_html.escape(scale_note)}</span></div><div class="tokens">'
        )
        spans = []
        for pos, (tok, value) in enumerate(zip(toks, r)):
            value = float(value)
            if not math.isfinite(value):
                background, ink = "rgb(200, 200, 200)", "#222"
            else:
                t = min(abs(value) / full, 1.0) if colormap == "signed" else min(max(value, 0.0) / full, 1.0)
                background = _shade(t, _RED if value >= 0 else _BLUE)
                ink = "#fff" if t > 0.6 else "#222"
            shown = visible_token(tok)
            tip = f"{pos}: {shown!r} = {_format(value, precision)}"
            cls = "tok query" if pos == q else "tok"
            spans.append(
                f'<span class="{cls}" style="background: {background}; color: {ink}" '
                f'title="{_html.escape(tip)}" data-tip="{_html.escape(tip)}" '
                f'data-value="{_format(value, precision)}">{_html.escape(shown)}</span>'
            )
        parts.append("".join(spans))
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------- patch overlay


def _image(image: Any) -> np.ndarray:
    """An image as ``(H, W)`` or ``(H, W, 3|4)`` floats in ``[0, 1]``; ``(3|4, H, W)`` is transposed."""
    img = _array(image, "image")
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = img.transpose(1, 2, 0)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
        raise ValueError(f"image has shape {tuple(img.shape)}, expected (H, W), (H, W, 3|4) or (3|4, H, W)")
    finite = img[np.isfinite(img)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < 0 or hi > 1:  # uint8-like (0..255) or unnormalised: rescale for display
        img = img / 255.0 if lo >= 0 and hi <= 255 and hi > 1 else (img - lo) / max(hi - lo, 1e-12)
    return np.clip(img, 0.0, 1.0)


def overlay_pixels(
    grid: tuple[int, int], image_shape: Sequence[int] | None = None, *, size: float = 4.0, dpi: float = 100
) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a :func:`patch_overlay` PNG.

    ``width = round(dpi · (size + 1.0))``, ``height = round(dpi · (size · h / w + 0.7))`` where ``h / w``
    is the image's aspect ratio when an image of shape ``image_shape`` is given (``(H, W[, 3])``;
    ``(3, H, W)`` is read as channels first), else the grid's ``H / W``.

    >>> overlay_pixels((14, 14)), overlay_pixels((2, 4), size=3, dpi=50)
    ((500, 470), (200, 110))
    """
    h, w = grid
    if image_shape is not None:
        shape = tuple(image_shape)
        if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4):
            shape = shape[1:]
        h, w = shape[0], shape[1]
    m = OVERLAY_MARGINS
    return round(dpi * (size + m["left"] + m["right"])), round(dpi * (size * h / w + m["top"] + m["bottom"]))


def patch_overlay(
    relevance: Any,
    grid: tuple[int, int],
    *,
    cls_position: int | None = None,
    image: Any = None,
    alpha: float = 0.5,
    cmap: Any = None,
    title: str | None = None,
    size: float = 4.0,
    dpi: float = 100,
    interpolation: str = "nearest",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Relevance over the patches of an image model, drawn on its ``(H, W)`` grid, optionally over the image.

    Args:
        relevance: ``(L,)`` with ``L = H·W`` patches in row-major order, or ``L = H·W + 1`` when a class
            token sits at ``cls_position`` (any position: ``0``, the middle, ``-1``); its value is shown in
            the title and left out of the map.
        grid: ``(H, W)``, patches per column and per row; any sizes.
        image: ``(H_img, W_img)``, ``(H_img, W_img, 3|4)`` or ``(3|4, H_img, W_img)``, floats in ``[0, 1]``
            or ``0..255``; the map is stretched over it (``interpolation="bilinear"`` smooths it), with
            opacity ``alpha``.
        cmap: default ``"RdBu_r"`` centred on 0 when any value is negative, else ``"inferno"``.
        size, dpi: width of the map in inches and the resolution; the PNG is exactly
            :func:`overlay_pixels` ``(grid, image.shape, size=..., dpi=...)`` pixels.
        path: when given, the figure is also saved there.

    Example:
        >>> import torch
        >>> fig = patch_overlay(torch.rand(4 * 6 + 1), grid=(4, 6), cls_position=12)
        >>> fig.axes[0].images[0].get_array().shape
        (4, 6)
    """
    if len(tuple(grid)) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid must be two positive integers (H, W), got {grid!r}")
    H, W = int(grid[0]), int(grid[1])
    rel = _array(relevance, "relevance")
    if rel.ndim != 1:
        raise ValueError(
            f"relevance has shape {tuple(rel.shape)}, expected (L,) with L = H·W (+1 class token)"
        )
    L, patches = rel.shape[0], H * W
    cls_value = None
    if cls_position is None:
        if L != patches:
            hint = " (a class token? pass cls_position)" if L == patches + 1 else ""
            raise ValueError(f"relevance has {L} values but the grid {H}×{W} has {patches} patches{hint}")
    else:
        if L != patches + 1:
            raise ValueError(
                f"relevance has {L} values but the grid {H}×{W} plus a class token needs {patches + 1}"
            )
        if not -L <= cls_position < L:
            raise ValueError(f"cls_position {cls_position} is outside the {L} positions")
        p = cls_position % L
        cls_value = float(rel[p])
        rel = np.concatenate([rel[:p], rel[p + 1 :]])
    patch_map = rel.reshape(H, W)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    _, Figure = _matplotlib()
    img = None if image is None else _image(image)
    signed = bool((patch_map < 0).any())
    colormap = _colormap(cmap, _SIGNED_CMAP if signed else _OVERLAY_CMAP)
    (vmin, vmax) = _limits([patch_map.ravel()], signed, None)
    width, height = overlay_pixels((H, W), None if img is None else img.shape, size=size, dpi=dpi)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    Wi, Hi = width / dpi, height / dpi
    m = OVERLAY_MARGINS
    map_h = Hi - m["top"] - m["bottom"]
    ax = fig.add_axes([m["left"] / Wi, m["bottom"] / Hi, size / Wi, map_h / Hi], label="overlay")
    if img is None:
        extent, shown = (-0.5, W - 0.5, H - 0.5, -0.5), 1.0
    else:
        extent, shown = (0, img.shape[1], img.shape[0], 0), alpha
        ax.imshow(
            img,
            cmap="gray" if img.ndim == 2 else None,
            vmin=0,
            vmax=1,
            extent=extent,
            interpolation="bilinear",
        )
    heat = ax.imshow(
        patch_map,
        cmap=colormap,
        vmin=vmin,
        vmax=vmax,
        alpha=shown,
        extent=extent,
        interpolation=interpolation,
        aspect="auto",
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_axis_off()
    cax = fig.add_axes(
        [(m["left"] + size + 0.15) / Wi, m["bottom"] / Hi, 0.15 / Wi, map_h / Hi], label="colorbar"
    )
    bar = fig.colorbar(heat, cax=cax)
    bar.solids.set_alpha(1.0)
    bar.ax.tick_params(labelsize=7)
    info = f"{H}×{W} patches"
    if cls_value is not None:
        info += f" · class token (position {cls_position % L}): {_format(cls_value, 3)}"
    heading = info if title is None else f"{title}\n{info}"
    fig.text(0.5, 1 - 0.3 / Hi, heading, ha="center", va="center", fontsize=9, parse_math=False)
    if path is not None:
        _save_png(fig, path, dpi)
    return fig


# ------------------------------------------------------------------------------------------ report

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def save_report(
    folder: str | os.PathLike,
    pngs: Mapping[str, Figure] | None = None,
    html: Mapping[str, str] | None = None,
    *,
    title: str = "implicit_hooks report",
    captions: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<name>.png`` per figure, ``<name>.html`` per page and an ``index.html`` linking them all.

    Links are relative, so the folder can be moved or served as is. Figures are saved at their own
    ``dpi`` (so their pixel sizes are those documented by :func:`grid_pixels` / :func:`overlay_pixels`).
    Names are file stems: letters, digits, ``._ -``, not starting with a dot; ``"index"`` is reserved.
    ``captions`` maps a name to a line of text shown under its figure or beside its link.

    Returns:
        The path of ``index.html`` (its ``.parent`` is the folder, created if missing).

    Example:
        >>> import tempfile
        >>> index = save_report(tempfile.mkdtemp(), html={"tokens": token_html(["a"], [1.0])})
        >>> sorted(p.name for p in index.parent.iterdir())
        ['index.html', 'tokens.html']
    """
    pngs, html, captions = dict(pngs or {}), dict(html or {}), dict(captions or {})
    for kind, names in (("png", pngs), ("html", html)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name) or name.lower() == "index":
                raise ValueError(
                    f"{kind} name {name!r} is not a plain file stem (letters, digits, '._ -'; not 'index')"
                )
    for name, page in html.items():
        if not isinstance(page, str):
            raise TypeError(f"html[{name!r}] must be a string, got {type(page).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_html.escape(title)}</title>",
        "<style>body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }"
        " figure { margin: 1em 0 2em; } img { max-width: 100%; border: 1px solid #eee; }"
        " figcaption { color: #555; }</style></head><body>",
        f"<h1>{_html.escape(title)}</h1>",
    ]
    if html:
        body.append("<h2>Pages</h2><ul>")
        for name, page in html.items():
            (folder / f"{name}.html").write_text(page, encoding="utf-8")
            note = f" – {_html.escape(captions[name])}" if name in captions else ""
            body.append(f'<li><a href="{quote(name)}.html">{_html.escape(name)}</a>{note}</li>')
        body.append("</ul>")
    if pngs:
        body.append("<h2>Figures</h2>")
        for name, fig in pngs.items():
            fig.savefig(folder / f"{name}.png", dpi=fig.dpi, format="png", facecolor="white")
            src = f"{quote(name)}.png"
            body.append(
                f'<figure><a href="{src}"><img src="{src}" alt="{_html.escape(name)}"></a>'
                f"<figcaption>{_html.escape(captions.get(name, name))}</figcaption></figure>"
            )
    body.append("</body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(body) + "\n", encoding="utf-8")
    return index
