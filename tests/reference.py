"""An independent, step-by-step reference of docs/conventions.md, "Blocks", written straight from the equations.

It reads parameters from a HookedMamba but shares none of its code: explicit loops over time for the
conv and both recurrences, plain matrix products for the projections. Slow; tests only.
"""

import math

import torch
import torch.nn.functional as F


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


def diffs6(m, x_in, i):
    xz = linear(x_in, m.in_proj)
    E = xz.shape[-1] // 2
    x, z = xz[..., :E], xz[..., E:]
    u = F.silu(conv(x, m.conv1d))
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * i)
    lam = torch.exp(m.lambda_q1 @ m.lambda_k1) - torch.exp(m.lambda_q2 @ m.lambda_k2) + lam_init
    y = (1 - lam_init) * rms(s6(m.ssm_1, u) - lam * s6(m.ssm_2, u), m.subln.weight, 1e-5)
    return linear(y * F.silu(z), m.out_proj)


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


def mixer(m, x_in, arch, i):
    if hasattr(m, "ssm_1"):
        return diffs6(m, x_in, i)
    return mamba2(m, x_in) if arch in ("mamba2", "diffmamba2") else mamba1(m, x_in)


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
            diff = mixer(blk.mixer_1, h, cfg.arch, i) - lam * mixer(blk.mixer_2, h, cfg.arch, i)
            out = (1 - lam_init) * rms(diff, blk.subln.weight, 1e-5)
        else:
            out = mixer(blk.mixer, h, cfg.arch, i)
        resid = resid + out
    return rms(resid, model.norm_f.weight, model.norm_f.eps) @ model.lm_head.weight.T
