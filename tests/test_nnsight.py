"""`MambaNNsight`: SSM states read without `capture_states()`, errors that name `capture_states`, and
several invokes of different lengths in one trace (right-padded, each invoke seeing its own rows and
positions) against separate runs of the model."""

import pytest
import torch

from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.nnsight_model import MambaNNsight

ARCHS = [("mamba1", {}), ("mamba2", {}), ("diffmamba2", {"diff_layers": "all"}), ("diffs6", {}), ("diffs6mamba2", {})]


def state_hooks(model):
    return [n for n in model.hook_dict if n.endswith("hook_ssm_state")]


def states_cache(model, ids):
    return model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_ssm_state"))[1]


def capture_flags(model):
    return [unit.capture_states for _, unit in model.mixers()]


# -- states on request -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,over", ARCHS)
def test_states_read_without_capture_states_equal_run_with_cache(tiny_model, arch, over):
    model = tiny_model(arch, dtype=torch.float64, **over)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    want = states_cache(model, ids)
    ns = MambaNNsight(model)
    names = state_hooks(model)
    assert len(names) >= 2
    for name in names:
        with ns.trace(ids):
            got = ns.get(name).output.save()
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-12)
    assert not any(capture_flags(model))  # turned on for the trace only


def test_state_asked_for_mid_mixer_and_in_a_cache(tiny_model):
    """A request made inside the mixer (after hook_dt, before the scan) is still in time; a cache
    that names state hooks gets them."""
    model = tiny_model("diffmamba2", dtype=torch.float64, diff_layers="all")
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(2))
    want = states_cache(model, ids)
    ns = MambaNNsight(model)
    with ns.trace(ids):
        dt = ns.blocks[1].mixer_2.hook_dt.output.save()
        st = ns.blocks[1].mixer_2.hook_ssm_state.output.save()
    torch.testing.assert_close(st, want["blocks.1.mixer_2.hook_ssm_state"], rtol=0, atol=1e-12)
    assert dt.shape[:2] == (1, 9)
    with ns.trace(ids) as tr:
        cache = tr.cache(modules=[ns.blocks[0].mixer_1.hook_ssm_state, "model.blocks.1.mixer_2.hook_ssm_state"])
    for name in ("blocks.0.mixer_1.hook_ssm_state", "blocks.1.mixer_2.hook_ssm_state"):
        torch.testing.assert_close(cache[f"model.{name}"].output, want[name], rtol=0, atol=1e-12)


def test_only_requested_mixers_compute_states(tiny_model):
    model = tiny_model("mamba2", dtype=torch.float64)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(3))
    seen = {}  # mixer -> whether it captured states when it ran
    for name, unit in model.mixers():
        unit.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, mod.capture_states))
    ns = MambaNNsight(model)
    with ns.trace(ids):
        ns.blocks[1].mixer.hook_ssm_state.output.save()
    assert seen == {"blocks.0.mixer": False, "blocks.1.mixer": True}
    with MambaNNsight(model, capture_states=True).trace(ids):
        pass
    assert seen == {"blocks.0.mixer": True, "blocks.1.mixer": True}
    assert not any(capture_flags(model))


def test_capture_states_true_fills_a_cache_of_everything(tiny_model):
    model = tiny_model("mamba1", dtype=torch.float64)
    ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(4))
    want = states_cache(model, ids)
    with (ns := MambaNNsight(model, capture_states=True)).trace(ids) as tr:
        cache = tr.cache()
    for name in state_hooks(model):
        torch.testing.assert_close(cache[f"model.{name}"].output, want[name], rtol=0, atol=1e-12)
    assert not any(capture_flags(model))
    assert ns._capture is True


def test_state_asked_for_too_late_names_capture_states(tiny_model):
    model = tiny_model("mamba2")
    ids = torch.randint(0, 40, (1, 5))
    ns = MambaNNsight(model)
    with pytest.raises(DiffMambaError) as err:
        with ns.trace(ids):
            ns.blocks[0].mixer.hook_ssm_out.output.save()
            ns.blocks[0].mixer.hook_ssm_state.output.save()  # runs before hook_ssm_out: out of order
    msg = str(err.value)
    assert "\n" not in msg and "capture_states" in msg and "blocks.0.mixer.hook_ssm_state" in msg
    assert not any(capture_flags(model))  # restored after a failed trace too
    with ns.trace(ids):  # and the wrapper still works
        st = ns.blocks[0].mixer.hook_ssm_state.output.save()
    assert st.shape == (1, 5, model.cfg.n_heads, model.cfg.head_dim, model.cfg.d_state)


def test_capture_states_false_errors_in_one_line_unless_captured(tiny_model):
    model = tiny_model("mamba2")
    ids = torch.randint(0, 40, (1, 5))
    ns = MambaNNsight(model, capture_states=False)
    with pytest.raises(DiffMambaError) as err:
        with ns.trace(ids):
            ns.blocks[1].mixer.hook_ssm_state.output.save()
    msg = str(err.value)
    assert "\n" not in msg and "capture_states" in msg and "blocks.1.mixer.hook_ssm_state" in msg
    with model.capture_states(), ns.trace(ids):
        st = ns.blocks[1].mixer.hook_ssm_state.output.save()
        assert all(capture_flags(model))
    assert st.shape[:2] == (1, 5)
    assert not any(capture_flags(model))
    with pytest.raises(DiffMambaError, match="capture_states must be"):
        MambaNNsight(model, capture_states="yes")


def test_patching_a_state_through_the_wrapper_equals_a_hook(tiny_model):
    model = tiny_model("mamba1", dtype=torch.float64)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(5))
    ns = MambaNNsight(model)
    with ns.trace(ids):
        ns.blocks[0].mixer.hook_ssm_state.output[:, 2:] = 0
        got = ns.output.save()

    def zero(t, hook):
        t = t.clone()
        t[:, 2:] = 0
        return t

    want = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mixer.hook_ssm_state", zero)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (want - model(ids)).abs().max() > 1e-6


# -- several invokes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,over", ARCHS)
@pytest.mark.parametrize("long_first", [True, False])
def test_invokes_of_different_lengths_equal_separate_runs(tiny_model, arch, over, long_first):
    model = tiny_model(arch, dtype=torch.float64, shared=True, **over)
    g = torch.Generator().manual_seed(6)
    long, short = torch.randint(0, 40, (1, 9), generator=g), torch.randint(0, 40, (2, 4), generator=g)
    first, second = (long, short) if long_first else (short, long)
    state = state_hooks(model)[0]
    ns = MambaNNsight(model)
    with ns.trace() as tr:
        with tr.invoke(first):
            s1 = ns.get(state).output.save()
            r1 = ns.blocks[1].hook_resid_post.output.save()
            o1 = ns.output.save()
        with tr.invoke(second):
            s2 = ns.get(state).output.save()
            r2 = ns.blocks[1].hook_resid_post.output.save()
            o2 = ns.output.save()
    for ids, s, r, o in ((first, s1, r1, o1), (second, s2, r2, o2)):
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in (state, "blocks.1.hook_resid_post"))
        assert o.shape == logits.shape and r.shape == cache["blocks.1.hook_resid_post"].shape  # own rows and positions
        torch.testing.assert_close(o, logits, rtol=0, atol=1e-10)
        torch.testing.assert_close(r, cache["blocks.1.hook_resid_post"], rtol=0, atol=1e-10)
        torch.testing.assert_close(s, cache[state], rtol=0, atol=1e-10)


def test_invokes_are_right_padded_with_the_pad_id(tiny_model, tokenizer):
    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    pad = tokenizer.pad_token_id
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])
    ns = MambaNNsight(model)
    with ns.trace() as tr:
        with tr.invoke(a):
            pass
        with tr.invoke(b):
            own = ns.input.save()  # this invoke's view of input_ids
        with tr.invoke():  # an empty invoke sees the whole batch
            batch = ns.input.save()
    assert batch.tolist() == [[5, 6, 7, 8, 9], [11, 12, pad, pad, pad]]
    assert own.tolist() == [[11, 12]]


def test_edits_stay_in_their_invoke(tiny_model):
    model = tiny_model("diffmamba2", dtype=torch.float64, diff_layers="all")
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 40, (1, 8), generator=g), torch.randint(0, 40, (1, 3), generator=g)
    ns = MambaNNsight(model)
    with ns.trace() as tr:
        with tr.invoke(a):
            oa = ns.output.save()
        with tr.invoke(b):
            ns.blocks[0].hook_diff.output[:, -1] = 0  # b's own last token (position 2), not a pad
            ob = ns.output.save()

    def zero_last(t, hook):
        return torch.cat([t[:, :-1], torch.zeros_like(t[:, -1:])], dim=1)

    want_b = model.run_with_hooks(b, fwd_hooks=[("blocks.0.hook_diff", zero_last)])
    torch.testing.assert_close(ob, want_b, rtol=0, atol=1e-10)
    torch.testing.assert_close(oa, model(a), rtol=0, atol=1e-10)
    assert (want_b - model(b)).abs().max() > 1e-6
    # assigning a whole value of the invoke's shape
    with ns.trace() as tr:
        with tr.invoke(b):
            ns.blocks[1].hook_diff.output = torch.zeros_like(ns.blocks[1].hook_diff.output)
            ob2 = ns.output.save()
        with tr.invoke(a):
            oa2 = ns.output.save()
    want_b2 = model.run_with_hooks(b, fwd_hooks=[("blocks.1.hook_diff", lambda t, hook: torch.zeros_like(t))])
    torch.testing.assert_close(ob2, want_b2, rtol=0, atol=1e-10)
    torch.testing.assert_close(oa2, model(a), rtol=0, atol=1e-10)


def test_gradients_in_a_padded_invoke_equal_a_separate_run(tiny_model):
    model = tiny_model("mamba2", dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    a, b = torch.randint(0, 40, (1, 7), generator=g), torch.randint(0, 40, (1, 4), generator=g)
    ns = MambaNNsight(model)
    with ns.trace() as tr:
        with tr.invoke(a):
            pass
        with tr.invoke(b):
            h = ns.blocks[0].hook_resid_post.output
            loss = ns.output[:, -1, 3].sum()
            with loss.backward():
                grad = h.grad.save()
    kept = {}

    def keep(t, hook):
        t.retain_grad()
        kept["h"] = t
        return t

    model.run_with_hooks(b, fwd_hooks=[("blocks.0.hook_resid_post", keep)])[:, -1, 3].sum().backward()
    assert grad.shape == (1, 4, model.cfg.d_model)
    torch.testing.assert_close(grad, kept["h"].grad, rtol=0, atol=1e-12)
    assert grad.abs().max() > 0


def test_text_invokes_are_tokenised_and_padded(tiny_model, tokenizer):
    model = tiny_model("mamba2", dtype=torch.float64, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    ta, tb = "Mary went to the kitchen .", "John moved to the hallway . Where is John ?"
    assert model.to_tokens(ta).shape[1] != model.to_tokens(tb).shape[1]
    ns = MambaNNsight(model)
    with ns.trace() as tr:
        with tr.invoke(ta):
            oa = ns.output.save()
        with tr.invoke([tb]):
            ob = ns.output.save()
    torch.testing.assert_close(oa, model(model.to_tokens(ta)), rtol=0, atol=1e-10)
    torch.testing.assert_close(ob, model(model.to_tokens(tb)), rtol=0, atol=1e-10)
    with ns.trace(ta):  # a text straight to trace()
        o = ns.output.save()
    torch.testing.assert_close(o, model(model.to_tokens(ta)), rtol=0, atol=1e-12)


def test_refusals_are_one_line_errors(tiny_model, tokenizer):
    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    ns = MambaNNsight(model)
    ids = torch.randint(0, 40, (1, 5))
    with pytest.raises(DiffMambaError, match="no tokenizer"):
        with ns.trace("Mary went to the kitchen ."):
            pass
    model.tokenizer = tokenizer
    with pytest.raises(DiffMambaError, match=r"different token lengths .*tr\.invoke"):
        with ns.trace() as tr:
            with tr.invoke(["Mary went to the kitchen .", "John went home ."]):
                pass
    with pytest.raises(DiffMambaError, match="return_type='loss'"):
        with ns.trace() as tr:
            with tr.invoke(ids, return_type="loss"):
                pass
            with tr.invoke(ids[:, :3], return_type="loss"):
                pass
    with pytest.raises(DiffMambaError, match="return_type='both'"):
        with ns.trace(return_type="both") as tr:
            with tr.invoke(ids):
                pass
            with tr.invoke(ids[:, :3]):
                pass
    with pytest.raises(DiffMambaError, match="state= needs a trace with one invoke"):
        with ns.trace() as tr:
            state = model.init_state(1)
            with tr.invoke(ids, state=state):
                pass
            with tr.invoke(ids, state=state):
                pass
    with pytest.raises(DiffMambaError, match="different return_type="):
        with ns.trace() as tr:
            with tr.invoke(ids, return_type=None):
                pass
            with tr.invoke(ids):
                pass
    with pytest.raises(DiffMambaError, match="integer token ids"):
        with ns.trace(torch.zeros(1, 3)):
            pass
    with pytest.raises(DiffMambaError, match="wraps a HookedMamba"):
        MambaNNsight(torch.nn.Linear(2, 2))
    # one invoke keeps every forward argument
    with ns.trace(ids, return_type="loss"):
        loss = ns.output.save()
    torch.testing.assert_close(loss, model(ids, return_type="loss"))
