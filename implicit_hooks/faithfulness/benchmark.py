"""The faithfulness benchmark: every method on the same samples of every shipped (family, task) model.

    from implicit_hooks.faithfulness import benchmark
    results = benchmark.run(n=128)             # {(family, task): {method: metrics}}
    benchmark.write(results, "docs/")           # faithfulness.md, faithfulness.json, faithfulness_curves.png

Each method explains the label's logit at the last position (the query). Candidates for removal are
all positions but the query; removed tokens are replaced by PAD.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..explain import Attribution, GradAttention, RawAttention, Rollout
from ..report import progress
from . import metrics, models, tasks
from .baselines import GradInput, IntegratedGradients, MambaLRP, RandomRelevance

#: method name → constructor from the model (None where the method does not apply to the family)
METHODS: dict[str, Callable[[nn.Module], Any]] = {
    "random": RandomRelevance,
    "grad × input": GradInput,
    "integrated gradients": IntegratedGradients,
    "MambaLRP-style grad × input": MambaLRP,
    "raw attention (S6 only)": lambda m: RawAttention(m, matrix="s6"),
    "rollout (S6 only)": lambda m: Rollout(m, matrix="s6"),
    "attribution (S6 only)": lambda m: Attribution(m, matrix="s6"),
    "raw attention (full)": RawAttention,
    "rollout (full)": Rollout,
    "attribution (full)": Attribution,
    "grad ⊙ attention (full)": GradAttention,
}

SCORES = ("evidence AUROC", "top-k precision", "ΔA^F", "positive AUC", "negative AUC")


def evaluate(
    model: nn.Module, batch: tasks.Batch, methods: Iterable[str], *, show_progress: bool = False
) -> dict:
    """Metrics (and mean curves) of each method on ``batch``; methods that do not apply are skipped."""
    model.eval()
    candidates = ~batch.question  # never remove the question (the query, the queried key)

    @torch.no_grad()
    def predict(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits[:, -1]

    out = {}
    for name in progress(list(methods), desc=f"{batch.task}: methods", enabled=show_progress):
        try:
            method = METHODS[name](model)
        except TypeError:  # e.g. MambaLRP on another family
            continue
        r = method.attribute(batch.ids, target=batch.label, query=-1).float().cpu()
        curves = {}
        for order in ("morf", "lerf"):
            prob, correct = metrics.perturbation_curve(
                predict, batch.ids, batch.label, r, candidates, order=order, replace=tasks.PAD
            )
            curves[order] = (prob, correct)
        per_sample = {
            "evidence AUROC": metrics.evidence_auroc(r, batch.evidence, candidates),
            "top-k precision": metrics.topk_precision(r, batch.evidence, candidates),
            "ΔA^F": metrics.area(curves["lerf"][0]) - metrics.area(curves["morf"][0]),
            "positive AUC": metrics.area(curves["morf"][1]),
            "negative AUC": metrics.area(curves["lerf"][1]),
        }
        out[name] = {k: metrics.summarize(v) for k, v in per_sample.items()}
        out[name]["curves"] = {
            order: {"prob": c[0].mean(1).tolist(), "accuracy": c[1].mean(1).tolist()}
            for order, c in curves.items()
        }
    return out


def run(
    pairs: Iterable[tuple[str, str]] | None = None,
    *,
    n: int = 128,
    methods: Iterable[str] = tuple(METHODS),
    seed: int = 20_000,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every shipped model (or ``pairs``) on ``n`` fresh samples of its task."""
    pairs = list(pairs or models.available())
    results = {}
    for family, task in progress(pairs, desc="models", enabled=show_progress):
        model = models.load(family, task)
        meta = models.metadata(family, task)
        batch = tasks.TASKS[task](n, seed=seed, **meta["task_options"])
        with torch.no_grad():
            accuracy = float((model(batch.ids).logits[:, -1].argmax(-1) == batch.label).float().mean())
        results[f"{family}/{task}"] = {
            "family": family,
            "task": task,
            "n": n,
            "accuracy": accuracy,
            "methods": evaluate(model, batch, methods, show_progress=show_progress),
        }
    return results


def _cell(s: dict[str, float]) -> str:
    return "–" if math.isnan(s["mean"]) else f"{s['mean']:.3f} ± {s['ci95']:.3f}"


def table(results: dict[str, Any]) -> str:
    """Markdown tables, one per model: methods × scores (mean ± 95 % CI half-width)."""
    lines = []
    for key, res in results.items():
        lines += [
            f"### {key} (n = {res['n']}, accuracy {res['accuracy']:.3f})",
            "",
            "| method | " + " | ".join(SCORES) + " |",
            "|---" * (len(SCORES) + 1) + "|",
        ]
        for name, m in res["methods"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(m[s]) for s in SCORES) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path, *, columns: int = 4) -> None:
    """Perturbation curves (probability of the label, MoRF solid, LeRF dashed), one panel per model."""
    from matplotlib.figure import Figure

    keys = list(results)
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4 * min(columns, len(keys)), 3.2 * rows + 0.8), dpi=100)
    x = [f * 100 for f in metrics.FRACTIONS]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, min(columns, len(keys)), i + 1)
        for name, m in results[key]["methods"].items():
            j = list(METHODS).index(name)  # one colour per method across panels
            colour = f"C{j}" if j < 10 else "black"
            ax.plot(x, m["curves"]["morf"]["prob"], color=colour, label=name)
            ax.plot(x, m["curves"]["lerf"]["prob"], color=colour, linestyle="--")
        ax.set_title(key, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        if i % columns == 0:
            ax.set_ylabel("p(label)")
        if i >= len(keys) - columns:
            ax.set_xlabel("% of tokens removed")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle(
        "label probability as tokens are removed: most relevant first (solid), least relevant first (dashed)"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path)


def write(results: dict[str, Any], folder: str | Path) -> Path:
    """``faithfulness.json``, ``faithfulness_table.md`` and ``faithfulness_curves.png`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "faithfulness.json").write_text(json.dumps(results, indent=1))
    (folder / "faithfulness_table.md").write_text(table(results))
    plot(results, folder / "faithfulness_curves.png")
    return folder
