"""Synthetic tasks whose evidence is known, generated from a seed (no datasets to download).

Every task yields a :class:`Batch`: token ids ``(B, L)``, the label token the model must predict at the
last position (the query), and a boolean ``evidence`` mask ``(B, L)`` of the positions that decide the
label. Tokens share one vocabulary (:data:`VOCAB`): special tokens, two label tokens per task family,
and a pool of distractor tokens.

* :func:`markers` – sentiment-like: a few marker tokens of one polarity scattered among distractors;
  label = the polarity; evidence = the marker positions.
* :func:`recall` – key–value recall: the queried key, then pairs ``k v``, then the query; label = the
  value bound to the key; evidence = the queried pair (key and value positions).
* :func:`patches` – a 2-D grid flattened row by row with one object: a few cells of one object type
  at a random location among background noise; label = the object type; evidence = its cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# --- the shared vocabulary ----------------------------------------------------------------------
PAD, QUERY, SEP = 0, 1, 2
POSITIVE, NEGATIVE = 3, 4  # label tokens of `markers`
POS_MARKERS = (5, 6, 7)
NEG_MARKERS = (8, 9, 10)
KEYS = tuple(range(11, 27))  # 16 keys for `recall`
VALUES = tuple(range(27, 35))  # 8 values (also the labels of `recall`)
OBJECT_TYPES = (35, 36, 37, 38)  # cell tokens of the 4 object types of `patches` (also their labels)
DISTRACTORS = tuple(range(39, 64))
VOCAB = 64


@dataclass
class Batch:
    """``ids (B, L)``, ``label (B,)`` token to predict at the last position, ``evidence (B, L)`` bool,
    ``question (B, L)`` bool (the query token, and the queried key in ``recall``)."""

    ids: Tensor
    label: Tensor
    evidence: Tensor
    task: str
    question: Tensor | None = None  # (B, L) bool: positions of the question, never removed

    def __post_init__(self) -> None:
        if self.question is None:  # by default the question is the final QUERY token
            self.question = torch.zeros_like(self.evidence)
            self.question[:, -1] = True

    def __len__(self) -> int:
        return len(self.ids)


def _choice(options: tuple[int, ...], shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.tensor(options)[torch.randint(len(options), shape, generator=g)]


def markers(n: int, *, length: int = 32, n_markers: int = 3, seed: int = 0) -> Batch:
    """``n`` sequences of ``length``: distractors, ``n_markers`` markers of one polarity, a final QUERY."""
    g = torch.Generator().manual_seed(seed)
    ids = _choice(DISTRACTORS, (n, length), g)
    ids[:, -1] = QUERY
    positive = torch.rand(n, generator=g) < 0.5
    evidence = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):  # a loop over samples of a data generator, not over a model's sequence
        where = torch.randperm(length - 1, generator=g)[:n_markers]
        pool = POS_MARKERS if positive[i] else NEG_MARKERS
        ids[i, where] = _choice(pool, (n_markers,), g)
        evidence[i, where] = True
    label = torch.where(positive, POSITIVE, NEGATIVE)
    return Batch(ids, label, evidence, "markers")


def recall(n: int, *, pairs: int = 8, seed: int = 0) -> Batch:
    """The queried key, SEP, ``pairs`` distinct key–value pairs, QUERY: length ``2·pairs + 3``.

    The answer is the value bound to the queried key, read far back from the query position; the
    question (the queried key at position 0 and QUERY) is never removed by the perturbation metrics.
    """
    g = torch.Generator().manual_seed(seed)
    length = 2 * pairs + 3
    ids = torch.zeros(n, length, dtype=torch.long)
    evidence = torch.zeros(n, length, dtype=torch.bool)
    question = torch.zeros(n, length, dtype=torch.bool)
    label = torch.zeros(n, dtype=torch.long)
    for i in range(n):  # a loop over samples of a data generator, not over a model's sequence
        keys = torch.tensor(KEYS)[torch.randperm(len(KEYS), generator=g)[:pairs]]
        values = _choice(VALUES, (pairs,), g)
        asked = int(torch.randint(pairs, (1,), generator=g))
        ids[i, 0], ids[i, 1], ids[i, -1] = keys[asked], SEP, QUERY
        ids[i, 2 : 2 + 2 * pairs : 2], ids[i, 3 : 3 + 2 * pairs : 2] = keys, values
        label[i] = values[asked]
        evidence[i, 2 + 2 * asked] = evidence[i, 3 + 2 * asked] = True
        question[i, 0] = True
    question[:, -1] = True
    return Batch(ids, label, evidence, "recall", question)


SHAPES = ((0, 0), (0, 1), (1, 0), (1, 1))  # a 2×2 object, cells as (row, col) offsets


def patches(n: int, *, grid: tuple[int, int] = (6, 6), seed: int = 0) -> Batch:
    """A ``grid`` of distractor cells with one 2×2 object of a random type, flattened, then QUERY."""
    g = torch.Generator().manual_seed(seed)
    H, W = grid
    ids = _choice(DISTRACTORS, (n, H * W + 1), g)
    ids[:, -1] = QUERY
    evidence = torch.zeros(n, H * W + 1, dtype=torch.bool)
    label = _choice(OBJECT_TYPES, (n,), g)
    for i in range(n):
        top = int(torch.randint(H - 1, (1,), generator=g))
        left = int(torch.randint(W - 1, (1,), generator=g))
        for dr, dc in SHAPES:
            cell = (top + dr) * W + (left + dc)
            ids[i, cell] = label[i]
            evidence[i, cell] = True
    return Batch(ids, label, evidence, "patches")


TASKS = {"markers": markers, "recall": recall, "patches": patches}


def token_names() -> list[str]:
    """A readable name for every token of :data:`VOCAB` (for reports and pictures)."""
    names = [f"w{i}" for i in range(VOCAB)]
    names[PAD], names[QUERY], names[SEP] = "<pad>", "?", "|"
    names[POSITIVE], names[NEGATIVE] = "POS", "NEG"
    for tok, word in zip(POS_MARKERS, ("good", "great", "fine")):
        names[tok] = word
    for tok, word in zip(NEG_MARKERS, ("bad", "awful", "poor")):
        names[tok] = word
    for i, tok in enumerate(KEYS):
        names[tok] = f"k{i}"
    for i, tok in enumerate(VALUES):
        names[tok] = f"v{i}"
    for tok, shape in zip(OBJECT_TYPES, ("■", "▲", "●", "◆")):
        names[tok] = shape
    fillers = "the a of and to in is it on at as by or an be we so if no up do go me my us".split()
    for tok, word in zip(DISTRACTORS, fillers):
        names[tok] = word
    return names
