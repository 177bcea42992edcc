"""Diff-S6 in upstream's two forms (github.com/NadavSc/Diff-Mamba, language_modeling/src/models/sequence/
modules/diffs6block.py and diffs6mamba2block.py): an upstream module's state_dict loads into ours by
name, and our mixer equals upstream's forward (tests/reference.py, line for line) in float64; the
recurrent state carries both forms; λ, the branch outputs and the λ table behave as the forms say."""

import math

import pytest
import torch
from einops import repeat
from torch import nn

import reference
from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.archs import create_block
from diffmamba_interp.differential import lambda_init
from diffmamba_interp.mixers import DiffS6Mamba2Mixer, DiffS6Mixer
from helpers import assert_identity, perturb_


# -- upstream's modules: __init__ copied (parameters, names, shapes, init), forward = tests/reference.py --
class UpstreamDiffS6(nn.Module):
    """diffs6block.py, class DiffS6: its __init__ (the module arguments that do not make parameters dropped)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias)

        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
        )

        self.x1_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False)
        self.dt1_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        self.x2_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False)
        self.dt2_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        def dt_proj_init(dt_proj):
            dt_init_std = self.dt_rank**-0.5 * dt_scale
            if dt_init == "constant":
                nn.init.constant_(dt_proj.weight, dt_init_std)
            elif dt_init == "random":
                nn.init.uniform_(dt_proj.weight, -dt_init_std, dt_init_std)
            else:
                raise NotImplementedError
            dt = torch.exp(
                torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            with torch.no_grad():
                dt_proj.bias.copy_(inv_dt)
            return dt_proj

        def A_init():
            A = repeat(torch.arange(1, self.d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner).contiguous()
            return nn.Parameter(torch.log(A))

        def D_init():
            return nn.Parameter(torch.ones(self.d_inner))

        self.dt1_proj = dt_proj_init(self.dt1_proj)
        self.dt2_proj = dt_proj_init(self.dt2_proj)

        self.A1_log = A_init()
        self.A2_log = A_init()

        self.D1 = D_init()
        self.D2 = D_init()

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)

    def forward(self, hidden_states):
        return reference.diffs6_upstream(self, hidden_states)


class UpstreamRMSNorm(nn.Module):
    """language_modeling/src/models/functional/rms_norm.py, RMSNorm (the subln): its parameters."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class UpstreamRMSNormGated(nn.Module):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm (imported as RMSNormGated): its parameters."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)


class UpstreamDiffS6Mamba2(nn.Module):
    """diffs6mamba2block.py, class DiffS6Mamba2: its __init__ (learnable_init_states False)."""

    def __init__(self, d_model, i_layer, d_state=64, d_conv=4, conv_init=None, expand=2, headdim=108, ngroups=1,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, bias=False, conv_bias=True):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = self.expand * self.d_model
        self.headdim = headdim
        self.ngroups = ngroups
        assert self.d_inner % self.headdim == 0
        self.nheads = self.d_inner // self.headdim
        self.i_layer = i_layer

        self.lambda_init = 0.8 - 0.6 * torch.exp(torch.tensor(-0.3 * (i_layer - 1)))
        self.lambda_q1 = nn.Parameter(torch.randn(1))

        self.subln = UpstreamRMSNorm(self.d_inner, eps=1e-5, elementwise_affine=True)

        # Order: [z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj1 = nn.Linear(self.d_model, d_in_proj, bias=bias)
        self.in_proj2 = nn.Linear(self.d_model, d_in_proj, bias=bias)

        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(
            in_channels=conv_dim,
            out_channels=conv_dim,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=conv_dim,
            padding=d_conv - 1,
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        def dt_init():
            dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = torch.clamp(dt, min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            dt_bias = nn.Parameter(inv_dt)
            return dt, dt_bias

        def A_init():
            A = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
            return nn.Parameter(torch.log(A))

        def D_init():
            return nn.Parameter(torch.ones(self.nheads))

        self.dt1, self.dt1_bias = dt_init()
        self.dt2, self.dt2_bias = dt_init()

        assert A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]
        self.A1_log = A_init()
        self.A2_log = A_init()

        self.D1 = D_init()
        self.D2 = D_init()

        self.norm = UpstreamRMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=False)

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)

    def forward(self, u):
        return reference.diffs6mamba2_upstream(self, u, self.i_layer, self.headdim, self.ngroups)


# -- ours against upstream --------------------------------------------------------------------------
SIZES = dict(d_model=16, d_state=4, d_conv=3, expand=2)


def ours_and_upstream(form, seed=0, layer=0, bias=False, conv_bias=True, n_groups=1, head_dim=8, chunk_size=4):
    """Our mixer of block `layer` (built by the registry) holding an upstream module's weights, loaded by
    name (strict), and that upstream module; both float64."""
    torch.manual_seed(seed)
    if form == "mamba1":
        up = UpstreamDiffS6(**SIZES, bias=bias, conv_bias=conv_bias)
        cfg = MambaConfig(arch="diffs6", **SIZES, bias=bias, conv_bias=conv_bias, n_layers=layer + 1, diff_layers="all")
    else:
        up = UpstreamDiffS6Mamba2(**SIZES, i_layer=layer + 1, headdim=head_dim, ngroups=n_groups, bias=bias,
                                  conv_bias=conv_bias)
        cfg = MambaConfig(arch="diffs6mamba2", **SIZES, head_dim=head_dim, n_groups=n_groups, bias=bias,
                          conv_bias=conv_bias, chunk_size=chunk_size, n_layers=layer + 1, diff_layers="all")
    up = perturb_(up, seed=seed + 1, scale=0.3).double().eval()
    ours = create_block(cfg, layer).mixer.double().eval()
    assert isinstance(ours, DiffS6Mixer if form == "mamba1" else DiffS6Mamba2Mixer)
    mine, theirs = ours.state_dict(), up.state_dict()
    assert sorted(mine) == sorted(theirs)  # upstream's parameter names, no more, no fewer
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    return ours, up


FORMS = [
    dict(form="mamba1"),
    dict(form="mamba1", bias=True, layer=3),
    dict(form="mamba1", conv_bias=False),
    dict(form="mamba2"),
    dict(form="mamba2", n_groups=2, layer=5),  # G = 2: upstream's gated norm is ungrouped all the same
    dict(form="mamba2", bias=True, conv_bias=False, head_dim=4, layer=1),
]
FORM_IDS = ["-".join(f"{k}={v}" for k, v in f.items()) for f in FORMS]


@pytest.mark.parametrize("kw", FORMS, ids=FORM_IDS)
def test_upstream_weights_load_by_name_and_the_forward_is_upstreams(kw):
    """float64: our mixer (with every hook cached) == upstream's forward line for line, to 1e-10."""
    ours, up = ours_and_upstream(**kw)
    h = torch.randn(2, 11, SIZES["d_model"], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        want = up(h)
        got = ours(h)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert want.abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-10
    # the other way: our weights are an upstream state_dict
    up.load_state_dict(ours.state_dict(), strict=True)


def test_lambda_of_the_mamba2_form_is_upstreams():
    """λ = sigmoid(lambda_q1) + λ_init with one scalar lambda_q1; λ_init from the block index (upstream's
    i_layer − 1); the Mamba-1 form has no λ (constant 1) and no λ_init."""
    ours, up = ours_and_upstream("mamba2", layer=4)
    assert ours.lambda_q1.shape == (1,) and ours.lambda_init == lambda_init(4)
    assert abs(ours.lambda_init - float(up.lambda_init)) < 1e-7  # upstream keeps it as a float32 tensor
    torch.testing.assert_close(ours.lam(), torch.sigmoid(up.lambda_q1[0]) + lambda_init(4), rtol=0, atol=1e-15)
    s6, _ = ours_and_upstream("mamba1", layer=4)
    assert s6.lambda_init is None and s6.subln is None and float(s6.lam()) == 1.0
    assert not any("lambda" in k or "subln" in k for k in s6.state_dict())


# -- the model: hooks, λ as a hook, the recurrent state ------------------------------------------
TINY = dict(d_model=16, n_layers=2, vocab_size=40, d_state=4, head_dim=8, chunk_size=4, d_conv=3)
ARCHS = [dict(arch="diffs6"), dict(arch="diffs6mamba2", n_groups=2)]


def model_(kw, seed=0):
    torch.manual_seed(seed)
    return perturb_(HookedMamba(MambaConfig(**{**TINY, **kw}))).double().eval()


def ids_(b=2, L=13, seed=0):
    return torch.randint(0, 40, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", ARCHS, ids=lambda kw: kw["arch"])
def test_model_equals_upstream_mixers_in_a_pre_norm_stack(kw):
    model, ids = model_(kw), ids_()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference.model_logits(model, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kw", ARCHS, ids=lambda kw: kw["arch"])
def test_two_pieces_with_the_state_carried_equal_one_run(kw):
    """Cuts at and inside SSD chunks (chunk_size 4), then token-by-token steps from a prefill."""
    model, ids = model_(kw), ids_()
    with torch.no_grad():
        full = model(ids)
        for cut in (4, 6, 12):
            a, state = model(ids[:, :cut], return_state=True)
            b = model(ids[:, cut:], state=state)
            torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-10)
        _, state = model(ids[:, :5], return_state=True)
        for t in range(5, ids.shape[1]):
            step, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
    units = dict(model.mixers())
    assert {"blocks.0.mixer.ssm_1", "blocks.0.mixer.ssm_2", "blocks.1.mixer"} == set(units)
    c1, c2 = state["blocks.0.mixer.ssm_1"].conv, state["blocks.0.mixer.ssm_2"].conv
    if kw["arch"] == "diffs6":  # both cores scan SiLU(conv(x)) of one x: one conv state
        assert c1 is c2 and state["blocks.0.mixer.ssm_1"].ssm.shape == (2, 32, 4)
    else:  # each branch convolves its own xBC (E + 2GN channels): its own conv state
        assert c1 is not c2 and c1.shape == (2, 32 + 2 * 2 * 4, 2) and (c1 - c2).abs().max() > 1e-6
        assert state["blocks.0.mixer.ssm_1"].ssm.shape == (2, 4, 8, 4)  # [batch, H, P, N]


@pytest.mark.parametrize("kw", ARCHS, ids=lambda kw: kw["arch"])
def test_lambda_hook_zero_ablates_branch_2(kw):
    """hook_lambda is the coefficient of branch 2 in both forms (1 in the Mamba-1 form): 0 equals
    zeroing branch 2's output (BRANCH_OUTPUT)."""
    model, ids = model_(kw), ids_(L=8)
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        base, cache = model.run_with_cache(ids)
        lam = cache["blocks.0.mixer.hook_lambda"]
        assert lam.ndim == 0 and (float(lam) == 1.0) == (kw["arch"] == "diffs6")
        zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
        patched = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mixer.hook_lambda", zero)])
        ablated = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.0.mixer.ssm_2.{mixer.BRANCH_OUTPUT}", zero)])
    torch.testing.assert_close(patched, ablated, rtol=0, atol=1e-12)
    assert (patched - base).abs().max() > 1e-6
    # hook_diff is branch 1's output minus λ times branch 2's
    b1, b2 = (cache[f"blocks.0.mixer.ssm_{k}.{mixer.BRANCH_OUTPUT}"] for k in (1, 2))
    assert_identity(cache["blocks.0.mixer.hook_diff"], b1.flatten(2) - lam * b2.flatten(2))


def test_lambda_table_lists_the_mamba2_form_only():
    from diffmamba_interp.jobs import lambda_table

    models = [model_(dict(arch="diffs6")), model_(dict(arch="diffs6mamba2"))]
    for m, label in zip(models, ("s6", "s6m2")):
        m.label = label
    table = lambda_table(models)
    assert list(table["model"]) == ["s6m2"] and list(table["block"]) == [0]  # the Mamba-1 form has no λ
    assert table["lambda"][0] == pytest.approx(float(models[1].blocks[0].mixer.lam().detach()))
