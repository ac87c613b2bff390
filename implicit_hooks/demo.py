"""The built-in demo: a small Mamba built from its config with seeded random weights, recorded, and
every layer's matrix checked against the layer's real output."""

from __future__ import annotations

import time

import torch

from .recording import record


def demo_model(layers: int = 4, seed: int = 0):
    """A small ``MambaForCausalLM`` over bytes (vocabulary 256), seeded, with O(1) random weights."""
    try:
        from transformers import MambaConfig, MambaForCausalLM
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("the demo needs transformers: pip install 'implicit_hooks[hf]'") from err
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=256,
        hidden_size=64,
        state_size=16,
        num_hidden_layers=layers,
        intermediate_size=128,
        conv_kernel=4,
    )
    model = MambaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's initialisation is nearly silent; make every factor matter
        for name, p in model.named_parameters():
            if not name.endswith("A_log") and "norm" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def run_demo(
    text: str, device: str = "cpu", layers: int = 4, out: str | None = None, show_progress: bool = True
) -> int:
    model = demo_model(layers).to(device)
    ids = torch.tensor([list(text.encode("utf-8"))], device=device)
    with torch.no_grad():
        plain = model(ids).logits
        with record(model) as rec:
            recorded = model(ids).logits
    print(
        f"model: MambaForCausalLM, {layers} layers, 128 channels, N = 16; input: {ids.shape[1]} byte tokens"
    )
    print(f"logits bit-identical with and without recording: {torch.equal(plain, recorded)}")
    print(f"{'block':28} {'kind':6} {'view shape':18} {'‖A·x+bias − y‖/‖y‖':>20} {'dense':>9}")
    worst = 0.0
    for r in rec:
        start = time.perf_counter()
        A = r.attention.dense()
        elapsed = time.perf_counter() - start
        err = r.output_error()
        worst = max(worst, err)
        print(f"{r.name:28} {r.kind:6} {str(tuple(A.shape)):18} {err:20.2e} {elapsed * 1e3:7.1f} ms")
    last = rec[-1].attention.mean(absolute=True)[0, -1]
    top = torch.topk(last, k=min(5, last.numel())).indices.tolist()
    tokens = [text.encode("utf-8")[i : i + 1].decode("utf-8", "replace") for i in top]
    print(f"last layer, last token attends most to positions {top} ({tokens})")
    print("exact (≤ 1e-5)" if worst <= 1e-5 else f"NOT exact: worst relative error {worst:.2e}")
    if out is not None:
        from .report import build_report

        tokens = [bytes([b]).decode("utf-8", "replace") for b in text.encode("utf-8")]
        index = build_report(
            model, {"input_ids": ids}, tokens, out, show_progress=show_progress, title="implicit_hooks demo"
        )
        print(f"report: {index}")
    return 0 if worst <= 1e-5 else 1
