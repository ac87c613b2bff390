"""The built-in demo: a model that ships with the package, recorded on one input, every layer's
matrix checked against the layer's real output, and a report folder of pictures.

By default the model is the tiny Mamba trained on the ``markers`` task (the label is decided by a few
marker words among fillers: a faithful explanation points at them). ``random=True`` uses a wider
4-layer Mamba over bytes with seeded random weights instead, explaining ``text``.
"""

from __future__ import annotations

import time

import torch

from .recording import record


def demo_model(layers: int = 4, seed: int = 0):
    """A ``MambaForCausalLM`` over bytes (vocabulary 256, 128 channels), seeded, with O(1) random weights."""
    try:
        from transformers import MambaConfig, MambaForCausalLM
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("the demo needs transformers: pip install 'implicit_hooks[hf]'") from err
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=layers, intermediate_size=128
    )
    model = MambaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's initialisation is nearly silent; make every factor matter
        for name, p in model.named_parameters():
            if not name.endswith("A_log") and "norm" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _shipped(family: str, task: str, seed: int):
    from .faithfulness import models, tasks

    model = models.load(family, task)
    meta = models.metadata(family, task)
    batch = tasks.TASKS[task](1, seed=seed, **meta["task_options"])
    names = tasks.token_names()
    tokens = [names[i] for i in batch.ids[0].tolist()]
    about = (
        f"model: {family} trained on '{task}' ({meta['held_out_accuracy']:.1%} held-out accuracy); "
        f"label {names[int(batch.label)]}; evidence at {batch.evidence[0].nonzero().flatten().tolist()}"
    )
    return model, batch.ids, tokens, about


def run_demo(
    *,
    family: str = "mamba",
    task: str = "markers",
    seed: int = 0,
    random: bool = False,
    text: str = "Attention-free models attend too.",
    layers: int = 4,
    device: str = "cpu",
    out: str | None = None,
    show_progress: bool = True,
) -> int:
    """Print each layer's exactness (and write a report to ``out``); exit code 1 if any layer is not exact."""
    if random:
        model = demo_model(layers)
        ids = torch.tensor([list(text.encode("utf-8"))])
        tokens = [bytes([b]).decode("utf-8", "replace") for b in text.encode("utf-8")]
        about = f"model: random MambaForCausalLM, {layers} layers, 128 channels; input: {ids.shape[1]} bytes"
    else:
        model, ids, tokens, about = _shipped(family, task, seed)
    model, ids = model.to(device), ids.to(device)
    with torch.no_grad():
        plain = model(ids).logits
        with record(model) as rec:
            recorded = model(ids).logits
    print(about)
    print(f"logits bit-identical with and without recording: {torch.equal(plain, recorded)}")
    print(f"{'block':28} {'kind':9} {'view shape':18} {'‖A·x+bias − y‖/‖y‖':>20} {'dense':>9}")
    worst = 0.0
    for r in rec:
        start = time.perf_counter()
        A = r.attention.dense()
        elapsed = time.perf_counter() - start
        err = r.output_error()
        worst = max(worst, err)
        print(f"{r.name:28} {r.kind:9} {str(tuple(A.shape)):18} {err:20.2e} {elapsed * 1e3:7.1f} ms")
    last = rec[-1].attention.mean(absolute=True)[0, -1]
    top = torch.topk(last, k=min(5, last.numel())).indices.tolist()
    print(f"last layer, last token attends most to positions {top} ({[tokens[i] for i in top]})")
    print("exact (≤ 1e-5)" if worst <= 1e-5 else f"NOT exact: worst relative error {worst:.2e}")
    if out is not None:
        from .report import build_report

        index = build_report(
            model, {"input_ids": ids}, tokens, out, show_progress=show_progress, title="implicit_hooks demo"
        )
        print(f"report: {index}")
    return 0 if worst <= 1e-5 else 1
