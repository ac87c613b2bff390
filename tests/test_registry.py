"""The registry and the patcher base class, with a block of the user's own (no library involved)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import implicit_hooks as ih


class EmaBlock(nn.Module):
    """A user's block: y = σ(g) ⊙ (h_t = a ⊙ h_{t-1} + v_t), per channel."""

    def __init__(self, dim: int):
        super().__init__()
        self.value = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)
        self.log_a = nn.Parameter(-torch.rand(dim))

    def forward(self, x):
        v, g = self.value(x), self.gate(x)
        a = self.log_a.exp()
        state, out = torch.zeros_like(v[:, 0]), []
        for t in range(v.shape[1]):
            state = a * state + v[:, t]
            out.append(state)
        return torch.sigmoid(g) * torch.stack(out, 1)


class EmaPatcher(ih.Patcher):
    kind = "ema"

    def taps(self):
        return {"v": (self.module.value, "output"), "g": (self.module.gate, "output")}

    weight_paths = {"log_a": "log_a"}  # weights the maths reads (guarded against later changes)

    def factors(self, record, dtype):
        v = record.raw["v"].to(dtype).transpose(1, 2)  # (B, C, L)
        g = torch.sigmoid(record.raw["g"].to(dtype)).transpose(1, 2)
        L = v.shape[-1]
        t = torch.arange(L)
        gap = (t[:, None] - t[None, :]).clamp_min(0).to(dtype)
        R = torch.exp(record.weights["log_a"].to(dtype)[:, None, None] * gap) * (t[:, None] >= t[None, :])
        return ih.Factors(values=v, core=ih.DenseCore(R.expand(v.shape[0], -1, -1, -1)), left={"gate": g})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([EmaBlock(5), EmaBlock(5)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_a_users_block_through_register_patcher():
    ih.register_patcher(EmaBlock, EmaPatcher)
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 9, 5)
    outputs = []

    def keep(mod, args, out):
        outputs.append(out.detach())

    handles = [b.register_forward_hook(keep) for b in net.blocks]
    with torch.no_grad(), ih.record(net) as rec:
        net(x)
    for h in handles:
        h.remove()
    assert [r.kind for r in rec] == ["ema", "ema"]
    for r, y in zip(rec, outputs):
        torch.testing.assert_close(r.attention.output(), y.transpose(1, 2))
        assert r.attention.components == ("gate", "ssm")
    with pytest.raises(ih.RecordingError, match="not observable"):
        rec[0].output_error()


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")  # fmt: skip


def hooks_left(net):
    """Our hooks still on ``net``, or on torch's global registration hooks (:class:`Replacements`)."""
    registration = ih.recording._REGISTRATION_HOOKS
    return [(name, d) for name, m in net.named_modules() for d in HOOK_DICTS if getattr(m, d)] + [
        ("torch", key) for hooks in registration for key in hooks if key < 0
    ]


def test_hooks_run_in_order_with_torch_hooks_and_leave_nothing_behind():
    ih.register_patcher(EmaBlock, EmaPatcher)
    net = Net()
    order = []
    block = net.blocks[0]
    first = block.register_forward_pre_hook(lambda m, a, k: order.append("user before"), with_kwargs=True)
    with torch.no_grad(), ih.record(net) as rec:
        last = block.register_forward_pre_hook(lambda m, a: order.append(f"user after {len(rec)}"))
        net(torch.randn(1, 4, 5))
        last.remove()
    first.remove()
    # torch calls hooks in the order they were added: the user's, ours (the record opens), the user's
    assert order == ["user before", "user after 1"]
    assert hooks_left(net) == []
    assert [r.status for r in rec] == ["complete", "complete"]


def test_a_tap_that_names_neither_input_nor_output_leaves_no_hook():
    class Bad(EmaPatcher):
        def taps(self):
            return {"v": (self.module.value, "output"), "g": (self.module.gate, "outputs")}

    net = Net()
    with pytest.raises(ValueError, match="where must be 'input' or 'output'"):
        Bad(net.blocks[0], "blocks.0").attach(lambda record: None)
    assert hooks_left(net) == []


def test_tap_paths_tap_the_same_sub_modules_and_a_missing_one_leaves_no_hook():
    class ByPath(EmaPatcher):
        tap_paths = {"v": ("value", "output"), "g": ("gate", "output")}
        taps = ih.Patcher.taps  # the default: the sub-modules at tap_paths

    def recorded(patcher):
        ih.register_patcher(EmaBlock, patcher, replace=True)
        torch.manual_seed(0)
        net, x = Net(), torch.randn(2, 7, 5)
        with ih.record(net) as rec:
            net(x)
        return rec

    try:
        by_taps, by_path = recorded(EmaPatcher), recorded(ByPath)
        for a, b in zip(by_taps, by_path):
            assert a.raw.keys() == b.raw.keys() == {"v", "g"}
            assert all(torch.equal(a.raw[k], b.raw[k]) for k in ("v", "g"))
            assert torch.allclose(b.view().dense(), a.view().dense())

        class Missing(ByPath):
            tap_paths = {"v": ("value", "output"), "g": ("gates", "output")}

        ih.register_patcher(EmaBlock, Missing, replace=True)
        net = Net()
        with pytest.raises(ih.UnsupportedModelError, match="EmaBlock has no sub-module 'gates' to tap"):
            with ih.record(net):
                pass
        assert hooks_left(net) == []  # the block pre-hook used to go on before the taps were resolved
    finally:
        ih.register_patcher(EmaBlock, EmaPatcher, replace=True)


def test_blocks_are_found_as_named_modules_finds_them():
    """``record`` walks the module tree with a stack of its own: the names and order of ``named_modules``,
    a module registered twice recorded once (under its first name), empty slots skipped, and a class that
    overrides ``named_modules`` asked instead."""
    ih.register_patcher(EmaBlock, EmaPatcher)
    net = Net()
    net.blocks.append(net.blocks[0])  # the same block twice
    net.spare = None  # an empty slot
    net.inner = Net()
    names = ["blocks.0", "blocks.1", "inner.blocks.0", "inner.blocks.1"]
    assert [n for n, m in net.named_modules() if isinstance(m, EmaBlock)] == names
    assert [name for name, _, _ in ih.recording.find_blocks(net)] == names

    class OnlyFirst(Net):
        def named_modules(self, *args, **kwargs):
            yield "blocks.0", self.blocks[0]

    assert [name for name, _, _ in ih.recording.find_blocks(OnlyFirst())] == ["blocks.0"]


class Wrapper(nn.Module):
    """A user's block that holds another supported block."""

    def __init__(self):
        super().__init__()
        self.ema = EmaBlock(5)
        self.value = nn.Linear(5, 5)
        self.gate = nn.Linear(5, 5)
        self.log_a = nn.Parameter(-torch.rand(5))

    def forward(self, x):
        return EmaBlock.forward(self, self.ema(x))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer = Wrapper()

    def forward(self, x):
        return self.outer(x)


def test_blocks_inside_a_block_are_found_unless_its_patcher_says_it_holds_none():
    """The walk goes below a block only when its patcher's ``holds_blocks`` is true (the default for a
    patcher of the user's own; the built-in families', whose sub-modules are projections, convs and norms,
    say false: a hybrid model's walk finds the same blocks either way, ``test_attention.py``)."""

    class ClosedPatcher(EmaPatcher):
        holds_blocks = False

    ih.register_patcher(EmaBlock, EmaPatcher)
    net = Holder()
    try:
        ih.register_patcher(Wrapper, EmaPatcher)
        assert [name for name, _, _ in ih.recording.find_blocks(net)] == ["outer", "outer.ema"]
        x = torch.randn(2, 6, 5)
        with torch.no_grad(), ih.record(net) as rec:
            out = net(x)
        assert rec.names() == ["outer", "outer.ema"]  # the outer call opens first
        with torch.no_grad():
            inner = net.outer.ema(x)
        assert torch.allclose(rec["outer.ema"].attention.output(), inner.transpose(1, 2), atol=1e-5)
        assert torch.allclose(rec["outer"].attention.output(), out.transpose(1, 2), atol=1e-5)
        ih.register_patcher(Wrapper, ClosedPatcher, replace=True)
        assert [name for name, _, _ in ih.recording.find_blocks(net)] == ["outer"]
    finally:
        ih.registry._REGISTRY.pop(ih.registry.class_path(Wrapper), None)
        ih.registry._MATCHES.clear()


def test_lazy_registration_by_string_and_conflicts():
    path = f"{__name__}.EmaBlock"
    ih.register_patcher(path, f"{__name__}:EmaPatcher", replace=True)
    assert path in ih.supported_classes()
    with pytest.raises(ValueError, match="already registered"):
        ih.register_patcher(path, ih.Patcher)
    with pytest.raises(ValueError, match="package.module:Name"):
        ih.register_patcher("a.b.C", "not_lazy")


def test_import_pulls_in_no_model_library():
    code = (
        "import sys, implicit_hooks; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'rwkv', 'nnsight')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_views_of_a_dense_core_and_index_errors():
    B, C, L = 2, 3, 6
    R = torch.randn(B, C, L, L).tril()
    f = ih.Factors(values=torch.randn(B, C, L), core=ih.DenseCore(R, skip=torch.ones(C)))
    view = ih.AttentionView(lambda: f)
    torch.testing.assert_close(view.dense(), R + torch.eye(L))
    torch.testing.assert_close(view.only("ssm").dense(), R)
    with pytest.raises(TypeError, match="integers"):
        view[0, 0, [0.5]]
    with pytest.raises(IndexError, match="4 axes"):
        view[0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        ih.Factors(values=torch.randn(B, C, L), core=ih.DenseCore(R), left={"gate": torch.ones(B, L)})


def test_factors_keep_transposed_diagonal_factors_row_major_and_broadcasts_as_they_are():
    """Factors lay a permuted dense ``(B, C, L)`` factor out row-major once (fused reads then take channel
    runs as views); broadcast views and slices of larger tensors are kept as given, never materialised."""
    B, C, L = 2, 3, 6
    R = torch.randn(B, C, L, L).tril()
    transposed = torch.randn(B, L, C).transpose(1, 2)
    broadcast = torch.rand(B, 1, L).expand(B, C, L)
    sliced = torch.randn(B, L, 2 * C)[..., :C].transpose(1, 2)
    left = {"gate": transposed, "norm": broadcast}
    f = ih.Factors(values=torch.randn(B, C, L), core=ih.DenseCore(R), left=left, right={"act": sliced})
    assert f.left["gate"].is_contiguous() and torch.equal(f.left["gate"], transposed)
    assert f.left["norm"] is broadcast and f.right["act"] is sliced
    view = ih.AttentionView(lambda: f)
    torch.testing.assert_close(view.dense(), (transposed * broadcast)[..., None] * R * sliced[:, :, None, :])


def test_argument_positions_survive_a_wrapped_instance_forward():
    """Wrappers (nnsight) swap the instance forward for ``(*args, **kwargs)``: positions must survive."""
    block = EmaBlock(3)
    block.forward = lambda *args, **kwargs: type(block).forward(block, *args, **kwargs)
    patcher = ih.Patcher(block, "block")
    x = torch.randn(1, 2, 3)
    assert patcher.argument("x", (x,), {}) is x
    assert patcher.argument("x", (), {"x": x}) is x


def test_weight_paths_name_parameters_buffers_and_tensor_attributes():
    """The default ``Patcher.weights``: each path that names a tensor, whatever holds it; an absent bias, a
    missing sub-module or a non-tensor attribute is left out rather than failing the ``record``."""
    block = nn.Module()
    block.conv = nn.Conv1d(2, 2, 3, bias=False)
    block.register_buffer("decay", torch.ones(2))
    block.scale = torch.full((2,), 0.5)  # a plain tensor attribute
    block.eps = 1e-6

    class Paths(ih.Patcher):
        weight_paths = {
            "conv.weight": "conv.weight",
            "conv.bias": "conv.bias",
            "decay": "decay",
            "scale": "scale",
            "eps": "eps",
            "norm.weight": "norm.weight",
        }

    found = Paths(block, "block").weights()
    assert list(found) == ["conv.weight", "decay", "scale"]
    assert found["conv.weight"] is block.conv.weight and found["decay"] is block.decay
    assert found["scale"] is block.scale


def test_clear_forgets_the_calls_so_far_and_keeps_recording():
    ih.register_patcher(EmaBlock, EmaPatcher, replace=True)  # the lazy test registers it by name
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(1, 6, 5), torch.randn(1, 6, 5)
    with torch.no_grad(), ih.record(net) as rec:
        net(x)
        first = rec[0]
        hooks = hooks_left(net)
        rec.clear()
        assert len(rec) == 0 and rec.names() == []
        net(y)
        assert hooks_left(net) == hooks  # nothing detached or attached again
        assert rec.names() == ["blocks.0", "blocks.1"]
    with pytest.raises(ih.RecordingError, match="freed"):
        first.attention.dense()
    # the record after clear() explains the second input: an independent recording of it agrees
    with torch.no_grad(), ih.record(net) as again:
        net(y)
    for r, s in zip(rec, again):
        torch.testing.assert_close(r.attention.dense(), s.attention.dense(), rtol=0, atol=0)
    assert hooks_left(net) == []


def test_a_records_weights_are_the_blocks_own_detached_once():
    """Recorded without grad, a call's weights are the block's tensors, detached on first read (the same
    storage, no autograd history, the same object when read again); with grad, the parameters themselves."""
    ih.register_patcher(EmaBlock, EmaPatcher, replace=True)
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(1, 4, 5)
    with ih.record(net) as rec:
        net(x)
    weights, log_a = rec[0].weights, net.blocks[0].log_a
    assert list(weights) == ["log_a"] and len(weights) == 1
    kept = weights["log_a"]
    assert not kept.requires_grad and log_a.requires_grad
    assert kept.data_ptr() == log_a.data_ptr() and kept is weights["log_a"]
    with pytest.raises(KeyError, match="this record has"):
        weights["missing"]
    with ih.record(net, grad=True) as rec:
        net(x)
    assert rec[0].weights["log_a"] is log_a
