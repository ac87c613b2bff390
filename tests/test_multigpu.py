"""A model sharded over two GPUs (accelerate's dispatch): records and views stay on their layer's device
and equal those of the same model on one device; explanations move only per-layer rows.

Needs two CUDA devices: run on the 2-GPU machine (skipped elsewhere, with that reason)."""

import copy
import time

import pytest
import torch
from conftest import randomize, rel_err
from transformers import MambaConfig, MambaForCausalLM

import implicit_hooks as ih

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (the 2-GPU machine)"
)


def test_sharded_views_equal_single_device_views():
    from accelerate import dispatch_model

    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=64,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=4,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    model = randomize(MambaForCausalLM(cfg)).eval()
    single = copy.deepcopy(model).to("cuda:0")
    device_map = {
        "backbone.embeddings": 0,
        "backbone.layers.0": 0,
        "backbone.layers.1": 0,
        "backbone.layers.2": 1,
        "backbone.layers.3": 1,
        "backbone.norm_f": 1,
        "lm_head": 1,
    }
    sharded = dispatch_model(model, device_map=device_map)
    ids = torch.randint(0, 64, (2, 57), device="cuda:0")
    with torch.no_grad():
        with ih.record(single) as rec1:
            logits1 = single(ids).logits
        with ih.record(sharded) as rec2:
            logits2 = sharded(ids).logits
    assert rel_err(logits2, logits1) < 1e-5
    expected = {0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cuda:1"}
    for i, (a, b) in enumerate(zip(rec1, rec2)):
        view = b.attention
        assert str(view.device) == expected[i] and str(view.dense().device) == expected[i]
        assert rel_err(view.dense(), a.attention.dense()) < 1e-5
        assert rel_err(view.mean(absolute=True), a.attention.mean(absolute=True)) < 1e-5
        assert b.output_error() < 1e-5
    timings = {}
    for Method in (ih.Rollout, ih.Attribution, ih.GradAttention):
        torch.cuda.synchronize()
        start = time.perf_counter()
        r2 = Method(sharded).attribute(ids)
        torch.cuda.synchronize()
        timings[Method.__name__] = time.perf_counter() - start
        r1 = Method(single).attribute(ids)
        assert rel_err(r2, r1) < 1e-5, Method.__name__
    print("sharded explanation timings (s):", {k: round(v, 4) for k, v in timings.items()})
