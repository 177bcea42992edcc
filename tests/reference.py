"""An independent, step-by-step reference of docs/conventions.md, "Blocks", written straight from the equations.

It reads parameters from a HookedMamba but shares none of its code: explicit loops over time for the
conv and both recurrences, plain matrix products for the projections. Slow; tests only. Diff-S6 is
upstream's own forward, copied line for line (the end of this file), reading upstream's parameter names.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def linear(x, lin):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def conv(x, conv1d):
    """Causal depthwise conv, x [b, L, C]: out[t] = bias + Σ_j w[:, j] · x[t − K + 1 + j]."""
    w = conv1d.weight[:, 0, :]  # [C, K]
    K = w.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                out[:, t] += w[:, j] * x[:, s]
    if conv1d.bias is not None:
        out = out + conv1d.bias
    return out


def s6(core, u):
    """The S6 recurrence, one token at a time. u [b, L, E] -> y [b, L, E] (with D·u)."""
    R, N = core.dt_proj.weight.shape[1], core.A_log.shape[1]
    dbc = u @ core.x_proj.weight.T
    dt_low, B, C = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    dt = F.softplus(linear(dt_low, core.dt_proj))
    A = -torch.exp(core.A_log)
    h = torch.zeros(u.shape[0], u.shape[2], N, dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + core.D * u[:, t])
    return torch.stack(ys, 1)


def mamba1(m, x_in):
    xz = linear(x_in, m.in_proj)
    E = xz.shape[-1] // 2
    x, z = xz[..., :E], xz[..., E:]
    u = F.silu(conv(x, m.conv1d))
    return linear(s6(m, u) * F.silu(z), m.out_proj)


def mamba2(m, x_in):
    b, L, _ = x_in.shape
    H, P, G, N = m.n_heads, m.head_dim, m.n_groups, m.d_state
    E = H * P
    proj = linear(x_in, m.in_proj)
    z, xBC, dt = proj[..., :E], proj[..., E:2 * E + 2 * G * N], proj[..., 2 * E + 2 * G * N:]
    xBC = F.silu(conv(xBC, m.conv1d))
    x = xBC[..., :E].reshape(b, L, H, P)
    B = xBC[..., E:E + G * N].reshape(b, L, G, N)
    C = xBC[..., E + G * N:].reshape(b, L, G, N)
    lo, hi = m.time_step_limit
    dt = F.softplus(dt + m.dt_bias).clamp(lo, hi)
    A = -torch.exp(m.A_log)
    y = torch.zeros(b, L, H, P, dtype=x.dtype)
    for h in range(H):
        g = h // (H // G)
        state = torch.zeros(b, P, N, dtype=x.dtype)
        for t in range(L):
            a = torch.exp(dt[:, t, h] * A[h])[:, None, None]
            state = a * state + dt[:, t, h][:, None, None] * x[:, t, h, :, None] * B[:, t, g, None, :]
            y[:, t, h] = (state * C[:, t, g, None, :]).sum(-1) + m.D[h] * x[:, t, h]
    yz = (y.reshape(b, L, E) * F.silu(z)).reshape(b, L, G, E // G)
    yz = yz / torch.sqrt((yz * yz).mean(-1, keepdim=True) + m.norm.eps)
    return linear(m.norm.weight * yz.reshape(b, L, E), m.out_proj)


def mixer(m, x_in, cfg, i):
    if hasattr(m, "x1_proj"):  # Diff-S6, Mamba-1 form
        return diffs6_upstream(m, x_in)
    if hasattr(m, "in_proj1"):  # Diff-S6, Mamba-2 form: upstream's i_layer counts from 1
        return diffs6mamba2_upstream(m, x_in, i + 1, cfg.head_dim, cfg.n_groups)
    return mamba2(m, x_in) if cfg.family == "mamba2" else mamba1(m, x_in)


def model_logits(model, ids):
    cfg = model.cfg
    resid = model.embed.weight[ids]
    for i, blk in enumerate(model.blocks):
        h = rms(resid, blk.norm.weight, blk.norm.eps)
        if hasattr(blk, "mixer_1"):
            lam_init = 0.8 - 0.6 * math.exp(-0.3 * i)
            if cfg.arch == "diffmamba2":
                lam = torch.sigmoid(blk.lambda_q1.sum()) + lam_init
            else:
                lam = torch.exp(blk.lambda_q1 @ blk.lambda_k1) - torch.exp(blk.lambda_q2 @ blk.lambda_k2) + lam_init
            diff = mixer(blk.mixer_1, h, cfg, i) - lam * mixer(blk.mixer_2, h, cfg, i)
            out = (1 - lam_init) * rms(diff, blk.subln.weight, 1e-5)
        else:
            out = mixer(blk.mixer, h, cfg, i)
        resid = resid + out
    return rms(resid, model.norm_f.weight, model.norm_f.eps) @ model.lm_head.weight.T


# -- Diff-S6, upstream's two forms, line for line -------------------------------------------------
# The forward of github.com/NadavSc/Diff-Mamba, language_modeling/src/models/sequence/modules/
# diffs6block.py (class DiffS6) and diffs6mamba2block.py (class DiffS6Mamba2), reading the parameters
# by upstream's names. mamba-ssm's kernels are replaced by mamba-ssm's own references
# (selective_scan_ref, ssd_selective_scan and rms_norm_ref, state-spaces/mamba) and causal_conv1d_fn
# by upstream's fallback (the nn.Conv1d cut to seqlen); the references' float32 upcasts are dropped, so
# everything runs in the parameters' dtype (float64 in the tests).

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_ref, real A: u, delta, z [b, d, L], A [d, n],
    B, C [b, n, L] or [b, g, n, L], D [d], delta_bias [d] -> [b, d, L]."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    if B.dim() == 3:
        deltaB_u = torch.einsum('bdl,bnl,bdl->bdln', delta, B, u)
    else:
        B = repeat(B, "B G N L -> B (G H) N L", H=dim // B.shape[1])
        deltaB_u = torch.einsum('bdl,bdnl,bdl->bdln', delta, B, u)
    if C.dim() == 4:
        C = repeat(C, "B G N L -> B (G H) N L", H=dim // C.shape[1])
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 3:
            y = torch.einsum('bdn,bn->bd', x, C[:, :, i])
        else:
            y = torch.einsum('bdn,bdn->bd', x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)  # (batch dim L)
    out = y if D is None else y + u * rearrange(D, "d -> d 1")
    if z is not None:
        out = out * F.silu(z)
    return out


def mamba_chunk_scan_combined_ref(x, dt, A, B, C, D=None):
    """What mamba_chunk_scan_combined computes (dt already positive, no dt_bias, z or dt_limit), as
    mamba_ssm.ops.triton.ssd_combined.ssd_selective_scan writes it: x [b, L, h, p], dt [b, L, h], A [h],
    B, C [b, L, g, n], D [h] -> [b, L, h, p]."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    x = rearrange(x, "b l h p -> b (h p) l")
    dt = repeat(dt, "b l h -> b l h p", p=headdim)
    dt = rearrange(dt, "b l h p -> b (h p) l")
    A = repeat(A, "h -> (h p) n", p=headdim, n=dstate)
    B = rearrange(B, "b l g n -> b g n l")
    C = rearrange(C, "b l g n -> b g n l")
    if D is not None:
        D = repeat(D, "h -> (h p)", p=headdim)
    out = selective_scan_ref(x, dt, A, B, C, D=D)
    return rearrange(out, "b (h p) l -> b l h p", p=headdim)


def rms_norm_gated_ref(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba_ssm.ops.triton.layernorm_gated.rms_norm_ref without bias (RMSNormGated's forward)."""
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    if group_size is None:
        rstd = 1 / torch.sqrt((x.square()).mean(dim=-1, keepdim=True) + eps)
        out = x * rstd * weight
    else:
        x_group = rearrange(x, "... (g d) -> ... g d", d=group_size)
        rstd = 1 / torch.sqrt((x_group.square()).mean(dim=-1, keepdim=True) + eps)
        out = rearrange(x_group * rstd, "... g d -> ... (g d)") * weight
    if z is not None and norm_before_gate:
        out *= F.silu(z)
    return out


def upstream_rms_norm(x, weight, eps):
    """language_modeling/src/models/functional/rms_norm.py, RMSNorm.forward (the subln)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def diffs6_upstream(self, hidden_states):
    """DiffS6.forward (diffs6block.py) with state=None: hidden_states [B, L, D] -> out [B, L, D]."""
    batch, seqlen, dim = hidden_states.shape
    dt_rank, d_state = self.dt1_proj.weight.shape[1], self.A1_log.shape[1]
    # We do matmul and transpose BLH -> HBL at the same time
    xz = rearrange(
        self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"),
        "d (b l) -> b d l",
        l=seqlen,
    )
    if self.in_proj.bias is not None:
        xz = xz + rearrange(self.in_proj.bias.to(dtype=xz.dtype), "d -> d 1")

    A1 = -torch.exp(self.A1_log)  # (d_inner, d_state)
    A2 = -torch.exp(self.A2_log)  # (d_inner, d_state)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(self.conv1d(x)[..., :seqlen])  # causal_conv1d_fn is None

    x1_dbl = self.x1_proj(rearrange(x, "b d l -> (b l) d"))  # (bl d)
    x2_dbl = self.x2_proj(rearrange(x, "b d l -> (b l) d"))  # (bl d)

    dt1, B1, C1 = torch.split(x1_dbl, [dt_rank, d_state, d_state], dim=-1)
    dt2, B2, C2 = torch.split(x2_dbl, [dt_rank, d_state, d_state], dim=-1)

    dt1 = self.dt1_proj.weight @ dt1.t()
    dt2 = self.dt2_proj.weight @ dt2.t()

    dt1 = rearrange(dt1, "d (b l) -> b d l", l=seqlen)
    dt2 = rearrange(dt2, "d (b l) -> b d l", l=seqlen)

    B1 = rearrange(B1, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    B2 = rearrange(B2, "(b l) dstate -> b dstate l", l=seqlen).contiguous()

    C1 = rearrange(C1, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    C2 = rearrange(C2, "(b l) dstate -> b dstate l", l=seqlen).contiguous()
    y1 = selective_scan_ref(x, dt1, A1, B1, C1, self.D1, z=z, delta_bias=self.dt1_proj.bias, delta_softplus=True)
    y2 = selective_scan_ref(x, dt2, A2, B2, C2, self.D2, z=z, delta_bias=self.dt2_proj.bias, delta_softplus=True)
    y = y1 - y2
    y = rearrange(y, "b d l -> b l d")
    out = self.out_proj(y)
    return out


def diffs6mamba2_upstream(self, u, i_layer, headdim, ngroups):
    """DiffS6Mamba2.forward (diffs6mamba2block.py), use_mem_eff_path False, dt_limit (0, inf), no
    learnable init states: u [B, L, D] -> out [B, L, D]. λ_init as upstream's __init__ computes it from
    i_layer (upstream: a float32 tensor; here a Python float)."""
    lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (i_layer - 1))
    d_inner = self.out_proj.weight.shape[1]
    nheads = self.A1_log.shape[0]
    d_state = (self.conv1d.weight.shape[0] - d_inner) // (2 * ngroups)
    batch, seqlen, dim = u.shape

    zxbcdt1 = self.in_proj1(u)  # (B, L, d_in_proj)
    zxbcdt2 = self.in_proj2(u)  # (B, L, d_in_proj)
    A1 = -torch.exp(self.A1_log)  # (nheads) or (d_inner, d_state)
    A2 = -torch.exp(self.A2_log)

    z1, xBC1, dt1 = torch.split(zxbcdt1, [d_inner, d_inner + 2 * ngroups * d_state, nheads], dim=-1)
    z2, xBC2, dt2 = torch.split(zxbcdt2, [d_inner, d_inner + 2 * ngroups * d_state, nheads], dim=-1)
    dt1 = F.softplus(dt1 + self.dt1_bias)  # (B, L, nheads)
    dt2 = F.softplus(dt2 + self.dt2_bias)  # (B, L, nheads)

    # 1D Convolution (causal_conv1d_fn is None)
    xBC1 = F.silu(self.conv1d(xBC1.transpose(1, 2)).transpose(1, 2))  # (B, L, self.d_inner + 2 * ngroups * d_state)
    xBC1 = xBC1[:, :seqlen, :]
    xBC2 = F.silu(self.conv1d(xBC2.transpose(1, 2)).transpose(1, 2))  # (B, L, self.d_inner + 2 * ngroups * d_state)
    xBC2 = xBC2[:, :seqlen, :]

    # Split into 3 main branches: X, B, C
    x1, B1, C1 = torch.split(xBC1, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x2, B2, C2 = torch.split(xBC2, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)

    y1 = mamba_chunk_scan_combined_ref(
        rearrange(x1, "b l (h p) -> b l h p", p=headdim),
        dt1,
        A1,
        rearrange(B1, "b l (g n) -> b l g n", g=ngroups),
        rearrange(C1, "b l (g n) -> b l g n", g=ngroups),
        D=self.D1,
    )
    y1 = rearrange(y1, "b l h p -> b l (h p)")
    y2 = mamba_chunk_scan_combined_ref(
        rearrange(x2, "b l (h p) -> b l h p", p=headdim),
        dt2,
        A2,
        rearrange(B2, "b l (g n) -> b l g n", g=ngroups),
        rearrange(C2, "b l (g n) -> b l g n", g=ngroups),
        D=self.D2,
    )
    y2 = rearrange(y2, "b l h p -> b l (h p)")
    # Multiply "gate" branch and apply extra normalization layer (RMSNormGated(d_inner, eps=1e-5,
    # norm_before_gate=False): group_size None)
    y1 = rms_norm_gated_ref(y1, self.norm.weight, z=z1, eps=1e-5, norm_before_gate=False)
    y2 = rms_norm_gated_ref(y2, self.norm.weight, z=z2, eps=1e-5, norm_before_gate=False)

    lambda_q1 = self.lambda_q1
    lambda_full = torch.sigmoid(lambda_q1) + lambda_init
    attn = y1 - lambda_full * y2
    attn = upstream_rms_norm(attn, self.subln.weight, 1e-5)
    attn = attn * (1 - lambda_init)
    out = self.out_proj(attn)
    return out
