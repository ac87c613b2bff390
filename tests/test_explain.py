"""Explanation methods against a hand computation on a two-layer model: dense matrices from the
independent impulse reference, gradients from plain autograd on the real model, rollouts by loops."""

import pytest
import torch
from mamba_reference import impulse_matrix, reference
from test_mamba import mamba

import implicit_hooks as ih
from implicit_hooks.explain import Attribution, GradAttention, RawAttention, Rollout

Q = 8  # the query position explained (not the last one)


@pytest.fixture(scope="module")
def case():
    model = mamba("cpu", layers=2, seed=3)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    calls, handles = [], []
    mixers = [layer.mixer for layer in model.backbone.layers]

    def pre(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        calls.append({"module": mod, "hidden": hidden})

    def out(mod, args, output):
        args[0].retain_grad()
        calls[-1]["y"] = args[0]

    for m in mixers:
        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.out_proj.register_forward_hook(out)]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    target = logits[:, Q].argmax(-1)
    logits[:, Q].gather(1, target[:, None]).sum().backward()
    for h in handles:
        h.remove()
    layers = []
    for c in calls:
        fr = reference(c["module"], c["hidden"].detach())
        layers.append(
            {
                "A": impulse_matrix(fr)[:, :, : Q + 1, : Q + 1],  # (B, C, Q+1, Q+1)
                "x": fr.x.transpose(1, 2)[..., : Q + 1],  # (B, C, Q+1)
                "g": c["y"].grad.double().transpose(1, 2)[..., : Q + 1],  # ∂T/∂y
                "h_grad": c["hidden"].grad.double()[:, : Q + 1],  # ∂T/∂(block input)
            }
        )
    return model, ids, layers


def expected_padded(r, L=11):
    out = torch.zeros(r.shape[0], L, dtype=torch.float64)
    out[:, : Q + 1] = r
    return out


def grad_maps(layers):
    return [(l["g"][..., :, None] * l["A"] * l["x"][..., None, :]).clamp_min(0).mean(1) for l in layers]


def close(a, b) -> bool:
    err = float((a.double() - b).norm() / b.norm())
    assert err < 1e-4, err
    return True


def test_raw_attention_per_layer_and_mean(case):
    model, ids, layers = case
    maps = [l["A"].abs().mean(1) for l in layers]
    assert close(
        RawAttention(model).attribute(ids, query=Q), expected_padded((maps[0][:, Q] + maps[1][:, Q]) / 2)
    )
    assert close(RawAttention(model, layer=1).attribute(ids, query=Q), expected_padded(maps[1][:, Q]))
    signed = RawAttention(model, aggregate="mean", layer=0).attribute(ids, query=Q)
    assert close(signed, expected_padded(layers[0]["A"].mean(1)[:, Q]))


def test_rollout_by_hand(case):
    model, ids, layers = case
    eye = torch.eye(Q + 1, dtype=torch.float64)
    hats = []
    for l in layers:
        m = l["A"].abs().mean(1) + eye
        hats.append(m / m.sum(-1, keepdim=True))
    rollout = hats[1] @ hats[0]  # layer 2 after layer 1
    assert close(Rollout(model).attribute(ids, query=Q), expected_padded(rollout[:, Q]))


def test_grad_attention_by_hand(case):
    model, ids, layers = case
    maps = grad_maps(layers)
    assert close(
        GradAttention(model).attribute(ids, query=Q), expected_padded((maps[0][:, Q] + maps[1][:, Q]) / 2)
    )


def test_attribution_variants_by_hand(case):
    model, ids, layers = case
    eye = torch.eye(Q + 1, dtype=torch.float64)
    m1, m2 = grad_maps(layers)
    R = (eye + m2) @ (eye + m1)
    assert close(Attribution(model).attribute(ids, query=Q), expected_padded(R[:, Q]))
    assert close(Attribution(model, start_layer=1).attribute(ids, query=Q), expected_padded((eye + m2)[:, Q]))
    # the published code's variant: gradient at the block input, max over model channels
    weighted = [(l["A"].abs().mean(1) * l["h_grad"].amax(-1)[:, :, None]).clamp_min(0) for l in layers]
    R = (eye + weighted[1]) @ (eye + weighted[0])
    assert close(Attribution(model, grad="input_max").attribute(ids, query=Q), expected_padded(R[:, Q]))


def test_s6_option_uses_the_s6_only_matrices(case):
    model, ids, layers = case
    with torch.no_grad(), ih.record(model) as rec:
        model(ids)
    s6 = [r.attention.only("ssm").mean(absolute=True)[:, Q, : Q + 1] for r in rec]
    assert close(
        RawAttention(model, matrix="s6").attribute(ids, query=Q),
        expected_padded((s6[0] + s6[1]).double() / 2),
    )
    assert not torch.allclose(
        RawAttention(model, matrix="s6").attribute(ids, query=Q), RawAttention(model).attribute(ids, query=Q)
    )


def test_shared_signature_normalisation_and_errors(case):
    model, ids, _ = case
    for method in (RawAttention(model), Rollout(model), GradAttention(model), Attribution(model)):
        r = method.attribute(ids)  # default: the last token, the predicted class
        assert r.shape == (2, 11) and torch.isfinite(r).all() and r.abs().sum() > 0
    r = RawAttention(model, normalize="sum").attribute(ids, query=4)
    torch.testing.assert_close(r.abs().sum(-1), torch.ones(2, dtype=r.dtype))
    assert torch.all(r[:, 5:] == 0)  # causal: nothing after the query
    with pytest.raises(ValueError, match="aggregate"):
        Rollout(model, aggregate="mean")
    with pytest.raises(IndexError, match="query"):
        RawAttention(model).attribute(ids, query=11)
    r = GradAttention(model).attribute(ids, target=lambda out: out.logits[:, -1, 3])
    assert r.shape == (2, 11)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "rglru", "rwkv4"])
def test_every_method_on_every_family(family):
    """Gradient methods need the real block outputs in the graph (RWKV's in-place state is avoided by
    explaining without a cache); every method gives a finite, causal, non-trivial relevance."""
    from implicit_hooks.faithfulness import models, tasks

    model = models.load(family, "markers")
    batch = tasks.markers(3, seed=2)
    for Method in (RawAttention, Rollout, GradAttention, Attribution):
        r = Method(model).attribute(batch.ids, target=batch.label, query=20)
        assert r.shape == (3, 32) and torch.isfinite(r).all() and r[:, :21].abs().sum() > 0
        assert torch.all(r[:, 21:] == 0)
