"""Recurrent mode: state in and out, pieces equal one run, O(1) steps, generation equal to
transformers', hooks while decoding, chunked analyses, and state patching that propagates."""

from __future__ import annotations

import pytest
import torch

import diffmamba_interp as dmi
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.recurrent import collect, patch_state

ARCHS = [dict(arch="mamba1"), dict(arch="mamba2", n_groups=2), dict(arch="diffmamba1", diff_layers="all"),
         dict(arch="diffmamba2", diff_layers="alternate"), dict(arch="diffs6", diff_layers="alternate"),
         dict(arch="diffs6mamba2", diff_layers="alternate", n_groups=2)]
IDS = lambda kw: kw["arch"]  # noqa: E731


def ids_(b=2, L=13, V=40, seed=0):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", ARCHS, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_pieces_with_the_state_carried_equal_one_run(tiny_model, kw, dtype, tol):
    model = tiny_model(**kw, dtype=dtype)  # SSD chunk_size 4: splits at 4 and 8 are chunk boundaries, 5 is inside
    ids = ids_()
    with torch.no_grad():
        full = model(ids)
        for cut in ((4,), (5,), (8,), (1, 6, 12)):
            pieces, state = [], None
            for a, b in zip((0, *cut), (*cut, ids.shape[1])):
                out, state = model(ids[:, a:b], state=state, return_state=True)
                pieces.append(out)
            torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=tol, atol=tol)
            assert state.seen == ids.shape[1] and state.batch == 2
        torch.testing.assert_close(model(ids, state=model.init_state(2)), full, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", ARCHS, ids=IDS)
def test_steps_equal_the_forward_and_state_shapes(tiny_model, kw):
    model = tiny_model(**kw, dtype=torch.float64)
    ids = ids_()
    with torch.no_grad():
        full = model(ids)
        logits, state = model(ids[:, :6], return_state=True)
        for t in range(6, ids.shape[1]):
            step, state = model.step(ids[:, t], state)
            torch.testing.assert_close(step, full[:, t], rtol=1e-10, atol=1e-10)
    for name, unit in model.mixers():
        conv_shape, ssm_shape = unit.state_shapes()
        assert state[name].conv.shape == (2, *conv_shape) and state[name].ssm.shape == (2, *ssm_shape)
    if kw["arch"] == "mamba1":
        assert state["blocks.0.mixer"].ssm.shape == (2, 32, 4)  # [batch, E, N]
    if kw["arch"] == "mamba2":
        assert state["blocks.0.mixer"].ssm.shape == (2, 4, 8, 4)  # [batch, H, P, N]
    if kw["arch"] == "diffs6":  # the two cores scan one u: they share the mixer's conv
        assert state["blocks.0.mixer.ssm_1"].conv is state["blocks.0.mixer.ssm_2"].conv
    if kw["arch"] == "diffs6mamba2":  # each branch convolves its own xBC
        a, b = state["blocks.0.mixer.ssm_1"].conv, state["blocks.0.mixer.ssm_2"].conv
        assert a is not b and (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("kw", ARCHS, ids=IDS)
def test_in_place_steps_equal_steps_and_overwrite_only_when_asked(tiny_model, kw):
    """step(in_place=True) (what generate uses) gives the same logits and states as a plain step; a
    plain step leaves the given state as it was, an in-place one writes the new SSM states into it."""
    model = tiny_model(**kw, dtype=torch.float64)
    ids = ids_()
    with torch.no_grad():
        _, state = model(ids[:, :6], return_state=True)
        own = state.clone()
        for t in range(6, ids.shape[1]):
            before = state.clone()
            step, new = model.step(ids[:, t], state)
            for k in state:  # the plain step kept its input
                assert torch.equal(state[k].ssm, before[k].ssm) and torch.equal(state[k].conv, before[k].conv)
            given = {k: own[k].ssm for k in own}
            step_ip, own = model.step(ids[:, t], own, in_place=True)
            torch.testing.assert_close(step_ip, step, rtol=1e-12, atol=1e-12)
            for k in new:
                assert own[k].ssm.data_ptr() == given[k].data_ptr()  # written into the given tensor
                torch.testing.assert_close(own[k].ssm, new[k].ssm, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(own[k].conv, new[k].conv, rtol=0, atol=0)
            state = new


def test_state_clone_to_and_select(tiny_model):
    model = tiny_model("diffs6")
    _, state = model(ids_(), return_state=True)
    copy = state.clone()
    assert copy["blocks.0.mixer.ssm_1"].conv is copy["blocks.0.mixer.ssm_2"].conv
    copy["blocks.1.mixer"].ssm.zero_()
    assert state["blocks.1.mixer"].ssm.abs().sum() > 0  # clone does not share storage
    assert state.to(torch.float64)["blocks.1.mixer"].ssm.dtype == torch.float64
    one = state.select([1])
    assert one.batch == 1 and torch.equal(one["blocks.1.mixer"].ssm[0], state["blocks.1.mixer"].ssm[1])


@pytest.mark.parametrize("which", ["mamba", "mamba2"])
def test_greedy_generation_equals_transformers(perturb, which):
    import transformers

    from diffmamba_interp.loading.hf import read_hf_config
    from diffmamba_interp.loading.keys import KEYS

    torch.manual_seed(0)
    if which == "mamba":
        cfg = transformers.MambaConfig(vocab_size=60, hidden_size=32, state_size=8, num_hidden_layers=2)
        hf = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=60, hidden_size=32, state_size=8, num_hidden_layers=2, head_dim=16,
                                        num_heads=4, expand=2, n_groups=1, chunk_size=8)
        hf = transformers.Mamba2ForCausalLM(cfg)
    hf = perturb(hf, scale=0.5).eval()
    ours = dmi.HookedMamba(read_hf_config(hf.config.to_dict()))
    ours.load_state_dict(KEYS.to_ours(hf.state_dict())[0])
    ours.eval()
    ids = ids_(b=1, L=9, V=60, seed=3)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, chunk_size=4), ref)  # chunked prefill


def test_decoding_fires_hooks_and_samples_reproducibly(tiny_model):
    model = tiny_model("diffmamba2", dtype=torch.float64)
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_diff", lambda t, hook: seen.append(t.shape[1]))]):
        out = model.generate(ids_(b=1, L=5), max_new_tokens=4)
    assert out.shape == (1, 9) and seen == [5, 1, 1, 1]  # the prompt, then one position per new token (the last is not run)
    a = model.generate(ids_(b=1, L=5), max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=1)
    b = model.generate(ids_(b=1, L=5), max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=1)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(ids_(b=1, L=5), max_new_tokens=0), ids_(b=1, L=5))


@pytest.mark.parametrize("kw", ARCHS, ids=IDS)
def test_collect_in_chunks_equals_one_run(tiny_model, kw):
    model = tiny_model(**kw, dtype=torch.float64)
    ids = ids_()
    names = ["hook_embed", "blocks.1.hook_resid_post"] + [f"{n}.hook_dt" for n, _ in model.mixers()]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    for chunk in (3, 4, 100):
        kept = collect(model, ids, names, positions=[-1, 0, 7], chunk_size=chunk)
        for n in names:
            torch.testing.assert_close(kept[n], cache[n][:, [12, 0, 7]], rtol=1e-10, atol=1e-10)


def test_chunked_analyses_equal_unchunked(tiny_model, tokenizer):
    model = tiny_model("diffmamba2", vocab_size=len(tokenizer), d_model=32, head_dim=16, d_state=8, dtype=torch.float64)
    model.tokenizer = tokenizer
    from diffmamba_interp.data import load_data

    prompts = load_data("babi:qa2", n=4, seed=0)
    whole = dmi.target_probs(model, prompts, progress=False, chunk_size=10_000)
    chunked = dmi.target_probs(model, prompts, progress=False, chunk_size=16)
    assert max(len(tokenizer.encode(p.prompt)) for p in prompts) > 16
    assert ((whole.prob - chunked.prob).abs() < 1e-10).all() and (whole["rank"] == chunked["rank"]).all()
    ids = model.to_tokens(prompts[0].prompt)
    a = dmi.branch_lens(model, ids, targets=[prompts[0].answer], progress=False, chunk_size=7)
    b = dmi.branch_lens(model, ids, targets=[prompts[0].answer], progress=False)
    assert ((a.value - b.value).abs() < 1e-9).all()


@pytest.mark.parametrize("mixer", ["blocks.1.mixer", "blocks.0.mixer_2"])
def test_state_patching_propagates(tiny_model, mixer):
    model = tiny_model("diffmamba2", diff_layers="alternate", dtype=torch.float64)
    ids, t = ids_(), 5
    fn = lambda h: h * 0 + 0.3  # noqa: E731
    with torch.no_grad():
        clean = model(ids)
        patched = patch_state(model, ids, mixer, t, fn)
        head, state = model(ids[:, : t + 1], return_state=True)  # by hand: run the prefix, edit, continue
        state = state.clone()
        state.entries[mixer].ssm = fn(state.entries[mixer].ssm)
        tail = model(ids[:, t + 1:], state=state)
    torch.testing.assert_close(patched, torch.cat([head, tail], 1), rtol=0, atol=0)
    torch.testing.assert_close(patched[:, : t + 1], clean[:, : t + 1], rtol=1e-12, atol=1e-12)  # up to t: unchanged
    assert (patched[:, t + 1:] - clean[:, t + 1:]).abs().amax(-1).min() > 1e-6  # every later position moves
    # a hook_ssm_state patch only changes the readout: the patched mixer's own later outputs still
    # follow the clean recurrence (later layers may still see the change at t through their inputs)
    def set_at_t(s, hook):
        s[:, t] = 0.3
        return s

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(ids, names_filter=[f"{mixer}.hook_ssm_out"])
        with model.hooks(fwd_hooks=[(f"{mixer}.hook_ssm_state", set_at_t)]):
            _, read_cache = model.run_with_cache(ids, names_filter=[f"{mixer}.hook_ssm_out"])
    y_clean, y_read = clean_cache[f"{mixer}.hook_ssm_out"], read_cache[f"{mixer}.hook_ssm_out"]
    assert (y_read[:, t] - y_clean[:, t]).abs().max() > 1e-6
    torch.testing.assert_close(y_read[:, t + 1:], y_clean[:, t + 1:], rtol=1e-12, atol=1e-12)


def test_recurrent_bad_input_is_one_line(tiny_model):
    model = tiny_model("mamba2")
    other = tiny_model("mamba1")
    ids = ids_()
    _, state = model(ids, return_state=True)
    cases = [
        (lambda: model(ids, state=other.init_state(2)), "another model"),
        (lambda: model(ids[:1], state=state), "batch"),
        (lambda: model(ids, state=state.to(torch.float64)), "use state.to"),
        (lambda: model(ids, state={"blocks.0.mixer": 1}), "ModelState"),
        (lambda: model.generate(ids, max_new_tokens=-1), "max_new_tokens"),
        (lambda: model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0), "temperature"),
        (lambda: collect(model, ids, ["hook_embed"], chunk_size=0), "chunk_size"),
        (lambda: model.step(ids, state), "one token"),
        (lambda: model.init_state(0), "batch"),
        (lambda: patch_state(model, ids, "blocks.9.mixer", 3, lambda h: h), "no scan unit"),
        (lambda: patch_state(model, ids, "blocks.0.mixer", 99, lambda h: h), "pos must be"),
        (lambda: patch_state(model, ids, "blocks.0.mixer", 3, lambda h: h[0]), "must return a tensor of shape"),
    ]
    for call, needle in cases:
        with pytest.raises(DiffMambaError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)
