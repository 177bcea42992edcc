"""HookedMamba against real peers: transformers' Mamba/Mamba-2 and an independent step-by-step
recurrence (tests/reference.py) for the differential architectures."""

import subprocess
import sys

import pytest
import torch
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

import reference
from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.loading.hf import read_hf_config
from diffmamba_interp.loading.keys import KEYS


def ours_from_hf(hf):
    model = HookedMamba(read_hf_config(hf.config.to_dict()))
    sd, unknown = KEYS.to_ours(hf.state_dict())
    assert not unknown
    model.load_state_dict(sd, strict=True)
    return model.eval()


def assert_close_rel(ours, ref, rel=1e-4):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


M1 = [
    dict(conv_kernel=4, tie_word_embeddings=True),
    dict(conv_kernel=3, tie_word_embeddings=False),
]


@pytest.mark.parametrize("kw", M1)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 70)])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_logits_match_transformers_mamba(perturb, kw, shape, grad):
    torch.manual_seed(0)
    hf = perturb(MambaForCausalLM(HFMambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, **kw))).eval()
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 97, shape)
    with torch.no_grad():
        ref = hf(ids).logits
    with torch.set_grad_enabled(grad):
        out = ours(ids)
    assert out.shape == ref.shape
    assert ours.last_path == ("torch" if grad else "numba")
    assert_close_rel(out.detach(), ref)


M2 = [
    dict(n_groups=1, tie_word_embeddings=True, conv_kernel=4),
    dict(n_groups=2, tie_word_embeddings=False, conv_kernel=3),
]


@pytest.mark.parametrize("kw", M2)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 16)])
def test_logits_match_transformers_mamba2(perturb, kw, shape):
    torch.manual_seed(0)
    cfg = HFMamba2Config(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, head_dim=16, num_heads=4, chunk_size=8, **kw)
    hf = perturb(Mamba2ForCausalLM(cfg)).eval()
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 97, shape)
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert ours.last_path == "torch"
    assert_close_rel(out, ref)


ARCHS = [
    dict(arch="mamba1"),
    dict(arch="mamba2", n_groups=2),
    dict(arch="diffmamba1", diff_layers="all"),
    dict(arch="diffmamba2", diff_layers="alternate"),
    dict(arch="diffmamba2", diff_layers="all", n_groups=2),
    dict(arch="diffmamba2", diff_layers="quarter", n_layers=4),
    dict(arch="diffmamba2", diff_layers=[1]),
    dict(arch="diffs6", diff_layers="alternate"),
    dict(arch="diffs6mamba2", diff_layers="alternate", n_groups=2),
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """tiny(seed=0, **config overrides): the conftest tiny model, mamba2 unless arch= is given."""
    return lambda seed=0, **kw: tiny_model(kw.pop("arch", "mamba2"), seed=seed, **kw)


@pytest.mark.parametrize("kw", ARCHS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_logits_match_step_by_step_reference(tiny, kw, grad):
    model = tiny(**kw).to(torch.float64)
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        ref = reference.model_logits(model, ids)
    with torch.set_grad_enabled(grad):
        out = model(ids).detach()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_differential_layers_follow_settings(tiny):
    assert MambaConfig(arch="diffmamba2", n_layers=6, diff_layers="alternate").diff_layer_indices == (0, 2, 4)
    assert MambaConfig(arch="diffmamba2", n_layers=8, diff_layers="quarter").diff_layer_indices == (6, 7)
    assert MambaConfig(arch="diffmamba2", n_layers=3, diff_layers="all").diff_layer_indices == (0, 1, 2)
    model = tiny(arch="diffmamba2", n_layers=4, diff_layers="alternate")
    kinds = [type(b).__name__ for b in model.blocks]
    assert kinds == ["DiffBlock", "Block", "DiffBlock", "Block"]
    # halved mixers: expand 1, head_dim / 2, same heads
    m1 = model.blocks[0].mixer_1
    assert (m1.d_inner, m1.head_dim, m1.n_heads) == (16, 4, 4)
    assert model.blocks[1].mixer.n_heads == 4 and model.blocks[1].mixer.d_inner == 32


def expected_hooks(cfg: MambaConfig, pos: int) -> dict[str, tuple]:
    """Every hook of docs/conventions.md, "Hooks", enumerated independently of the model code."""
    b, d, V = 1, cfg.d_model, cfg.vocab_size
    out = {"hook_embed": (b, pos, d), "norm_f.hook_scale": (b, pos, 1), "norm_f.hook_normalized": (b, pos, d)}

    def m1(prefix, E, N, front=True):
        hooks = {}
        if front:
            hooks |= {"hook_in_proj": (b, pos, 2 * E), "hook_x": (b, pos, E), "hook_z": (b, pos, E), "hook_conv": (b, pos, E),
                      "hook_ssm_in": (b, pos, E), "hook_gate": (b, pos, E), "hook_gated": (b, pos, E), "hook_out": (b, pos, d)}
        return {prefix + k: v for k, v in hooks.items()}

    def s6(prefix, E, N):
        hooks = {"hook_dt": (b, pos, E), "hook_B": (b, pos, N), "hook_C": (b, pos, N), "hook_ssm_state": (b, pos, E, N),
                 "hook_ssm_out": (b, pos, E)}
        return {prefix + k: v for k, v in hooks.items()}

    def m2(prefix, E, H, P, G, N):
        hooks = {"hook_in_proj": (b, pos, 2 * E + 2 * G * N + H), "hook_z": (b, pos, E), "hook_xBC": (b, pos, E + 2 * G * N),
                 "hook_conv": (b, pos, E + 2 * G * N), "hook_ssm_in": (b, pos, H, P), "hook_B": (b, pos, G, N),
                 "hook_C": (b, pos, G, N), "hook_dt": (b, pos, H), "hook_ssm_state": (b, pos, H, P, N),
                 "hook_ssm_out": (b, pos, H, P), "hook_gate": (b, pos, E), "norm.hook_scale": (b, pos, G),
                 "norm.hook_normalized": (b, pos, E), "hook_out": (b, pos, d)}
        return {prefix + k: v for k, v in hooks.items()}

    N, G = cfg.d_state, cfg.n_groups
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        out |= {p + "hook_resid_pre": (b, pos, d), p + "norm.hook_scale": (b, pos, 1), p + "norm.hook_normalized": (b, pos, d),
                p + "hook_mixer_out": (b, pos, d), p + "hook_resid_post": (b, pos, d)}
        diff = cfg.is_diff_layer(i)
        if cfg.arch in ("diffmamba1", "diffmamba2") and diff:
            out |= {p + "hook_lambda": (), p + "hook_diff": (b, pos, d), p + "subln.hook_scale": (b, pos, 1),
                    p + "subln.hook_normalized": (b, pos, d)}
            for k in (1, 2):
                if cfg.arch == "diffmamba2":
                    out |= m2(f"{p}mixer_{k}.", d, 2 * d // cfg.head_dim, cfg.head_dim // 2, G, N)
                else:
                    E = d * max(1, cfg.expand // 2)
                    out |= m1(f"{p}mixer_{k}.", E, N) | s6(f"{p}mixer_{k}.", E, N)
        elif cfg.arch == "diffs6" and diff:  # upstream's Mamba-1 form: no λ parameter, no subln
            E = cfg.d_inner
            out |= m1(p + "mixer.", E, N) | s6(p + "mixer.ssm_1.", E, N) | s6(p + "mixer.ssm_2.", E, N)
            out |= {p + "mixer.hook_lambda": (), p + "mixer.hook_diff": (b, pos, E)}
        elif cfg.arch == "diffs6mamba2" and diff:  # upstream's Mamba-2 form: a Mamba-2 path per branch up to its norm
            E = cfg.d_inner
            for k in (1, 2):
                branch = m2(f"{p}mixer.ssm_{k}.", E, cfg.n_heads, cfg.head_dim, G, N)
                del branch[f"{p}mixer.ssm_{k}.hook_out"]
                branch[f"{p}mixer.ssm_{k}.norm.hook_scale"] = (b, pos, 1)  # ungrouped, as upstream
                out |= branch
            out |= {p + "mixer.hook_lambda": (), p + "mixer.hook_diff": (b, pos, E), p + "mixer.subln.hook_scale": (b, pos, 1),
                    p + "mixer.subln.hook_normalized": (b, pos, E), p + "mixer.hook_out": (b, pos, d)}
        elif cfg.family == "mamba2":
            out |= m2(p + "mixer.", cfg.d_inner, cfg.n_heads, cfg.head_dim, G, N)
        else:
            out |= m1(p + "mixer.", cfg.d_inner, N) | s6(p + "mixer.", cfg.d_inner, N)
    return out


@pytest.mark.parametrize("kw", ARCHS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_hook_names_and_shapes(tiny, kw):
    model = tiny(**kw)
    table = model.hook_shapes(pos=5)
    got = dict(zip(table["hook"], table["shape"]))
    want = expected_hooks(model.cfg, 5)
    assert sorted(got) == sorted(want)
    assert got == want


def test_hook_identities_diffmamba2(tiny):
    model = tiny(arch="diffmamba2", diff_layers="alternate").to(torch.float64)
    ids = torch.randint(0, 40, (2, 9))
    _, cache = model.run_with_cache(ids, names_filter=lambda n: True)
    blk = model.blocks[0]
    lam = cache["blocks.0.hook_lambda"]
    assert lam.ndim == 0
    torch.testing.assert_close(lam, blk.lam().double())
    torch.testing.assert_close(cache["blocks.0.hook_diff"], cache["blocks.0.mixer_1.hook_out"] - lam * cache["blocks.0.mixer_2.hook_out"])
    torch.testing.assert_close(cache["blocks.0.hook_mixer_out"], (1 - blk.lambda_init) * cache["blocks.0.subln.hook_normalized"])
    for i in range(2):
        p = f"blocks.{i}."
        torch.testing.assert_close(cache[p + "hook_resid_post"], cache[p + "hook_resid_pre"] + cache[p + "hook_mixer_out"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    # ssm_out recomputed from the states and C (+ D·x)
    m = model.blocks[1].mixer
    st, C, x = cache["blocks.1.mixer.hook_ssm_state"], cache["blocks.1.mixer.hook_C"], cache["blocks.1.mixer.hook_ssm_in"]
    Ch = C.repeat_interleave(m.n_heads // m.n_groups, dim=2)
    torch.testing.assert_close(cache["blocks.1.mixer.hook_ssm_out"], torch.einsum("blhpn,blhn->blhp", st, Ch) + m.D[:, None] * x)


def test_ssm_state_identity_mamba1_and_not_cached_by_default(tiny):
    model = tiny(arch="mamba1").to(torch.float64)
    ids = torch.randint(0, 40, (1, 7))
    _, cache = model.run_with_cache(ids)
    assert not any(k.endswith("hook_ssm_state") for k in cache.keys())
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.mixer"))
    m = model.blocks[0].mixer
    st, C, u = (cache[f"blocks.0.mixer.{k}"] for k in ("hook_ssm_state", "hook_C", "hook_ssm_in"))
    torch.testing.assert_close(cache["blocks.0.mixer.hook_ssm_out"], torch.einsum("blen,bln->ble", st, C) + m.D * u)
    # the recurrence itself: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    dt, B = cache["blocks.0.mixer.hook_dt"], cache["blocks.0.mixer.hook_B"]
    A = -torch.exp(m.A_log)
    h1 = torch.exp(dt[:, 1, :, None] * A) * st[:, 0] + dt[:, 1, :, None] * B[:, 1, None, :] * u[:, 1, :, None]
    torch.testing.assert_close(st[:, 1], h1)


@pytest.mark.parametrize("kw", ARCHS[:4] + ARCHS[-2:], ids=lambda kw: kw["arch"])
def test_reading_hooks_does_not_change_output(tiny, kw):
    model = tiny(**kw)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        plain = model(ids)
        cached, _ = model.run_with_cache(ids, names_filter=lambda n: True)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


def test_patching_lambda_to_zero_ablates_mixer_2(tiny):
    model = tiny(arch="diffmamba2", diff_layers="all").to(torch.float64)
    ids = torch.randint(0, 40, (1, 8))
    patched = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_lambda", lambda t, hook: torch.zeros_like(t))])
    # same as zeroing mixer_2's output
    zeroed = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mixer_2.hook_out", lambda t, hook: torch.zeros_like(t))])
    torch.testing.assert_close(patched, zeroed)
    assert (patched - model(ids)).abs().max() > 1e-6
    # and patching changes everything downstream: blocks after 0 see the new residual
    _, c0 = model.run_with_cache(ids)
    with model.hooks(fwd_hooks=[("blocks.0.hook_lambda", lambda t, hook: torch.zeros_like(t))]):
        _, c1 = model.run_with_cache(ids)
    assert (c0["blocks.1.hook_resid_pre"] - c1["blocks.1.hook_resid_pre"]).abs().max() > 1e-6
    torch.testing.assert_close(c0["blocks.0.hook_resid_pre"], c1["blocks.0.hook_resid_pre"])


def test_patching_ssm_state_changes_readout(tiny):
    model = tiny(arch="mamba2").to(torch.float64)
    ids = torch.randint(0, 40, (1, 6))
    base = model(ids)
    out = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.mixer.hook_ssm_state", lambda t, hook: t * 0)])
    assert (out - base).abs().max() > 1e-6


def test_dtypes(tiny):
    model = tiny(arch="diffmamba2", diff_layers="alternate")
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        f32 = model(ids)
        f64 = model.to(torch.float64)(ids)
        bf16 = model.to(torch.bfloat16)(ids)
    assert f64.dtype == torch.float64 and bf16.dtype == torch.float32
    torch.testing.assert_close(f64.float(), f32, rtol=1e-4, atol=1e-4)
    assert (bf16 - f32).abs().max() < 0.1 * f32.abs().max()


@pytest.mark.parametrize("kw", ARCHS[:4] + ARCHS[-2:], ids=lambda kw: kw["arch"])
def test_gradients_flow(tiny, kw):
    model = tiny(**kw).train()
    ids = torch.randint(0, 40, (2, 9))
    loss = model(ids, return_type="loss")
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.last_path == "torch"


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[1, 2, 40]]), "token id 40 is out of range for vocab size 40"),
        (torch.tensor([[-1, 2]]), "token id -1 is out of range for vocab size 40"),
        (torch.tensor([1, 2, 3]), r"shape \[batch, pos\]"),
        (torch.zeros(1, 0, dtype=torch.long), r"shape \[batch, pos\]"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
        ([[1, 2]], "LongTensor"),
    ],
)
def test_bad_input_ids(tiny, bad, match):
    model = tiny(arch="mamba2")
    with pytest.raises(ValueError, match=match) as info:
        model(bad)
    assert isinstance(info.value, DiffMambaError)
    assert "\n" not in str(info.value)


def test_bad_config():
    with pytest.raises(DiffMambaError, match="unknown arch 'mamba3'"):
        MambaConfig(arch="mamba3")
    with pytest.raises(DiffMambaError, match="not a multiple of head_dim"):
        MambaConfig(arch="mamba2", d_model=24, head_dim=10)
    with pytest.raises(DiffMambaError, match="out of range"):
        MambaConfig(arch="diffmamba2", n_layers=2, diff_layers=[5])
    with pytest.raises(DiffMambaError, match="d_model must be a positive integer"):
        MambaConfig(d_model=0)


def test_nnsight_trace_save_and_patch(tiny):
    from nnsight import NNsight

    model = tiny(arch="diffmamba2", diff_layers="all").to(torch.float64)
    ids = torch.randint(0, 40, (1, 8))
    expected_logits, cache = model.run_with_cache(ids)
    ns = NNsight(model)
    with ns.trace(ids):
        diff = ns.blocks[0].hook_diff.output.save()
        dt = ns.blocks[1].mixer_2.hook_dt.output.save()
        logits = ns.output.save()
    torch.testing.assert_close(diff, cache["blocks.0.hook_diff"])
    torch.testing.assert_close(dt, cache["blocks.1.mixer_2.hook_dt"])
    torch.testing.assert_close(logits, expected_logits)
    # patch: zero hook_diff of block 0 with nnsight == the TransformerLens hook doing the same
    with ns.trace(ids):
        ns.blocks[0].hook_diff.output[:] = 0
        patched = ns.output.save()
    want = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_diff", lambda t, hook: torch.zeros_like(t))])
    torch.testing.assert_close(patched, want)
    assert (patched - expected_logits).abs().max() > 1e-6


def test_nnsight_reads_ssm_state_with_capture_states(tiny):
    from nnsight import NNsight

    model = tiny(arch="mamba2")
    ids = torch.randint(0, 40, (1, 5))
    ns = NNsight(model)
    with model.capture_states(), ns.trace(ids):
        st = ns.blocks[0].mixer.hook_ssm_state.output.save()
    assert st.shape == (1, 5, model.cfg.n_heads, model.cfg.head_dim, model.cfg.d_state)
    assert not model.blocks[0].mixer.capture_states  # restored


def test_import_and_cpu_forward_do_not_touch_gpu_kernels():
    code = (
        "import sys, torch\n"
        "import diffmamba_interp as dm\n"
        "m = dm.HookedMamba(dm.MambaConfig(arch='diffmamba2', d_model=16, n_layers=2, vocab_size=20, head_dim=8))\n"
        "m(torch.zeros(1, 3, dtype=torch.long))\n"
        "m1 = dm.HookedMamba(dm.MambaConfig(arch='mamba1', d_model=16, n_layers=1, vocab_size=20))\n"
        "m1(torch.zeros(1, 3, dtype=torch.long))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton')]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "diffmamba2"])
def test_cuda_kernels_match_pytorch_path(tiny, arch):
    from diffmamba_interp.scan import gpu_kernels

    if gpu_kernels() is None:
        pytest.skip("the gpu extra (mamba-ssm, causal-conv1d) is not installed")
    model = tiny(arch=arch, d_model=64, head_dim=32, chunk_size=16).cuda()
    ids = torch.randint(0, 40, (2, 50), device="cuda")
    with torch.no_grad():
        fast = model(ids)
        assert model.last_path == "mamba_ssm"
        with model.capture_states():  # per-position states force the PyTorch path
            slow = model(ids)
        assert model.last_path == "torch"
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-3)
