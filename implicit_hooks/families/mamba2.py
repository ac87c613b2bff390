"""Mamba-2 (SSD) blocks of transformers: ``Mamba2Mixer`` and the mixers of every hybrid that embeds it.

``BambaMixer``, ``NemotronHMamba2Mixer``, ``GraniteMoeHybridMambaLayer``, ``Zamba2MambaMixer`` and
``FalconH1Mixer`` (``docs/maths.md``). Channels are the ``C = H·P`` inner channels, ``c = h·P + p``;
head ``h`` reads the group ``g(h) = h // (H/G)`` of ``B`` and ``C``. Per channel::

    y = G · N · (R_h + diag(D_h)) · Z · M · P · x + bias
    R_h[t, j] = (C_t · B_j) · exp(A_h · Σ_{k=j+1..t} Δ_k,h) · Δ_j,h        (segsum of Δ, log space)

``x``/``z``/``dt`` are parts of the ``in_proj`` output, ``M`` the depthwise conv over ``x`` (``B`` and
``C`` come out of the same conv and are frozen data), ``Z = σ(u)`` the SiLU slope at the conv output,
``Δ = clamp(softplus(dt + dt_bias), time_step_limit)`` (no clamp on single-token decode steps, as in
the model), ``G = SiLU(z)`` and ``N = w / rms_t`` the gated RMS norm frozen per token and group of
channels, so that ``A·x + bias`` is the input of ``out_proj``. Only ``in_proj`` (and ``out_proj``, off
the fused training path) are tapped: nothing depends on which scan kernel transformers picked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patcher import Patcher, require
from ..recording import BlockRecord
from ..view import Core, Factors, count, take
from ._hf import activation_slope, cache_states, keep_conv_context


def segsum(delta: Tensor) -> Tensor:
    """``S`` with ``S[..., t] − S[..., j] = Σ_{k=j+1..t} Δ_k``: the inclusive cumulative sum, in float64.

    Kept in float64 so that the difference of two large sums keeps float32 precision at any length.
    """
    return delta.double().cumsum(-1)


class SSDCore(Core):
    """``R_h + diag(D_h)`` of one Mamba-2 call, expanded to the channels of each head.

    Shapes: ``delta (B, H, L)``, ``A (H,)``, ``B``/``C (B, L, G, N)``, ``D (H,)``, ``head_of (C,)``
    (``head_dim``: where ``head_of[c] = c // head_dim``, channels head by head, so a run of channels maps to
    its heads without a sort or a read of the device).
    :meth:`heads` computes blocks of ``R_h`` itself; :meth:`block` computes each head a tile of channels
    needs once and expands it to the channels (a tile usually spans one or two heads).
    """

    # Peak temporaries per entry: the float64 segment sums (2) and their float32 copy (1), then the
    # expanded channels (1); heads shared by several channels of a tile cost less.
    work_per_entry = 4
    has_skip = True
    #: blocks of at most this many rows compute each channel's head as it is (no ``unique``, which reads
    #: back from the device); taller blocks compute each head once, a head serving its ``P`` channels
    rows_per_channel = 16

    def __init__(
        self,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        head_of: Tensor,
        conv_width: int = 1,
        *,
        head_dim: int | None = None,
    ):
        H, G = delta.shape[1], B.shape[2]
        if H % G != 0 or tuple(A.shape) != (H,) or C.shape != B.shape or B.shape[:2] != delta.shape[::2]:
            raise ValueError(
                f"SSDCore: delta {tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} and "
                f"C {tuple(C.shape)} do not describe (batch, heads, L) with heads in groups"
            )
        # contiguous once here (the recorded taps come as views), not copied by every fused read
        self.delta, self.A, self.D, self.head_of = delta.contiguous(), A, D, head_of
        self.B, self.C = B.contiguous(), C.contiguous()
        self.conv_width = conv_width  # the block's conv taps: wider than HEAD_TAPS goes by channel
        # head_of[c] = c // head_dim (channels head by head): a run of channels maps to its heads on the host
        self.head_dim = head_dim
        self.heads_per_group, self.n_groups = H // G, G
        self.has_skip = D is not None
        self.cumdelta = segsum(delta)  # (B, H, L) float64

    def heads(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``R_h[rows, cols]`` of batch row ``b``, shape ``(len(heads), len(rows), len(cols))``."""
        dtype = self.delta.dtype
        S = self.cumdelta[b].index_select(0, heads)  # (nh, L)
        A = self.A.index_select(0, heads).to(dtype)[:, None, None]
        # Σ_{k=j+1..t} Δ_k: one subtraction of segment sums per entry (j > t is masked below)
        gap = (
            (S.index_select(1, rows)[:, :, None] - S.index_select(1, cols)[:, None, :])
            .clamp_min_(0)
            .to(dtype)
        )
        decay = torch.exp(A * gap)
        del gap  # keeps the peak at three temporaries per entry
        if self.n_groups == 1:  # every head reads group 0: nothing to find out (no read-back)
            groups = torch.zeros(1, dtype=torch.long, device=heads.device)
            which = torch.zeros(len(heads), dtype=torch.long, device=heads.device)
        elif len(rows) <= self.rows_per_channel:  # a few rows: each head's group as it is (no read-back)
            groups, which = heads // self.heads_per_group, torch.arange(len(heads), device=heads.device)
        else:  # each group's scores once
            groups, which = torch.unique(heads // self.heads_per_group, return_inverse=True)
        C_rows = self.C[b].index_select(0, rows).index_select(1, groups).to(dtype)  # (nr, ng, N)
        B_cols = self.B[b].index_select(0, cols).index_select(1, groups).to(dtype)  # (ncol, ng, N)
        scores = torch.einsum("tgn,jgn->gtj", C_rows, B_cols)  # (ng, nr, ncol): C_t · B_j, once per group
        delta_cols = self.delta[b].index_select(0, heads).index_select(1, cols).to(dtype)  # (nh, ncol): Δ_j
        causal = (rows[:, None] >= cols[None, :]).to(dtype)
        return scores.index_select(0, which) * decay * delta_cols[:, None, :] * causal

    def block(self, b: int, chans: Tensor, rows: Tensor, cols: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        dtype = self.delta.dtype
        head = self.head_of.index_select(0, chans)
        if ssm and len(rows) <= self.rows_per_channel:
            # a few rows (a last-token row): each channel's head as it is, no read-back to share heads
            out = self.heads(b, head, rows, cols)
        elif ssm:
            heads, which = torch.unique(head, return_inverse=True)  # each head once, then to its channels
            out = self.heads(b, heads, rows, cols).index_select(0, which)
        else:
            out = torch.zeros(len(chans), len(rows), len(cols), dtype=dtype, device=self.delta.device)
        if skip and self.D is not None:
            eye = (rows[:, None] == cols[None, :]).to(dtype)
            out = out + self.D.index_select(0, head).to(dtype)[:, None, None] * eye
        return out

    @property
    def by_head(self) -> bool:
        """Whether fused reads go by head (``HeadTiles``), not by channel."""
        from ..kernels import HEAD_TAPS, TUNING

        return TUNING["HEAD_TILES"] and self.conv_width <= HEAD_TAPS

    @property
    def fused_rows(self) -> bool:
        """A last-token row by the by-head kernel: 0.20 / 0.30 / 3.7 ms for 1536 channels on the H200 against
        0.79 / 0.78 / 4.2 ms by the torch path at L = 512 / 2048 / 16384, at 7 / 18 / 106 MB of peak against
        23 / 89 / 210 MB (benchmarks/results/gpu.md, run WW); by channel, the torch path's."""
        return self.by_head

    @property
    def fused_work(self) -> int:
        if self.by_head:
            return 8  # by head: the left, right and skip factors; the core's tiles live in a small scratch
        return 3 * self.B.shape[-1] + 12  # by channel: U, V and W of N states, a few per-position arrays

    def tile_parts(self, chans: Tensor | slice) -> list[Tensor] | None:
        """Channels of one group of ``B``/``C`` at a time (all at once where there is one group)."""
        if self.n_groups == 1:
            return None
        group = take(self.head_of, chans) // self.heads_per_group
        return [(group == g).nonzero().flatten() for g in torch.unique(group)]

    def tiles(self, b: int, chans: Tensor | slice, **parts: Any) -> Any:
        """The fused Triton assembler (:mod:`implicit_hooks.kernels`) for channels of one group of
        ``B``/``C``: with ``kernels.TUNING["HEAD_TILES"]`` (and convs of up to ``HEAD_TAPS`` taps) by head
        (``HeadTiles``: one core per head, the conv as shifted multiply-adds, dense blocks and channel
        sums), else by channel (the scalar-decay variant of ``DiagonalTiles``). None
        (the torch path) when ``chans`` spans several groups or the state size is not a power of two ≥ 16."""
        from ..kernels import HEAD_TAPS, TUNING, DiagonalTiles, HeadTiles

        N = self.B.shape[-1]
        if N < 16 or N & (N - 1):
            return None
        head = take(self.head_of, chans)
        # a run of channels laid out head by head: its heads and group are known on the host
        run = None
        if isinstance(chans, slice) and self.head_dim:
            run = (chans.start, count(chans), self.head_dim)
        g = 0  # one group of B/C
        if run is not None:
            first, last = (chans.start // self.head_dim, (chans.stop - 1) // self.head_dim)
            if first // self.heads_per_group != last // self.heads_per_group:
                return None
            g = first // self.heads_per_group
        elif self.n_groups > 1:
            group = head // self.heads_per_group
            if bool((group != group[0]).any()):
                return None
            g = int(group[0])

        taps = parts["taps"]
        if not TUNING["HEAD_TILES"] or (taps is not None and taps.shape[1] > HEAD_TAPS):  # by channel
            S = F.pad(self.cumdelta[b].index_select(0, head), (1, 0))  # (nc, L + 1), S[p + 1] = Σ_{k ≤ p} Δ_k
            A = self.A.index_select(0, head)[:, None].expand(-1, N)
            B, C, delta = self.B[b, :, g], self.C[b, :, g], self.delta[b].index_select(0, head)
            D = None if self.D is None else self.D.index_select(0, head)
            return DiagonalTiles(S, A, B, C, delta, D, scalar=True, **parts)
        # every head (those without channels in this read are skipped by the kernels): no device read here
        B, C = self.B[b, :, g], self.C[b, :, g]
        return HeadTiles(self.cumdelta[b], self.A, self.delta[b], B, C, head, self.D, run=run, **parts)

    def matvec(self, b: int, v: Tensor, *, ssm: bool, skip: bool) -> Tensor:
        """``(R + diag(D)) @ v`` for all channels, ``v (C, L)``, through :func:`ssd_scan` (``O(L)``)."""
        dtype = self.delta.dtype
        v = v.to(dtype)
        H, L = self.delta.shape[1], v.shape[1]
        out = torch.zeros_like(v)
        if ssm:
            xa = v.view(1, H, -1, L)  # channels are laid out head by head: c = h·P + p
            y = ssd_scan(
                xa,
                self.delta[b : b + 1].to(dtype),
                self.A.to(dtype),
                self.B[b : b + 1].to(dtype),
                self.C[b : b + 1].to(dtype),
                None,
            )
            out = y.reshape(-1, L)
        if skip and self.D is not None:
            out = out + self.D.to(dtype).index_select(0, self.head_of)[:, None] * v
        return out


def ssd_scan(
    xa: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor | None,
    chunk: int = 64,
    span: int = 1024,
) -> Tensor:
    """The SSM output without skip, ``y_t = C_t · h_t``: ``(B, H, P, L)``.

    ``h_t = exp(A·Δ_t) h_{t−1} + Δ_t · B_t ⊗ x_t`` from ``h0 (B, H, P, N)`` (zeros if None); shapes
    ``xa (B, H, P, L)``, ``delta (B, H, L)``, ``A (H,)``, ``B``/``C (B, L, G, N)``. Only the gated norm
    needs it (its per-token scale), and ``SSDCore.matvec``. All chunks of a span at once
    (:func:`_ssd_span`); spans of ``span`` positions bound the memory and the work across chunks (the
    states of its chunks, ``H · P · N`` each, and their ``n × n`` carries), and only they loop: one pass to
    1024 positions, 16 at 16k, where a loop over chunks launched some 20 kernels a chunk.
    """
    batch, H, P, L = xa.shape
    G, N = B.shape[2:]
    span = max(chunk, span // chunk * chunk)  # every span but the last: whole chunks
    state = (
        xa.new_zeros(batch, G, H // G, P, N) if h0 is None else h0.to(xa.dtype).reshape(batch, G, -1, P, N)
    )
    out = []
    for s in range(0, L, span):  # a few spans of the sequence, not its positions or chunks
        e = min(s + span, L)
        y, state = _ssd_span(xa[..., s:e], delta[..., s:e], A, B[:, s:e], C[:, s:e], state, chunk)
        out.append(y)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def _ssd_span(
    xa: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """:func:`ssd_scan` of one span from the state ``h0 (B, G, H/G, P, N)``, every chunk at once: ``(y, the
    state at its end)``.

    Inside a chunk the entries of ``R_h``; each chunk's own inputs give its end state ``u_c``; the state
    entering chunk ``c`` is ``Σ_{d<c} exp(A_h Σ_{chunks d+1..c−1} Δ) u_d + exp(A_h Σ_{chunks <c} Δ) h0``, one
    ``n × n`` lower-triangular product over the ``n`` chunks, its exponents differences of float64 sums
    (all ≤ 0). The last chunk is padded with ``Δ = 0``: no decay and no input. Laid out ``(batch, group,
    chunk, head in group, …)``: the products batch over contiguous dimensions, and ``C_t · B_j`` is computed
    once per group, not once per head.
    """
    batch, H, P, L = xa.shape
    G, N = B.shape[2:]
    Q = min(chunk, L)
    n = -(-L // Q)
    pad = n * Q - L
    if pad:
        xa, delta = F.pad(xa, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))

    def by_chunk(t: Tensor) -> Tensor:  # (B, G·r, …, n·Q) → (B, G, n, r, …, Q)
        t = t.reshape(batch, G, H // G, *t.shape[2:-1], n, Q)
        return t.movedim(-2, 2).contiguous()

    x = by_chunk(xa)  # (B, G, n, r, P, Q)
    d = by_chunk(delta)  # (B, G, n, r, Q)
    a = A.reshape(G, 1, -1, 1)
    log_decay = (a * d).cumsum(-1)  # A·Σ_{k=chunk start..t} Δ_k
    Bc = B.reshape(batch, n, Q, G, N).permute(0, 3, 1, 2, 4)  # (B, G, n, Q, N)
    Cc = C.reshape(batch, n, Q, G, N).permute(0, 3, 1, 2, 4)
    scores = (Cc @ Bc.transpose(-1, -2))[:, :, :, None]  # C_t·B_j: (B, G, n, 1, Q, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=xa.device).tril()
    gap = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -torch.inf)
    inside = torch.exp(gap) * scores * d[..., None, :]  # R_h inside each chunk: (B, G, n, r, Q, Q)
    y = x @ inside.transpose(-1, -2)  # (B, G, n, r, P, Q)
    to_end = torch.exp(log_decay[..., -1:] - log_decay) * d  # (B, G, n, r, Q)
    own = ((x * to_end[..., None, :]).flatten(3, 4) @ Bc).unflatten(3, (H // G, P))  # u_c: (B, G, n, r, P, N)
    total = log_decay[..., -1].double()  # (B, G, n, r): each chunk's whole decay
    through = total.cumsum(2)  # Σ over chunks ≤ c
    before = through - total  # Σ over chunks < c
    later = torch.ones(n, n, dtype=torch.bool, device=xa.device).tril(-1)[:, :, None]  # d < c
    carry = torch.exp((before[:, :, :, None] - through[:, :, None]).masked_fill(~later, -torch.inf))
    entering = torch.einsum("bgcdr,bgdrpn->bgcrpn", carry.to(xa.dtype), own)
    entering = entering + torch.exp(before).to(xa.dtype)[..., None, None] * h0[:, :, None]
    from_state = entering.flatten(3, 4) @ Cc.transpose(-1, -2)  # C_t · h entering t's chunk
    y = y + from_state.unflatten(3, (H // G, P)) * torch.exp(log_decay)[..., None, :]
    to_last = torch.exp(through[:, :, -1:] - through).to(xa.dtype)  # (B, G, n, r)
    state = torch.exp(through[:, :, -1]).to(xa.dtype)[..., None, None] * h0
    state = state + torch.einsum("bgdr,bgdrpn->bgrpn", to_last, own)
    y = y.permute(0, 1, 3, 4, 2, 5).reshape(batch, H, P, n * Q)  # (B, G, r, P, n, Q)
    return y[..., :L], state


def causal_conv(signal: Tensor, taps: Tensor, bias: Tensor | None, context: Tensor) -> Tensor:
    """Depthwise causal conv of ``signal (B, C, L)`` with ``taps (C, K)``, reading ``context (B, C, K−1)``."""
    return F.conv1d(torch.cat([context, signal], dim=-1), taps[:, None, :], bias, groups=taps.shape[0])


def padding_mask(record: BlockRecord, batch: int, L: int, dtype: torch.dtype) -> Tensor | None:
    """The ``(B, L)`` mask the block applied (None when the model passed none), checked against the call."""
    mask = record.raw.get("attention_mask")
    if mask is None:
        return None
    require(
        mask.dim() == 2 and tuple(mask.shape) == (batch, L),
        f"{record.name}: attention_mask of shape {tuple(mask.shape)} does not match the call's "
        f"(batch, length) = {(batch, L)}; only 2-D padding masks are applied by this block",
    )
    return mask.to(dtype)


def cache_of(patcher: Patcher, args: tuple, kwargs: dict) -> Any:
    """The cache a mixer was called with (``cache`` in transformers ≥ 5.2x, ``cache_params`` before)."""
    cache = patcher.argument("cache", args, kwargs)
    return patcher.argument("cache_params", args, kwargs) if cache is None else cache


def norm_layout(norm: nn.Module | None, channels: int, name: str) -> tuple[bool, int, float] | None:
    """``(norm_before_gate, group_size, eps)`` of the gated RMS norm after the scan; None for no norm.

    transformers ≥ 5.2x stores ``group_size`` (Mamba2, Bamba, NemotronH, Granite, Zamba2); FalconH1
    stores ``n_groups`` and ``norm_before_gate``; earlier Mamba2/Bamba/Granite norms use one group.
    """
    if norm is None or isinstance(norm, nn.Identity):
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    require(
        type(norm).__name__.endswith("RMSNormGated") and getattr(norm, "weight", None) is not None and eps,
        f"{name}: the norm after the scan is a {type(norm).__name__}, not a gated RMS norm this patcher "
        "knows; register a patcher of your own for this block",
    )
    group = getattr(norm, "group_size", None)
    if group is None:
        group = channels // int(getattr(norm, "n_groups", 1))
    require(channels % group == 0, f"{name}: norm group size {group} does not divide {channels} channels")
    return bool(getattr(norm, "norm_before_gate", False)), int(group), float(eps)


class Mamba2Patcher(Patcher):
    """``Mamba2Mixer``, ``BambaMixer``, ``NemotronHMamba2Mixer``, ``GraniteMoeHybridMambaLayer``,
    ``Zamba2MambaMixer`` (same forward; NemotronH and Zamba2 clamp ``Δ`` from below only)."""

    kind = "mamba2"
    holds_blocks = False
    real_output_key = "out_proj_input"

    tap_paths = {"in_proj": ("in_proj", "output"), "out_proj_input": ("out_proj", "input")}

    weight_paths = {
        "conv.weight": "conv1d.weight",
        "conv.bias": "conv1d.bias",
        "norm.weight": "norm.weight",  # its layout is checked when a view is built, not here
        **{k: k for k in ("dt_bias", "A_log", "D", "mup_vector")},
    }

    def on_call(self, record: BlockRecord, args: tuple, kwargs: dict) -> None:
        record.raw["attention_mask"] = self.argument("attention_mask", args, kwargs)
        conv_state, recurrent_state = cache_states(cache_of(self, args, kwargs), self.module.layer_idx)
        # The forward updates the cache in place: keep copies of what this call starts from.
        keep_conv_context(record, conv_state, self.module)  # (B, conv_dim, K − 1): x, B, C
        if recurrent_state is not None:  # Mamba-2 continues from it on every path (initial_states)
            record.raw["initial_state"] = recurrent_state.clone()  # (B, H, P, N)

    # --- derivation -----------------------------------------------------------------------------
    def projection(self, record: BlockRecord, dtype: torch.dtype) -> Tensor:
        """The ``in_proj`` output as the forward splits it, ``(B, L, C + conv_dim + H)``."""
        require("in_proj" in record.raw, f"{record.name}: in_proj never ran as a module during this call")
        proj = record.raw["in_proj"].to(dtype)
        if "mup_vector" in record.weights:  # FalconH1 scales the in_proj output after the module call
            proj = proj * record.weights["mup_vector"].to(dtype)
        return proj

    def derive(self, record: BlockRecord, dtype: torch.dtype) -> dict[str, Any]:
        """Every per-call quantity in ``dtype``; shapes in the module docstring (cached per dtype)."""
        if dtype in record.cache:
            return record.cache[dtype]
        m, w = self.module, record.weights
        proj = self.projection(record, dtype)
        batch, L, _ = proj.shape
        C, H, P = m.intermediate_size, m.num_heads, m.head_dim
        G, N = m.n_groups, m.ssm_state_size
        require(H * P == C, f"{record.name}: {H} heads of size {P} do not make {C} inner channels")
        z, xBC, dt = torch.split(proj, [C, C + 2 * G * N, H], dim=-1)
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, L)
        mask = padding_mask(record, batch, L, dtype)

        taps = w["conv.weight"].squeeze(1).to(dtype)  # (conv_dim, K)
        K = taps.shape[1]
        conv_bias = w["conv.bias"].to(dtype) if "conv.bias" in w else None
        context = record.raw.get("conv_context")
        context = context.to(dtype) if context is not None else xBC.new_zeros(batch, xBC.shape[1], K - 1)
        u = causal_conv(xBC, taps, conv_bias, context)  # (B, conv_dim, L): the conv output before the act
        slope = activation_slope(m.activation, u)
        a = u * slope if mask is None else u * slope * mask[:, None, :]  # act(u) · mask
        xa, Bm, Cm = torch.split(a, [C, G * N, G * N], dim=1)
        Bm = Bm.transpose(1, 2).reshape(batch, L, G, N)
        Cm = Cm.transpose(1, 2).reshape(batch, L, G, N)

        h0 = record.raw.get("initial_state")
        decode = h0 is not None and L == 1  # the single-token path: selective_state_update, no clamp
        delta = F.softplus(dt + w["dt_bias"].to(dtype)).transpose(1, 2)  # (B, H, L)
        if not decode:
            low, high = m.time_step_limit
            delta = delta.clamp(min=low, max=high)
        A = -torch.exp(w["A_log"].to(dtype))  # (H,)
        D = w["D"].to(dtype)
        head_of = torch.arange(C, device=proj.device) // P  # channels head by head: SSDCore(head_dim=P)

        x = xBC[:, :C]
        # What the conv adds that is not conv(P·x): its bias, a cached left context, padded inputs.
        padded_x = torch.zeros_like(x) if mask is None else x * (1 - mask[:, None, :])
        x_bias = None if conv_bias is None else conv_bias[:C]
        conv_offset = causal_conv(padded_x, taps[:C], x_bias, context[:, :C])

        state_offset = None
        if h0 is not None:  # y_t += C_t · exp(A_h · Σ_{k≤t} Δ_k) · h0
            h0 = h0.to(dtype)
            decay = torch.exp(segsum(delta) * A.double()[None, :, None]).to(dtype)  # (B, H, L)
            readout = torch.einsum("blhn,bhpn->bhpl", Cm.repeat_interleave(H // G, dim=2), h0)
            state_offset = (readout * decay[:, :, None]).reshape(batch, C, L)

        # The SSM output before the norm, for the norm's per-token scale (and record.tensors).
        scan = ssd_scan(xa.reshape(batch, H, P, L), delta, A, Bm, Cm, h0).reshape(batch, C, L)
        scan = scan + D.repeat_interleave(P)[None, :, None] * xa
        gate = F.silu(z.transpose(1, 2)).contiguous()  # (B, C, L), row-major: Factors keep it, not a copy
        left = {"gate": gate}
        layout = norm_layout(getattr(m, "norm", None), C, record.name)
        if layout is not None:
            before_gate, group, eps = layout
            normed = scan if before_gate else scan * gate
            ms = normed.reshape(batch, C // group, group, L).pow(2).mean(2, keepdim=True)
            rms_inv = torch.rsqrt(ms + eps).expand(-1, -1, group, -1).reshape(batch, C, L)
            left["norm"] = w["norm.weight"].to(dtype)[None, :, None] * rms_inv

        derived = dict(
            values=x,
            z=z.transpose(1, 2),
            left=left,
            conv_preact=u[:, :C],
            act=slope[:, :C],
            mask=mask,
            delta=delta,
            A=A,
            B=Bm,
            C=Cm,
            D=D,
            conv=taps[:C],
            conv_offset=conv_offset,
            state_offset=state_offset,
            scan_output=scan,
            head_of=head_of,
        )
        record.cache[dtype] = derived
        return derived

    def factors(self, record: BlockRecord, dtype: torch.dtype) -> Factors:
        d = self.derive(record, dtype)
        return Factors(
            values=d["values"],
            core=SSDCore(
                *(d[k] for k in ("delta", "A", "B", "C", "D", "head_of")),
                conv_width=d["conv"].shape[1],
                head_dim=d["values"].shape[1] // d["A"].shape[0],
            ),
            left=dict(d["left"]),
            right={"act": d["act"]},
            conv=d["conv"],
            conv_offset=d["conv_offset"],
            state_offset=d["state_offset"],
            input_mask=d["mask"],
            mid_mask=d["mask"],
            groups={"heads": d["head_of"]},
        )

    def tensors(self, record: BlockRecord, dtype: torch.dtype):
        def get(key: str):
            return lambda: self.derive(record, dtype)[key]

        def left(key: str):
            return lambda: self.derive(record, dtype)["left"][key]

        def decay() -> Tensor:
            d = self.derive(record, dtype)
            return torch.exp(d["delta"] * d["A"][None, :, None])  # (B, H, L)

        def input_proj() -> Tensor:
            d = self.derive(record, dtype)
            B_h = d["B"].repeat_interleave(d["delta"].shape[1] // d["B"].shape[2], dim=2)  # (B, L, H, N)
            return d["delta"][..., None] * B_h.transpose(1, 2)  # (B, H, L, N)

        keys = ("values", "conv_preact", "act", "mask", "delta", "A", "B", "C", "scan_output")
        thunks = {k: get(k) for k in keys}
        thunks.update(gate=left("gate"), decay=decay, input_proj=input_proj, skip=get("D"), readout=get("C"))
        thunks["heads"] = get("head_of")
        if "norm.weight" in record.weights:
            thunks["norm"] = left("norm")
        return thunks

    def real_output(self, record: BlockRecord) -> Tensor | None:
        y = record.raw.get("out_proj_input")
        if y is not None and y.dim() == 2:  # FalconH1's norm squeezes decode steps in transformers 5.17
            y = y[:, None, :]
        return None if y is None else y.transpose(1, 2)


class FalconH1Patcher(Mamba2Patcher):
    """``FalconH1Mixer``: the ``in_proj`` output is scaled by the ``mup_vector`` buffer after the module
    call (its input by ``ssm_in_multiplier`` before it, which the tap already sees); the gated norm may be
    absent (``y · SiLU(z)``) or applied before the gate (``norm(y) · SiLU(z)``)."""
