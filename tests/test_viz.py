"""Pictures: heatmap grids, token relevance HTML, patch overlays and the report folder.

Checks what a reader of the pictures relies on: PNG pixel sizes as documented, the drawn data equal to
the input (causal triangle blank), colour limits per panel / row / grid, every token escaped with its
value on hover, and clear errors for mismatched shapes.
"""

import html
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

from implicit_hooks import viz  # noqa: E402

TOKENS = ["The", " cat", "\n", "<b>", "a&b", '"q"', "'", " ", "\t", "x\ny", "$x$", "", "."]  # L = 13


def causal(L: int, *, seed: int = 0, signed: bool = False, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.rand(L, L, generator=gen, dtype=torch.float64)
    if signed:
        A = A - 0.5
    return A.tril().to(device)


def png_size(path) -> tuple[int, int]:
    """(width, height) read back by matplotlib, checked against PIL when installed."""
    h, w = mpimg.imread(path).shape[:2]
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return w, h
    with Image.open(path) as im:
        assert im.size == (w, h)
    return w, h


def heatmap_axes(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label().startswith("heatmap")}


# ---------------------------------------------------------------------------------------- imports


def test_import_leaves_matplotlib_and_pyplot_alone():
    code = textwrap.dedent(
        """
        import sys
        import implicit_hooks, implicit_hooks.viz as viz
        assert "matplotlib" not in sys.modules, "importing implicit_hooks(.viz) imported matplotlib"
        viz.token_html(["a", "b"], [1.0, -1.0])
        assert "matplotlib" not in sys.modules, "token_html needs no matplotlib"
        import matplotlib, torch
        backend = dict.__getitem__(matplotlib.rcParams, "backend")
        viz.heatmap_grid([[torch.rand(5, 5)]], row_labels=["r"], col_labels=["c"])
        viz.patch_overlay(torch.rand(6), (2, 3))
        assert "matplotlib.pyplot" not in sys.modules, "viz must not use pyplot"
        assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------- heatmap grid


@pytest.mark.parametrize(
    "rows, cols, panel_size, dpi, scale, with_tokens",
    [(1, 1, 2.5, 100, "row", True), (2, 3, 2.0, 72, "panel", False), (3, 2, 1.5, 150, "shared", True)],
)
def test_heatmap_grid_png_has_documented_size(
    tmp_path, device, rows, cols, panel_size, dpi, scale, with_tokens
):
    maps = [[causal(13, seed=3 * i + j, device=device) for j in range(cols)] for i in range(rows)]
    path = tmp_path / "sub" / "grid.png"
    fig = viz.heatmap_grid(
        maps,
        row_labels=[f"layer {i}" for i in range(rows)],
        col_labels=[f"model {j}" for j in range(cols)],
        tokens=TOKENS if with_tokens else None,
        title="grid",
        scale=scale,
        panel_size=panel_size,
        dpi=dpi,
        path=path,
    )
    expected = (round(dpi * (cols * panel_size + 1.5)), round(dpi * (rows * panel_size + 1.0)))
    assert viz.grid_pixels(rows, cols, panel_size=panel_size, dpi=dpi) == expected
    assert png_size(path) == expected
    assert tuple(np.round(fig.get_size_inches() * fig.dpi).astype(int)) == expected
    assert len(heatmap_axes(fig)) == rows * cols


def test_heatmap_grid_draws_the_lower_triangle_and_leaves_the_causal_upper_triangle_blank(tmp_path, device):
    A = causal(13, seed=1, device=device) + 0.5 * torch.eye(13, device=device, dtype=torch.float64)
    A = A.tril()
    A_grad = A.float().clone().requires_grad_(True)  # views with grad=True give tensors with a graph
    maps = [[A, A_grad.tril(), A.cpu().numpy()]]
    fig = viz.heatmap_grid(maps, row_labels=["layer 0"], col_labels=["a", "b", "c"], path=tmp_path / "g.png")
    axes = heatmap_axes(fig)
    for j in range(3):
        shown = axes[f"heatmap[0][{j}]"].images[0].get_array()
        expected = np.where(np.tri(13, dtype=bool), A.cpu().numpy(), np.nan)
        np.testing.assert_allclose(np.ma.filled(shown.astype(float), np.nan), expected, rtol=1e-6)
    # in the PNG: upper-triangle pixels are white (the background), lower-triangle pixels coloured
    pixels = mpimg.imread(tmp_path / "g.png")[..., :3]
    height = pixels.shape[0]
    fig.canvas.draw()
    box = axes["heatmap[0][0]"].get_window_extent()
    for (t, s), blank in [((1.5, 10.5), True), ((10.5, 1.5), False), ((6.5, 9.5), True), ((9.5, 6.5), False)]:
        x = box.x0 + (s + 0.5) / 13 * box.width - 0.5 / 13 * box.width
        y = box.y1 - (t + 0.5) / 13 * box.height + 0.5 / 13 * box.height
        colour = pixels[height - int(round(y)), int(round(x))]
        assert np.allclose(colour, 1.0, atol=0.02) == blank, (t, s, colour)


def test_heatmap_grid_colour_limits_per_panel_row_and_shared(device):
    maps = [
        [causal(9, seed=1, device=device), 3 * causal(9, seed=2, device=device)],
        [0.5 * causal(9, seed=3, device=device), 2 * causal(9, seed=4, device=device)],
    ]
    peak = [[float(m.max()) for m in row] for row in maps]

    def clims(scale, **kw):
        fig = viz.heatmap_grid(maps, row_labels=["0", "1"], col_labels=["a", "b"], scale=scale, **kw)
        axes = heatmap_axes(fig)
        return [[axes[f"heatmap[{i}][{j}]"].images[0].get_clim() for j in range(2)] for i in range(2)]

    for i in range(2):
        for j in range(2):
            assert clims("panel")[i][j] == pytest.approx((0.0, peak[i][j]))
            assert clims("row")[i][j] == pytest.approx((0.0, max(peak[i])))
            assert clims("shared")[i][j] == pytest.approx((0.0, max(map(max, peak))))
    lower = np.concatenate([m.cpu().numpy()[np.tril_indices(9)] for m in maps[0]])
    assert clims("row", clip=0.9)[0][0] == pytest.approx((0.0, np.quantile(lower, 0.9)))

    signed = [[causal(9, seed=5, signed=True, device=device)]]
    fig = viz.heatmap_grid(signed, row_labels=["0"], col_labels=["a"])
    image = heatmap_axes(fig)["heatmap[0][0]"].images[0]
    top = float(signed[0][0].abs().max())
    assert image.get_clim() == pytest.approx((-top, top))
    assert image.get_cmap().name.startswith("RdBu_r")
    fig = viz.heatmap_grid(maps, row_labels=["0", "1"], col_labels=["a", "b"], signed=True, cmap="magma")
    image = heatmap_axes(fig)["heatmap[1][1]"].images[0]
    assert image.get_clim()[0] == -image.get_clim()[1]
    assert image.get_cmap().name.startswith("magma")


def test_heatmap_grid_power_scale():
    A = causal(9, seed=2)
    fig = viz.heatmap_grid([[A]], row_labels=["r"], col_labels=["c"], gamma=0.5)
    image = heatmap_axes(fig)["heatmap[0][0]"].images[0]
    assert isinstance(image.norm, matplotlib.colors.PowerNorm) and image.norm.gamma == 0.5
    assert image.get_clim() == pytest.approx((0.0, float(A.max())))
    assert image.norm(float(A.max()) / 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gamma applies to non-negative maps"):
        viz.heatmap_grid([[causal(9, signed=True)]], row_labels=["r"], col_labels=["c"], gamma=0.5)
    with pytest.raises(ValueError, match="gamma must be positive"):
        viz.heatmap_grid([[A]], row_labels=["r"], col_labels=["c"], gamma=0.0)


def test_heatmap_grid_token_ticks_are_visible_and_unparsed():
    fig = viz.heatmap_grid([[causal(13)]], row_labels=["r"], col_labels=["c"], tokens=TOKENS)
    ax = heatmap_axes(fig)["heatmap[0][0]"]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == [viz.visible_token(t) for t in TOKENS]
    assert shown[2] == "↵" and shown[7] == "␣" and shown[8] == "⇥" and shown[9] == "x↵y" and shown[11] == "∅"
    assert shown[10] == "$x$"  # drawn as typed, no mathtext
    assert [t.get_text() for t in ax.get_yticklabels()] == shown
    fig.canvas.draw()  # renders without mathtext errors
    # beyond max_token_ticks, positions instead of tokens
    fig = viz.heatmap_grid(
        [[causal(40), causal(13)]],
        row_labels=["r"],
        col_labels=["long", "short"],
        tokens=[[str(i) + "tok" for i in range(40)], TOKENS],
        max_token_ticks=32,
    )
    axes = heatmap_axes(fig)
    assert [t.get_text() for t in axes["heatmap[0][0]"].get_xticklabels()] == ["0", "19", "39"]
    assert len(axes["heatmap[0][1]"].get_xticklabels()) == 13
    # small panels: every stride-th token so labels stay ≥ 4 pt (side 0.9 in → 12 labels → stride 3)
    tokens = [f"t{i}" for i in range(30)]
    fig = viz.heatmap_grid([[causal(30)]], row_labels=["r"], col_labels=["c"], tokens=tokens, panel_size=1.5)
    ax = heatmap_axes(fig)["heatmap[0][0]"]
    assert list(ax.get_xticks()) == list(range(0, 30, 3))
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens[::3]
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 4


def test_heatmap_grid_empty_panels_and_4d_input():
    maps = torch.rand(2, 3, 7, 7).tril()
    fig = viz.heatmap_grid(maps, row_labels=["a", "b"], col_labels=["x", "y", "z"], scale="shared")
    assert len(heatmap_axes(fig)) == 6
    fig = viz.heatmap_grid(
        [[causal(7), None], [None, causal(5)]], row_labels=["a", "b"], col_labels=["x", "y"], scale="row"
    )
    assert set(heatmap_axes(fig)) == {"heatmap[0][0]", "heatmap[1][1]"}


@pytest.mark.parametrize(
    "maps, kwargs, message",
    [
        ([[torch.rand(4, 5)]], {}, r"maps\[0\]\[0\] has shape \(4, 5\), expected a square"),
        ([[torch.rand(3, 4, 4)]], {}, "expected a square"),
        ([[torch.rand(4, 4)], [torch.rand(4, 4), torch.rand(4, 4)]], {}, "rows must be equally long"),
        ([], {}, "maps is empty"),
        ([[torch.rand(4, 4)]], {"row_labels": ["a", "b"]}, "2 row_labels for 1 rows"),
        ([[torch.rand(4, 4)]], {"col_labels": []}, "0 col_labels for 1 columns"),
        (
            [[torch.rand(4, 4)]],
            {"tokens": ["a", "b", "c"]},
            r"maps\[0\]\[0\] is 4 × 4 but column 0 has 3 tokens",
        ),
        ([[torch.rand(4, 4)]], {"tokens": [["a"] * 4, ["b"] * 4]}, "2 lists for 1 columns"),
        ([[torch.rand(4, 4)]], {"scale": "global"}, "scale must be"),
        ([[torch.rand(4, 4)]], {"clip": 1.5}, "clip is a quantile"),
    ],
)
def test_heatmap_grid_errors(maps, kwargs, message):
    kwargs = {"row_labels": ["r"] * len(maps), "col_labels": ["c"] * (len(maps[0]) if maps else 0), **kwargs}
    with pytest.raises(ValueError, match=message):
        viz.heatmap_grid(maps, **kwargs)
    with pytest.raises(TypeError, match="tokens must be strings"):
        viz.heatmap_grid([[torch.rand(2, 2)]], row_labels=["r"], col_labels=["c"], tokens=[1, 2])


# ------------------------------------------------------------------------------------- token HTML


class _Page(HTMLParser):
    """Collects every tag (to check balance) and, per ``.row``, the labels, token texts and tooltips."""

    VOID = {"meta", "br", "img", "link"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.rows, self.labels, self.tags = [], [], [], []
        self.in_tok = self.in_label = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in self.VOID:
            self.stack.append(tag)
        cls = attrs.get("class", "")
        if cls == "row":
            self.rows.append([])
        elif cls == "label":
            self.labels.append("")
            self.in_label = True
        elif cls == "scale":
            self.in_label = False
        elif "tok" in cls.split():
            self.rows[-1].append({"text": "", **attrs})
            self.in_tok = True

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        self.in_tok = False
        if tag == "div":
            self.in_label = False

    def handle_data(self, data):
        if self.in_tok:
            self.rows[-1][-1]["text"] += data
        elif self.in_label:
            self.labels[-1] += data


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


def rgb(style: str) -> tuple[int, int, int]:
    inner = style.split("background: rgb(")[1].split(")")[0]
    return tuple(int(v) for v in inner.split(","))


def test_token_html_escapes_every_token_and_shows_values_on_hover(device):
    relevance = torch.linspace(-1, 1, 13, device=device) ** 3
    page = viz.token_html(TOKENS, relevance, title="a <title> & more", precision=3)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for token in TOKENS:
        assert html.escape(viz.visible_token(token)) in page
    for raw in ("<b>", "a&b", '"q"', "<title> &"):
        assert raw not in page
    assert "a &lt;title&gt; &amp; more" in page
    assert "\t" not in page.split("<body>")[1] and "x↵y" in page  # whitespace shown visibly
    parsed = parse(page)
    (row,) = parsed.rows
    assert [tok["text"] for tok in row] == [viz.visible_token(t) for t in TOKENS]
    for pos, (tok, value) in enumerate(zip(row, relevance.tolist())):
        assert tok["data-value"] == f"{value:.3g}"
        assert tok["title"] == tok["data-tip"] == f"{pos}: {viz.visible_token(TOKENS[pos])!r} = {value:.3g}"
    assert ".tok:hover::after" in page and "attr(data-tip)" in page  # CSS tooltip besides the title


def test_token_html_is_self_contained():
    page = viz.token_html(TOKENS, np.random.default_rng(0).normal(size=13))
    tags = {tag for tag, _ in parse(page).tags}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "p", "span", "div", "h1"}
    for external in ("http:", "https:", "src=", "<script", "<link", "@import", "url("):
        assert external not in page


def test_token_html_colours_signed_and_positive():
    values = [1.0, 0.5, 0.0, -0.5, -2.0]
    row = parse(viz.token_html(list("abcde"), values)).rows[0]
    colours = [rgb(tok["style"]) for tok in row]
    assert colours[2] == (255, 255, 255)  # zero is white
    assert colours[0][0] > colours[0][2] and colours[3][2] > colours[3][0]  # red positive, blue negative
    assert colours[4] == (33, 102, 172)  # the largest |r| gets the full colour
    assert colours[0] == tuple(round(255 + 0.5 * (c - 255)) for c in (178, 24, 43))  # |r| / max|r| = 0.5
    row = parse(viz.token_html(list("abcde"), values, colormap="positive")).rows[0]
    colours = [rgb(tok["style"]) for tok in row]
    assert colours[0] == (178, 24, 43) and colours[3] == colours[4] == (255, 255, 255)
    nan_row = parse(viz.token_html(["a", "b"], [float("nan"), 1.0])).rows[0]
    assert nan_row[0]["data-value"] == "nan" and rgb(nan_row[0]["style"]) == (200, 200, 200)


def test_token_html_several_rows_with_labels_and_scales(device):
    rel = torch.tensor([[0.1, 0.2, 0.4], [2.0, -4.0, 1.0]], device=device)
    page = viz.token_html(["x", "<y>", "z"], rel, labels=["raw <attn>", "rollout"], query=-1)
    parsed = parse(page)
    assert [label.strip() for label in parsed.labels] == ["raw <attn>", "rollout"]
    assert "raw &lt;attn&gt;" in page
    assert [len(r) for r in parsed.rows] == [3, 3]
    assert rgb(parsed.rows[1][1]["style"]) == (33, 102, 172)  # -4 is the second row's max |r|
    assert rgb(parsed.rows[0][2]["style"]) == (178, 24, 43)  # per-row scale: 0.4 is the row's max
    assert [tok["class"] for tok in parsed.rows[1]] == ["tok", "tok", "tok query"]
    page = viz.token_html(["x", "<y>", "z"], rel, normalize="page")
    assert rgb(parse(page).rows[0][2]["style"]) != (178, 24, 43)  # page scale: 0.4 of 4
    # a mapping gives the labels; per-row token lists allow different texts (batch items)
    page = viz.token_html([["a", "b"], ["c", "d", "e"]], {"item 0": [1.0, 2.0], "item 1": [3.0, 2.0, 1.0]})
    parsed = parse(page)
    assert [label.strip() for label in parsed.labels] == ["item 0", "item 1"]
    assert [[tok["text"] for tok in r] for r in parsed.rows] == [["a", "b"], ["c", "d", "e"]]
    # a list of floats is one row
    assert len(parse(viz.token_html(["a", "b"], [0.5, 1.0])).rows) == 1


@pytest.mark.parametrize(
    "tokens, relevance, kwargs, error, message",
    [
        (["a", "b"], [1.0, 2.0, 3.0], {}, ValueError, "has 3 values for 2 tokens"),
        (
            ["a", "b"],
            torch.rand(2, 2, 2),
            {},
            ValueError,
            r"shape \(2, 2, 2\), expected \(L,\) or \(rows, L\)",
        ),
        (["a", "b"], torch.rand(2, 2), {"labels": ["one"]}, ValueError, "1 labels for 2 rows"),
        ([["a", "b"]], torch.rand(2, 2), {}, ValueError, "1 lists for 2 rows"),
        (["a", "b"], [1.0, 2.0], {"colormap": "jet"}, ValueError, "colormap must be"),
        (["a", "b"], [1.0, 2.0], {"normalize": "col"}, ValueError, "normalize must be"),
        (["a", "b"], [1.0, 2.0], {"query": 2}, ValueError, "query position 2 is outside"),
        ([1, 2], [1.0, 2.0], {}, TypeError, "tokens must be strings"),
    ],
)
def test_token_html_errors(tokens, relevance, kwargs, error, message):
    with pytest.raises(error, match=message):
        viz.token_html(tokens, relevance, **kwargs)


# ---------------------------------------------------------------------------------- patch overlay


def overlay_map(fig) -> np.ndarray:
    ax = next(ax for ax in fig.axes if ax.get_label() == "overlay")
    return np.asarray(ax.images[-1].get_array(), dtype=float)


@pytest.mark.parametrize(
    "grid, cls_position", [((3, 5), None), ((4, 4), 0), ((3, 5), 7), ((2, 7), -1), ((1, 1), 1)]
)
def test_patch_overlay_reshapes_row_major_and_drops_the_class_token(tmp_path, device, grid, cls_position):
    H, W = grid
    L = H * W + (cls_position is not None)
    relevance = torch.arange(L, dtype=torch.float32, device=device) + 1
    fig = viz.patch_overlay(relevance, grid, cls_position=cls_position, path=tmp_path / "o.png")
    patches = relevance.cpu().numpy().astype(float)
    if cls_position is not None:
        patches = np.delete(patches, cls_position % L)
    np.testing.assert_array_equal(overlay_map(fig), patches.reshape(H, W))
    assert png_size(tmp_path / "o.png") == viz.overlay_pixels(grid) == (500, round(100 * (4 * H / W + 0.7)))
    heading = " ".join(t.get_text() for t in fig.texts)
    assert f"{H}×{W} patches" in heading
    if cls_position is not None:
        assert f"class token (position {cls_position % L}): {relevance[cls_position].item():.3g}" in heading


@pytest.mark.parametrize(
    "image_shape, layout",
    [((37, 50), "gray"), ((37, 50, 3), "rgb"), ((3, 37, 50), "chw"), ((64, 32, 4), "rgba")],
)
def test_patch_overlay_over_an_image(tmp_path, device, image_shape, layout):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(image_shape, generator=gen).to(device)
    if layout == "rgb":
        image = (image * 255).to(torch.uint8).cpu().numpy()  # 0..255 integers
    relevance = torch.randn(4 * 7, generator=gen).to(device)  # signed
    path = tmp_path / "overlay.png"
    fig = viz.patch_overlay(relevance, (4, 7), image=image, alpha=0.4, size=3.0, dpi=80, path=path)
    h, w = (37, 50) if layout != "rgba" else (64, 32)
    expected = (round(80 * (3.0 + 1.0)), round(80 * (3.0 * h / w + 0.7)))
    assert viz.overlay_pixels((4, 7), image_shape, size=3.0, dpi=80) == expected
    assert png_size(path) == expected
    ax = next(ax for ax in fig.axes if ax.get_label() == "overlay")
    background, heat = ax.images
    assert background.get_array().shape[:2] == (h, w)
    assert float(background.get_array().max()) <= 1.0
    assert heat.get_extent() == background.get_extent() == [0, w, h, 0]  # stretched over the image
    assert heat.get_alpha() == 0.4
    top = float(relevance.abs().max())
    assert heat.get_clim() == pytest.approx((-top, top))
    np.testing.assert_allclose(overlay_map(fig), relevance.cpu().double().numpy().reshape(4, 7), rtol=1e-6)


@pytest.mark.parametrize(
    "L, grid, kwargs, message",
    [
        (16, (3, 5), {}, r"16 values but the grid 3×5 has 15 patches \(a class token\? pass cls_position\)"),
        (14, (3, 5), {}, "14 values but the grid 3×5 has 15 patches$"),
        (15, (3, 5), {"cls_position": 0}, "grid 3×5 plus a class token needs 16"),
        (16, (3, 5), {"cls_position": 16}, "cls_position 16 is outside the 16 positions"),
        (16, (3, 5), {"cls_position": -17}, "cls_position -17 is outside"),
        (15, (3, 5, 1), {}, "grid must be two positive integers"),
        (15, (0, 5), {}, "grid must be two positive integers"),
        (15, (3, 5), {"alpha": 2.0}, "alpha must be in"),
        (15, (3, 5), {"image": np.zeros((5, 5, 2))}, r"image has shape \(5, 5, 2\)"),
    ],
)
def test_patch_overlay_errors(L, grid, kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.patch_overlay(torch.rand(L), grid, **kwargs)
    with pytest.raises(ValueError, match=r"shape \(1, 15\), expected \(L,\)"):
        viz.patch_overlay(torch.rand(1, 15), (3, 5))


# ----------------------------------------------------------------------------------------- report


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("href", "src")]


def test_save_report_writes_files_and_a_relative_index(tmp_path):
    grid = viz.heatmap_grid(
        [[causal(13), causal(13, seed=2)]], row_labels=["l0"], col_labels=["a", "b"], dpi=60
    )
    overlay = viz.patch_overlay(torch.rand(17), (4, 4), cls_position=8, dpi=50)
    page = viz.token_html(TOKENS, torch.rand(13))
    index = viz.save_report(
        tmp_path / "report",
        pngs={"attention grid": grid, "patches": overlay},
        html={"tokens": page},
        captions={"patches": "class token <in the middle>", "tokens": "raw & rollout"},
    )
    folder = tmp_path / "report"
    assert index == folder / "index.html"
    assert sorted(p.name for p in folder.iterdir()) == [
        "attention grid.png",
        "index.html",
        "patches.png",
        "tokens.html",
    ]
    assert png_size(folder / "attention grid.png") == viz.grid_pixels(1, 2, dpi=60)
    assert png_size(folder / "patches.png") == viz.overlay_pixels((4, 4), dpi=50)
    assert (folder / "tokens.html").read_text(encoding="utf-8") == page
    text = index.read_text(encoding="utf-8")
    assert "class token &lt;in the middle&gt;" in text and "raw &amp; rollout" in text
    parser = _Links()
    parser.feed(text)
    assert set(parser.links) == {"tokens.html", "attention%20grid.png", "patches.png"}
    for link in parser.links:  # relative links that resolve inside the folder
        assert "/" not in link and ":" not in link
        assert (folder / link.replace("%20", " ")).exists()


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "index", "x\\y"])
def test_save_report_rejects_unsafe_names(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain file stem"):
        viz.save_report(tmp_path, html={name: "<p>x</p>"})
    with pytest.raises(TypeError, match="must be a string"):
        viz.save_report(tmp_path, html={"page": b"bytes"})


# ---------------------------------------------------------------------------------------- helpers


def test_spread_and_visible_token():
    assert viz.spread(24, 3) == [0, 12, 23]
    assert viz.spread(1, 3) == [0]
    assert viz.spread(5, 1) == [4]
    assert viz.spread(6, 10) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="n > 0"):
        viz.spread(0)
    assert viz.visible_token("\x00a\r\n") == "␀a␍↵"
    assert viz.visible_token(" the") == " the"
    assert viz.visible_token("") == "∅"
