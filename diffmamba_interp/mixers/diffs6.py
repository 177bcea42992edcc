"""Diff-S6, the Diff-Mamba paper's ablation: the difference taken inside one mixer, at the S6 level
(docs/conventions.md, "Blocks"), in upstream's two forms and with upstream's parameter names, so a
state_dict of upstream's module loads by name (github.com/NadavSc/Diff-Mamba,
language_modeling/src/models/sequence/modules/):

- `DiffS6Mixer` (arch "diffs6"; upstream `diffs6block.py`, class DiffS6, the S4-codebase
  language-modelling runs): a Mamba-1 mixer with two S6 cores. Shared in_proj, conv1d and out_proj;
  each core its own x{k}_proj, dt{k}_proj, A{k}_log, D{k}; out = out_proj((S6₁(u) − S6₂(u)) ⊙ SiLU(z)).
  No λ, no norm.
- `DiffS6Mamba2Mixer` (arch "diffs6mamba2"; upstream `diffs6mamba2block.py`, class DiffS6Mamba2, the
  Text8 ablation): a Mamba-2 mixer whose path up to the gated norm is doubled. in_proj1 / in_proj2
  (each [z, xBC, dt]), the one conv1d applied to each branch's xBC, dt{k}_bias, A{k}_log, D{k}, the
  one gated RMSNorm `norm` applied to each branch (y_k gated by its own z_k, ungrouped as upstream's
  RMSNormGated(d_inner)), then out = out_proj((1 − λ_init)·subln(norm(y₁, z₁) − λ·norm(y₂, z₂))) with
  λ = sigmoid(lambda_q1) + λ_init, lambda_q1 one scalar, subln an RMSNorm over d_inner.

Each branch k is a scan unit `ssm_k` (`ScanUnit`: its hooks, its scan, its entry
`state["blocks.i.mixer.ssm_k"]` in recurrent mode); its parameters are the mixer's, under upstream's
names, read through properties. In the Mamba-1 form both cores scan the same u, so they share one
conv state; in the Mamba-2 form each branch convolves its own xBC and keeps its own.

λ_init: upstream computes 0.8 − 0.6·exp(−0.3·(i_layer − 1)) with i_layer its 1-based count of the
backbone's sub-layers (FFNs included); here, as for every differential layer of the toolkit,
λ_init(i) with i the block index from 0.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .. import implicit, implicit_output
from ..differential import Differential
from ..scan import compute_dtype
from ..state import Recurrence
from .base import Mixer, MixerDims, ScanUnit, init_dt_bias
from .mamba1 import ConvFront, S6Core
from .mamba2 import add_ssd_hooks, ssd_unit

Tensor = torch.Tensor


def _owned(pattern: str) -> property:
    """The mixer's attribute `pattern` (e.g. "x{k}_proj") for this branch's k."""
    return property(lambda self: getattr(self._owner, pattern.format(k=self.k)),
                    doc=f"the mixer's `{pattern}` for this branch")


def _attach(unit: nn.Module, owner: nn.Module, k: int) -> None:
    """Make `unit` branch k of `owner`: a plain reference (not a submodule), so the parameters have one
    home, the mixer, under upstream's names."""
    object.__setattr__(unit, "_owner", owner)
    unit.k = k


# -- the Mamba-1 form ---------------------------------------------------------------------------
class S6Branch(S6Core):
    """Core k of a Mamba-1-form Diff-S6 mixer: the S6 scan of the shared u with the mixer's x{k}_proj,
    dt{k}_proj, A{k}_log and D{k}, and its hooks."""

    x_proj = _owned("x{k}_proj")  # [R + 2N, E]
    dt_proj = _owned("dt{k}_proj")  # [E, R] + bias [E]
    A_log = _owned("A{k}_log")  # [E, N]
    D = _owned("D{k}")  # [E]

    def __init__(self, owner: nn.Module, k: int, dims: MixerDims):
        super().__init__()
        _attach(self, owner, k)
        E, N, R = dims.d_inner, dims.d_state, dims.dt_rank
        self.d_state, self.dt_rank, self.d_conv, self.scan_width = N, R, dims.d_conv, E
        self.capture_states = False
        self.last_path = ""
        self.hook_dt = HookPoint()  # [batch, pos, E]  Δ_k after softplus
        self.hook_B = HookPoint()  # [batch, pos, N]
        self.hook_C = HookPoint()  # [batch, pos, N]
        self.hook_ssm_state = HookPoint()  # [batch, pos, E, N]  h_t (only when hooked)
        self.hook_ssm_out = HookPoint()  # [batch, pos, E]  C_k·h + D_k⊙u

    def forward(self, u: Tensor, state: Tensor | None = None, want_final: bool = False, in_place: bool = False):
        """u [batch, pos, E] -> (y_k [batch, pos, E], the state after the last position when `want_final`)."""
        return self.ssm(u, state, want_final, in_place)


def _dt_proj(R: int, E: int) -> nn.Linear:
    proj = nn.Linear(R, E, bias=True)
    with torch.no_grad():
        proj.bias.copy_(init_dt_bias(E))
    return proj


def _s4d_real(E: int, N: int) -> nn.Parameter:
    """A_log of the S4D-real init: log(1..N) for every channel, [E, N]."""
    return nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))


class DiffS6Mixer(ConvFront, Differential, Mixer):
    """Diff-S6, Mamba-1 form (upstream `diffs6block.py`): out_proj((S6₁(u) − S6₂(u)) ⊙ SiLU(z)), x, z =
    in_proj(h), u = SiLU(conv(x)); parameters in_proj, conv1d, x1_proj, dt1_proj, A1_log, D1, x2_proj,
    dt2_proj, A2_log, D2, out_proj. No λ parameter: `hook_lambda` carries the constant 1 (patch it to
    scale or ablate core 2) and `hook_diff` the difference before the gate.

    Implicit attention per core k: kind "s6" -> α_k [b, E, L, L]; kind "block" ->
    diag(SiLU(z))·(α_k + diag(D_k))·diag(σ(v))·M; the cores share channels, so
    (𝒜₁ − 𝒜₂)·x + (bias₁ − bias₂) == hook_gated exactly. Kind "output" (branch None for both, or 1/2 for
    one term): W_out·diag(𝒜₁ − 𝒜₂)·W_in, whose `reconstruct(h)` equals `hook_out`.
    """

    BRANCHES = ("ssm_1", "ssm_2")
    BRANCH_OUTPUT = "hook_ssm_out"  # each core's output y_k: [batch, pos, E]
    DESCRIPTION = "a Diff-S6 layer"
    SHARED_CHANNELS = True  # both cores scan the same u and share the gate and out_proj
    SHARED_CONV = True  # ... so they read one conv state

    def __init__(self, dims: MixerDims, layer_idx: int):
        super().__init__()
        E, N, R = dims.d_inner, dims.d_state, dims.dt_rank
        self._init_front(dims)  # in_proj [2E, d], conv1d [E, 1, K], out_proj [d, E] and their hooks
        self.x1_proj = nn.Linear(E, R + 2 * N, bias=False)  # [R + 2N, E]
        self.dt1_proj = _dt_proj(R, E)  # [E, R]
        self.x2_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt2_proj = _dt_proj(R, E)
        self.A1_log = _s4d_real(E, N)  # [E, N]
        self.A2_log = _s4d_real(E, N)
        self.D1 = nn.Parameter(torch.ones(E))  # [E]
        self.D2 = nn.Parameter(torch.ones(E))
        self.ssm_1 = S6Branch(self, 1, dims)
        self.ssm_2 = S6Branch(self, 2, dims)
        self._init_differential(layer_idx, None)  # no λ, no subln
        self.hook_lambda = HookPoint()  # []  1 (upstream subtracts without a λ)
        self.hook_diff = HookPoint()  # [batch, pos, E]  S6₁(u) − S6₂(u)

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> [batch, pos, d]; the two cores share the conv state (stored under both keys)."""
        k1, k2 = self.ssm_1.state_key, self.ssm_2.state_key
        collect = rec is not None and rec.collect
        u, z, conv = self.front(h, rec.conv_in(k1) if rec else None, collect)
        lam = self.hook_lambda(self.lam())
        in_place = bool(rec and rec.in_place)
        y1, h1 = self.ssm_1(u, rec.ssm_in(k1) if rec else None, collect, in_place)
        y2, h2 = self.ssm_2(u, rec.ssm_in(k2) if rec else None, collect, in_place)
        if collect:
            rec.put(k1, conv, h1)
            rec.put(k2, conv, h2)
        return self.back(self.combine(y1, y2, lam), z)

    @property
    def last_path(self) -> str:
        return self.ssm_1.last_path

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        if kind == "output":  # both cores and the coefficient, whichever term is asked for
            return [*self.attention_hooks("block", 1), *self.attention_hooks("block", 2)[:3], "hook_lambda"]
        core = f"{self.BRANCHES[branch - 1]}."
        names = [core + "hook_dt", core + "hook_B", core + "hook_C"]
        return names + ["hook_conv", "hook_gate", "hook_x"] if kind == "block" else names

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        if kind == "output":
            return self._output(cache, chunk, branch, opts or implicit.MapOptions())
        core, prefix = self.branch(branch), f"{self.BRANCHES[branch - 1]}."
        if kind == "s6":
            return core.scan_map(cache, prefix, reduce, chunk, opts)
        return self.block_map(core, cache, prefix, cache["hook_gate"], reduce, chunk, opts)

    def _output(self, cache, chunk, branch, opts):
        """W_out·diag(𝒜₁ − λ𝒜₂)·W_in (λ = hook_lambda, 1 unless hooked) as two terms sharing in_proj and
        out_proj; out_proj's bias is shared."""
        rows, lam = cache["hook_gate"], cache["hook_lambda"]
        terms = [self.output_branch(self.branch(k), cache, f"{self.BRANCHES[k - 1]}.", rows, opts, coef,
                                    own_out_bias=False) for k, coef in ((1, 1.0), (2, -lam))]
        f = rows.dtype
        shared = self.out_proj.bias.detach().to(f) if opts.include_bias and self.out_proj.bias is not None else None
        b, L, _ = rows.shape
        whole = implicit_output.OutputAttention(terms, names=["branch 1", "branch 2"], n_pos=L, batch=b,
                                                shared_bias=shared, rows=opts.rows, chunk=chunk)
        return whole if branch is None else whole.branch(branch)


# -- the Mamba-2 form ---------------------------------------------------------------------------
class SharedGatedNorm(nn.Module):
    """The parameters of the one gated RMSNorm that a Mamba-2-form Diff-S6 mixer applies to both
    branches (`norm.weight` [E]); each branch computes it with its own hooks (`ssm_k.norm`)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))  # [E]


class BranchNorm(nn.Module):
    """The shared gated norm as one branch applies it: w ⊙ (y ⊙ gate)·scale, scale = 1/rms over all E
    channels (upstream's RMSNormGated(d_inner, norm_before_gate=False): ungrouped whatever G)."""

    def __init__(self):
        super().__init__()
        self.hook_scale = HookPoint()  # [batch, pos, 1]  1/rms of y ⊙ SiLU(z)
        self.hook_normalized = HookPoint()  # [batch, pos, E]  the branch's output, gain applied

    def forward(self, y: Tensor, gate: Tensor, norm: SharedGatedNorm) -> Tensor:
        f = compute_dtype(y.dtype)
        g = y.to(f) * gate.to(f)
        scale = self.hook_scale(torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + norm.eps))
        return self.hook_normalized(norm.weight * (g * scale).to(y.dtype))


class SSDBranch(ScanUnit):
    """Branch k of a Mamba-2-form Diff-S6 mixer: z, xBC, dt = in_proj{k}(h); x, B, C = SiLU(conv1d(xBC));
    y = SSD(x, Δ, A{k}, B, C) + D{k}·x; out = norm(y, SiLU(z)), with the mixer's in_proj{k}, conv1d,
    dt{k}_bias, A{k}_log, D{k} and norm.weight, and its own hooks (named as a Mamba-2 mixer's)."""

    in_proj = _owned("in_proj{k}")  # [2E + 2GN + H, d]
    dt_bias = _owned("dt{k}_bias")  # [H]
    A_log = _owned("A{k}_log")  # [H]
    D = _owned("D{k}")  # [H]

    @property
    def conv1d(self) -> nn.Conv1d:
        """The mixer's one conv1d [E + 2GN, 1, K], applied to each branch's xBC."""
        return self._owner.conv1d

    def __init__(self, owner: nn.Module, k: int, dims: MixerDims):
        super().__init__()
        _attach(self, owner, k)
        E, N, G, H = dims.d_inner, dims.d_state, dims.n_groups, dims.n_heads
        self.d_inner, self.d_state, self.n_groups, self.n_heads, self.head_dim = E, N, G, H, dims.head_dim
        self.d_conv, self.chunk_size, self.time_step_limit = dims.d_conv, dims.chunk_size, dims.time_step_limit
        self.conv_dim = E + 2 * G * N
        self.capture_states = False
        self.last_path = ""
        add_ssd_hooks(self)
        self.norm = BranchNorm()  # hook_scale [batch, pos, 1], hook_normalized [batch, pos, E]

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per batch row: this branch's conv state (E + 2GN, K − 1) and SSM state (H, P, N)."""
        return (self.conv_dim, self.d_conv - 1), (self.n_heads, self.head_dim, self.d_state)

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> norm(y_k, SiLU(z_k)) [batch, pos, E]; `rec` carries this branch's state
        (the Mamba-2 mixer's SSD unit, `mamba2.ssd_unit`, with this branch's parameters)."""
        y, gate = ssd_unit(self, h, rec)
        return self.norm(y, gate, self._owner.norm)


class DiffS6Mamba2Mixer(Differential, Mixer):
    """Diff-S6, Mamba-2 form (upstream `diffs6mamba2block.py`):
    out_proj((1 − λ_init)·subln(norm(y₁, z₁) − λ·norm(y₂, z₂))), branch k = `ssm_k` (`SSDBranch`);
    parameters lambda_q1 [1], subln.weight, in_proj1, in_proj2, conv1d, dt1_bias, dt2_bias, A1_log,
    A2_log, D1, D2, norm.weight, out_proj.

    Implicit attention per branch k: kind "s6" -> the SSD map α_k [b, H, L, L]; kind "block" -> per
    channel diag(r_k)·(α_k + diag(D_k))·diag(σ(v_k))·M with r_k = w_norm ⊙ SiLU(z_k)·(norm 1/rms)_k ·
    (1 − λ_init)·w_subln·(subln 1/rms), whose `reconstruct(x part of ssm_k.hook_xBC)` is branch k's term
    of out_proj's input: term₁ − λ·term₂ = (1 − λ_init)·subln.hook_normalized. The branches have their
    own projections (no shared channels). Kind "output": W_out·(𝒜₁·W_in,1 − λ·𝒜₂·W_in,2) (branch None
    for both, 1/2 for one term), whose `reconstruct(h)` equals `hook_out`.
    """

    BRANCHES = ("ssm_1", "ssm_2")
    BRANCH_OUTPUT = "norm.hook_normalized"  # each branch's normed output: [batch, pos, E]
    DESCRIPTION = "a Diff-S6 layer (Mamba-2 form)"
    SHARED_CHANNELS = False  # in_proj1 and in_proj2 give each branch its own x

    def __init__(self, dims: MixerDims, layer_idx: int):
        super().__init__()
        E, N, G, H, d = dims.d_inner, dims.d_state, dims.n_groups, dims.n_heads, dims.d_model
        self.d_inner, self.d_state, self.n_groups, self.n_heads, self.head_dim = E, N, G, H, dims.head_dim
        self._init_differential(layer_idx, "q1", 1, E)  # lambda_q1 [1] (randn, as upstream), subln over E
        self.in_proj1 = nn.Linear(d, 2 * E + 2 * G * N + H, bias=dims.bias)  # [z, xBC, dt] of branch 1
        self.in_proj2 = nn.Linear(d, 2 * E + 2 * G * N + H, bias=dims.bias)
        conv_dim = E + 2 * G * N
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, dims.d_conv, groups=conv_dim, padding=dims.d_conv - 1,
                                bias=dims.conv_bias)  # [E + 2GN, 1, K], applied to each branch's xBC
        self.dt1_bias = nn.Parameter(init_dt_bias(H))  # [H]
        self.dt2_bias = nn.Parameter(init_dt_bias(H))
        self.A1_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))  # [H]
        self.A2_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D1 = nn.Parameter(torch.ones(H))  # [H]
        self.D2 = nn.Parameter(torch.ones(H))
        self.norm = SharedGatedNorm(E, eps=1e-5)  # weight [E]; eps 1e-5 as upstream's, like subln's
        self.out_proj = nn.Linear(E, d, bias=dims.bias)  # [d, E]
        self.ssm_1 = SSDBranch(self, 1, dims)
        self.ssm_2 = SSDBranch(self, 2, dims)
        self.hook_lambda = HookPoint()  # []  λ
        self.hook_diff = HookPoint()  # [batch, pos, E]  norm(y₁, z₁) − λ·norm(y₂, z₂)
        self.hook_out = HookPoint()  # [batch, pos, d]

    def forward(self, h: Tensor, rec: Recurrence | None = None) -> Tensor:
        """h [batch, pos, d] -> [batch, pos, d]; each branch carries its own state in `rec`."""
        lam = self.hook_lambda(self.lam())
        y = self.combine(self.ssm_1(h, rec), self.ssm_2(h, rec), lam)  # [batch, pos, E]
        return self.hook_out(self.out_proj(y))

    @property
    def last_path(self) -> str:
        return self.ssm_1.last_path

    def attention_hooks(self, kind: str, branch: int | None = None) -> list[str]:
        if kind == "output":  # both branches, λ and the subln scale, whichever term is asked for
            return [*self.attention_hooks("block", 1), *self.attention_hooks("block", 2), "hook_lambda"]
        p = f"{self.BRANCHES[branch - 1]}."
        names = [p + "hook_dt", p + "hook_B", p + "hook_C"]
        if kind == "block":
            names += [p + "hook_conv", p + "hook_gate", p + "hook_xBC", p + "norm.hook_scale", "subln.hook_scale"]
        return names

    def _rows(self, cache, k: int) -> Tensor:
        """Branch k's row scaling [b, L, E]: w_norm ⊙ SiLU(z_k)·(norm 1/rms)_k·(1 − λ_init)·w_subln·(subln 1/rms)."""
        p = f"{self.BRANCHES[k - 1]}."
        gate = cache[p + "hook_gate"]
        f = gate.dtype
        return (gate * cache[p + "norm.hook_scale"] * self.norm.weight.detach().to(f) * (1 - self.lambda_init)
                * self.subln.weight.detach().to(f) * cache["subln.hook_scale"])

    def _block(self, cache, k: int, reduce, chunk, opts) -> implicit.ImplicitAttention:
        p, unit = f"{self.BRANCHES[k - 1]}.", self.branch(k)
        dt = cache[p + "hook_dt"]
        f = dt.dtype
        return implicit.ssd_block_map(dt, unit.A().detach().to(f), cache[p + "hook_B"], cache[p + "hook_C"],
                                      unit.D.detach().to(f), cache[p + "hook_conv"][..., :self.d_inner],
                                      self._rows(cache, k), self.conv1d, self.head_dim, reduce, chunk, opts)

    def implicit_attention(self, cache, kind, reduce=None, chunk=None, branch=None, opts=None):
        opts = opts or implicit.MapOptions()
        if kind == "output":
            return self._output(cache, chunk, branch, opts)
        if kind == "block":
            return self._block(cache, branch, reduce, chunk, opts)
        p, unit = f"{self.BRANCHES[branch - 1]}.", self.branch(branch)
        dt = cache[p + "hook_dt"]
        D = unit.D.detach().to(dt.dtype) if opts.with_D("s6") else None
        return implicit.ssd_map(dt, unit.A().detach().to(dt.dtype), cache[p + "hook_B"], cache[p + "hook_C"], reduce,
                                chunk, opts, D)

    def _output(self, cache, chunk, branch, opts):
        """W_out·diag(𝒜_k)·W_in,k for k = 1, 2 with coefficients 1 and −λ (each 𝒜_k with its row scaling,
        subln's included); out_proj and its bias are shared."""
        lam = cache["hook_lambda"]
        f, E = lam.dtype, self.d_inner
        with_bias = opts.include_bias
        terms = []
        for k, coef in ((1, torch.ones((), dtype=f)), (2, -lam)):
            w = self.branch(k).in_proj

            def maps(t0: int, t1: int, k=k):  # rows t0..t1−1 over the sources 0..t1−1 (causal: the rest is 0)
                return self._block(implicit.prefix(cache, t1), k, None, None, dataclasses.replace(opts, rows=(t0, t1)))

            b_in = w.bias.detach()[E : 2 * E].to(f) if with_bias and w.bias is not None else None
            terms.append(implicit_output.OutputBranch(maps, w.weight.detach()[E : 2 * E].to(f),
                                                      self.out_proj.weight.detach().to(f), coef.to(f), b_in, None))
        shared = self.out_proj.bias.detach().to(f) if with_bias and self.out_proj.bias is not None else None
        b, L = cache["ssm_1.hook_dt"].shape[:2]
        whole = implicit_output.OutputAttention(terms, names=["branch 1", "branch 2"], n_pos=L, batch=b,
                                                shared_bias=shared, rows=opts.rows, chunk=chunk)
        return whole if branch is None else whole.branch(branch)
