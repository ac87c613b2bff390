"""Faithfulness benchmark: tasks with known evidence, metrics, and (later) trained tiny models."""

from .metrics import area, evidence_auroc, perturbation_curve, summarize, topk_precision
from .tasks import TASKS, Batch, markers, patches, recall

__all__ = [
    "TASKS",
    "Batch",
    "area",
    "evidence_auroc",
    "markers",
    "patches",
    "perturbation_curve",
    "recall",
    "summarize",
    "topk_precision",
]
