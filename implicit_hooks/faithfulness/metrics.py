"""Faithfulness metrics for per-token relevance ``(B, L)``.

* Perturbation curves: remove (replace by a token, e.g. PAD) the ``f`` most relevant positions first
  (MoRF) or least relevant first (LeRF), for ``f`` = 0 %, 10 %, …, 90 % of the removable positions, and
  follow the model's probability of the label and its accuracy. Areas by the trapezoid rule over
  ``f ∈ [0, 0.9]``; ``ΔA^F = A(LeRF) − A(MoRF)`` (higher: more faithful). The paper's *positive*
  perturbation AUC is the accuracy area under MoRF (lower is better), *negative* under LeRF (higher is
  better).
* Evidence: AUROC of the relevance as a score for the known evidence positions (Mann–Whitney, ties
  count half; 1 is a perfect ranking, 0 a reversed one, 0.5 chance) and top-k precision with ``k`` the
  number of evidence positions.
* :func:`summarize`: mean and a 95 % confidence interval over samples (normal approximation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FRACTIONS = tuple(i / 10 for i in range(10))  # 0.0 … 0.9


def evidence_auroc(relevance: Tensor, evidence: Tensor, candidates: Tensor | None = None) -> Tensor:
    """Per-sample AUROC ``(B,)`` of ``relevance`` separating ``evidence`` from the other ``candidates``."""
    candidates = torch.ones_like(evidence) if candidates is None else candidates
    out = torch.full((len(relevance),), float("nan"))
    for i, (r, e, c) in enumerate(zip(relevance.float().cpu(), evidence.cpu(), candidates.cpu())):
        pos, neg = r[e & c], r[~e & c]
        if len(pos) and len(neg):
            greater = (pos[:, None] > neg[None, :]).float().mean()
            ties = (pos[:, None] == neg[None, :]).float().mean()
            out[i] = greater + 0.5 * ties
    return out


def topk_precision(relevance: Tensor, evidence: Tensor, candidates: Tensor | None = None) -> Tensor:
    """Per-sample share ``(B,)`` of evidence among the ``k`` most relevant candidates (k = #evidence)."""
    candidates = torch.ones_like(evidence) if candidates is None else candidates
    r = relevance.float().masked_fill(~candidates, float("-inf"))
    out = torch.empty(len(r))
    for i in range(len(r)):
        k = int(evidence[i].sum())
        top = r[i].topk(k).indices
        out[i] = evidence[i, top].float().mean()
    return out


def removal_order(relevance: Tensor, candidates: Tensor, order: str) -> Tensor:
    """Positions ``(B, L)`` sorted for removal; non-candidates last (never removed)."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf', got {order!r}")
    score = relevance.float() if order == "morf" else -relevance.float()
    return score.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True, stable=True)


def perturbation_curve(
    predict: Callable[[Tensor], Tensor],
    ids: Tensor,
    label: Tensor,
    relevance: Tensor,
    candidates: Tensor,
    *,
    order: str,
    replace: int,
    fractions: Sequence[float] = FRACTIONS,
) -> tuple[Tensor, Tensor]:
    """Probability of ``label`` and correctness after removing fractions of the candidates.

    ``predict(ids) -> logits (B, V)`` at the query. Returns ``(prob, correct)``, each ``(F, B)``.
    """
    ranked = removal_order(relevance, candidates, order)
    n_cand = candidates.sum(-1)
    probs, correct = [], []
    for f in fractions:
        k = (n_cand.float() * f).floor().long()  # per sample
        rank = torch.empty_like(ranked)
        rank.scatter_(1, ranked, torch.arange(ids.shape[1]).expand_as(ranked).contiguous())
        removed = rank < k[:, None]
        logits = predict(ids.masked_fill(removed, replace))
        p = logits.float().softmax(-1)
        probs.append(p.gather(1, label[:, None]).squeeze(1))
        correct.append((logits.argmax(-1) == label).float())
    return torch.stack(probs), torch.stack(correct)


def area(curve: Tensor, fractions: Sequence[float] = FRACTIONS) -> Tensor:
    """Trapezoid area under ``curve (F, B)`` over ``fractions``, normalised by their span: ``(B,)``."""
    x = torch.tensor(fractions, dtype=curve.dtype)
    return torch.trapezoid(curve, x, dim=0) / (x[-1] - x[0])


def summarize(values: Tensor) -> dict[str, float]:
    """Mean and 95 % confidence half-width (normal approximation) over samples, NaNs dropped."""
    v = values[~torch.isnan(values)].double()
    n = len(v)
    half = 1.96 * float(v.std(unbiased=True)) / n**0.5 if n > 1 else float("nan")
    return {"mean": float(v.mean()) if n else float("nan"), "ci95": half, "n": n}
