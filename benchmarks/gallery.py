"""Regenerate docs/gallery/ and docs/gallery.md: pictures of the shipped trained models.

python benchmarks/gallery.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import implicit_hooks as ih
from implicit_hooks import viz
from implicit_hooks.faithfulness import models, tasks

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    out = DOCS / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    names = tasks.token_names()
    lines = [
        "# Gallery",
        "",
        "Pictures of the models that ship with the package (`python benchmarks/gallery.py`).",
        "",
    ]

    # 1. one input, every family trained on the markers task: rows = layers, columns = models
    batch = tasks.markers(1, seed=3, **models.metadata("mamba", "markers")["task_options"])
    tokens = [names[i] for i in batch.ids[0].tolist()]
    families = [f for f, t in models.available() if t == "markers"]
    grid = []
    for family in families:
        model = models.load(family, "markers")
        with torch.no_grad(), ih.record(model) as rec:
            model(batch.ids)
        grid.append([r.attention.mean(absolute=True)[0] for r in rec])
    rows = [[grid[j][i] for j in range(len(families))] for i in range(len(grid[0]))]
    viz.heatmap_grid(
        rows,
        row_labels=[f"layer {i}" for i in range(len(rows))],
        col_labels=families,
        tokens=tokens,
        title="markers task: channel mean of |A| per layer",
        scale="panel",
        clip=0.99,
        path=out / "families.png",
    )
    lines += [
        "## Every family on one input",
        "",
        f"The markers task (label {names[int(batch.label)]}; markers at "
        f"{batch.evidence[0].nonzero().flatten().tolist()}): channel mean of `|A|`, rows = layers, "
        "columns = families.",
        "",
        "![families](gallery/families.png)",
        "",
    ]

    # 2. ablations of one model
    model = models.load("mamba", "markers")
    with torch.no_grad(), ih.record(model) as rec:
        model(batch.ids)
    ablations = [
        [
            v.mean(absolute=True)[0]
            for v in (
                r.attention,
                r.attention.only("ssm"),
                r.attention.without("conv"),
                r.attention.without("gate"),
            )
        ]
        for r in rec
    ]
    viz.heatmap_grid(
        ablations,
        row_labels=[r.name for r in rec],
        col_labels=["full", "S6 only (Ali et al.)", "without conv", "without gate"],
        tokens=tokens,
        clip=0.99,
        path=out / "ablations.png",
    )
    lines += ["## Ablations of the Mamba model", "", "![ablations](gallery/ablations.png)", ""]

    # 3. token relevance of every method
    relevance = {}
    for name, Method in (
        ("raw", ih.RawAttention),
        ("rollout", ih.Rollout),
        ("attribution", ih.Attribution),
        ("grad ⊙ attention", ih.GradAttention),
    ):
        for matrix in ("full", "s6"):
            r = Method(model, matrix=matrix).attribute(batch.ids, target=batch.label)
            relevance[f"{name} ({'S6 only' if matrix == 's6' else 'full'})"] = r[0]
    (out / "relevance.html").write_text(
        viz.token_html(tokens, relevance, title="markers: relevance per method", query=len(tokens) - 1)
    )
    lines += [
        "## Token relevance",
        "",
        "[relevance.html](gallery/relevance.html): every method on the same input "
        "(hover a token for its value).",
        "",
    ]

    # 4. the patch-grid task as an image
    if ("mamba", "patches") in models.available():
        meta = models.metadata("mamba", "patches")
        H, W = meta["task_options"]["grid"]
        sample = tasks.patches(1, seed=4, grid=(H, W))
        model = models.load("mamba", "patches")
        for label, method in (
            ("attribution (full)", ih.Attribution(model)),
            ("raw attention (S6 only)", ih.RawAttention(model, matrix="s6")),
        ):
            r = method.attribute(sample.ids, target=sample.label)[0]
            slug = label.split()[0]
            viz.patch_overlay(r, grid=(H, W), cls_position=-1, title=label, path=out / f"patches_{slug}.png")
            lines += [f"![{label}](gallery/patches_{slug}.png)"]
        cells = sample.evidence[0, :-1].nonzero().flatten().tolist()
        lines += [
            "",
            f"The patch-grid task: a 2×2 object at cells {cells} of a {H}×{W} grid; the query token "
            "sits after the grid (`cls_position=-1`).",
            "",
        ]
    (DOCS / "gallery.md").write_text("\n".join(lines) + "\n")
    print(DOCS / "gallery.md")


if __name__ == "__main__":
    main()
