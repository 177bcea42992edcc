"""The TransformerLens ActivationCache of run_with_cache, the config fields TL's helpers read, and the
token conveniences (issue 16)."""

import numpy as np
import pytest
import torch
from transformer_lens import ActivationCache, patching

from diffmamba_interp import load_model
from diffmamba_interp.errors import DiffMambaError
from helpers import hand_patch_loop

ARCHS = ["mamba1", "mamba2", "diffmamba1", "diffmamba2", "diffs6", "diffs6mamba2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_decompose_resid_sums_to_the_residual_and_logit_attrs_to_the_logit_difference(tiny_model, arch):
    model = tiny_model(arch, diff_layers="all", n_layers=3, shared=True)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(ids)
    assert isinstance(cache, ActivationCache)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert stack.shape == (len(labels), 2, 7, model.cfg.d_model)
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], atol=1e-5, rtol=0)
    if arch in ("diffmamba1", "diffmamba2"):  # both branches named, remainder only rounding
        assert "0_mixer_1" in labels and "0_-λ·mixer_2" in labels
        rest = stack[labels.index("0_subln_remainder")]
        assert rest.abs().max() < 1e-5 < stack[labels.index("0_mixer_1")].abs().max()
    else:
        assert labels == ["embed", "0_mixer_out", "1_mixer_out", "2_mixer_out"]
    # the residual into block 1: embed + block 0
    torch.testing.assert_close(cache.decompose_resid(layer=1).sum(0), cache["resid_pre", 1], atol=1e-5, rtol=0)
    attrs = cache.logit_attrs(stack, tokens=torch.tensor([3, 5]), incorrect_tokens=torch.tensor([7, 9]))
    want = logits[torch.arange(2), :, [3, 5]] - logits[torch.arange(2), :, [7, 9]]  # [batch, pos]
    torch.testing.assert_close(attrs.sum(0), want, atol=1e-4, rtol=0)


def test_accumulated_resid_and_logit_lens(tiny_model):
    model = tiny_model("diffmamba2", shared=True)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(ids)
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    torch.testing.assert_close(resid[0], cache["hook_embed"])
    lens = cache.logit_lens()
    assert lens.shape == (3, 1, 6, 40)
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens[0], model.unembed(cache["hook_embed"]), atol=1e-5, rtol=0)
    # apply_ln_to_stack at the final layer uses norm_f's cached scale: the final term gives the logits
    final = cache.apply_ln_to_stack(resid[-1:])[0] @ model.W_U
    torch.testing.assert_close(final, logits, atol=1e-5, rtol=0)
    with pytest.raises(DiffMambaError, match="no MLP"):
        cache.accumulated_resid(incl_mid=True)
    with pytest.raises(DiffMambaError, match="no attention heads"):
        cache.stack_head_results()


def test_shorthands_to_and_remove_batch_dim(tiny_model):
    model = tiny_model("mamba2", shared=True)
    _, cache = model.run_with_cache(torch.randint(0, 40, (1, 5)))
    assert cache["resid_post", 0] is cache["blocks.0.hook_resid_post"]
    assert cache["resid_pre", -1] is cache["blocks.1.hook_resid_pre"]
    assert cache["mixer_out", 1] is cache["blocks.1.hook_mixer_out"]
    assert cache["scale"] is cache["norm_f.hook_scale"]  # TL's ln_final.hook_scale
    assert "blocks.0.hook_resid_pre" in cache and cache.get("nope") is None
    assert cache.stack_activation("mixer_out").shape == (2, 1, 5, 16)
    with pytest.raises(KeyError, match="hook_ssm_state is cached only"):
        cache["blocks.0.mixer.hook_ssm_state"]
    assert cache.to("cpu") is cache
    cache.remove_batch_dim()
    assert cache["resid_pre", 0].shape == (5, 16)
    assert cache.decompose_resid().shape == (3, 5, 16)
    _, plain = model.run_with_cache(torch.randint(0, 40, (1, 5)), return_cache_object=False)
    assert type(plain) is dict


def test_transformer_lens_patching_runs_unchanged_and_matches_a_hand_written_loop(tiny_model):
    model = tiny_model("diffmamba2", diff_layers="all", dtype=torch.float64, shared=True)
    assert model.cfg.device == torch.device("cpu") and model.cfg.d_vocab == 40 and model.cfg.attn_only is False
    g = torch.Generator().manual_seed(2)
    clean, corrupt = torch.randint(0, 40, (1, 6), generator=g), torch.randint(0, 40, (1, 6), generator=g)
    _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: logits[0, -1, 3] - logits[0, -1, 4]  # noqa: E731
    got = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    want = torch.tensor(np.stack([hand_patch_loop(model, clean, corrupt, f"blocks.{layer}.hook_resid_pre",
                                                  lambda last: last[:, 3] - last[:, 4]) for layer in range(2)]))
    torch.testing.assert_close(got.to(want.dtype), want)
    assert want.std() > 0


def test_config_device_and_dtype_follow_the_model(tiny_model):
    model = tiny_model("mamba1")
    assert model.cfg.dtype == torch.float32
    model.to(torch.float64)
    assert model.cfg.dtype == torch.float64 and model.cfg.device == torch.device("cpu")
    assert "device" not in model.cfg.to_dict() and "attn_only" not in model.cfg.to_dict()  # never saved


@pytest.fixture(scope="module")
def shipped():
    return load_model("models/mamba2-babi")


def test_to_tokens_pads_right_and_returns_lengths(shipped):
    ids, lengths = shipped.to_tokens(["Mary went to the kitchen .", "John moved ."], return_lengths=True)
    n0, n1 = (len(shipped.tokenizer(t)["input_ids"]) for t in ("Mary went to the kitchen .", "John moved ."))
    assert lengths.tolist() == [n0, n1] and ids.shape == (2, n0) and n1 < n0
    assert (ids[1, n1:] == shipped.pad_token_id).all()
    one = shipped.to_tokens("John moved .")
    assert torch.equal(ids[1, :n1], one[0])
    # each row read at its own last position equals that text alone (causal model, right padding)
    logits = shipped(ids)
    torch.testing.assert_close(logits[1, n1 - 1], shipped(one)[0, -1], atol=1e-5, rtol=0)
    assert shipped.to_string(one[0]) == "John moved ."
    assert shipped.to_string(ids)[0] == "Mary went to the kitchen ."
    # forward takes a text (TransformerLens's model(text)); texts of several lengths are refused
    torch.testing.assert_close(shipped("John moved ."), shipped(one))
    with pytest.raises(DiffMambaError, match="different token lengths"):
        shipped(["Mary went to the kitchen .", "John moved ."])


def test_single_tokens_and_residual_directions(shipped):
    t = shipped.to_single_token(" kitchen")  # as TransformerLens: the exact string (a word in a prompt has its space)
    assert shipped.to_str_tokens(torch.tensor([t])) == [" kitchen"]
    with pytest.raises(DiffMambaError, match="2 tokens"):
        shipped.to_single_token(" the kitchen")
    with pytest.raises(DiffMambaError, match="tokens, not one"):
        shipped.to_single_token(" zeppelin")  # byte-level BPE: no unknown token, several pieces instead
    d = shipped.tokens_to_residual_directions(" kitchen")
    assert d.shape == (shipped.cfg.d_model,)
    torch.testing.assert_close(shipped.tokens_to_residual_directions(torch.tensor([[t]]))[0, 0], d)
    x = torch.randn(4, shipped.cfg.d_model)
    s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + shipped.cfg.norm_eps)
    torch.testing.assert_close((x * s) @ d, shipped.unembed(x)[:, t], atol=1e-5, rtol=0)
    assert shipped.W_E.shape == (shipped.cfg.vocab_size, shipped.cfg.d_model)
    with pytest.raises(DiffMambaError, match="out of range"):
        shipped.tokens_to_residual_directions(torch.tensor([10_000]))


def test_analyses_take_a_right_padded_batch_with_lengths(shipped):
    from diffmamba_interp import branch_lens, logit_lens, target_probs

    texts = ["Mary went to the kitchen . Where is Mary ?", "John moved . Where is John ?"]
    ids, lengths = shipped.to_tokens(texts, return_lengths=True)
    assert lengths[1] < ids.shape[1]
    lp = logit_lens(shipped, ids, lengths=lengths)
    for r, t in enumerate(texts):  # each row at its own last token == that text alone
        torch.testing.assert_close(lp[:, r, 0], logit_lens(shipped, shipped.to_tokens(t), positions=[-1])[:, 0, 0],
                                   atol=1e-5, rtol=0)
    second = logit_lens(shipped, ids, lengths=lengths, positions=-2)
    torch.testing.assert_close(second[:, 1, 0], logit_lens(shipped, shipped.to_tokens(texts[1]), positions=[-2])[:, 0, 0],
                               atol=1e-5, rtol=0)
    df = target_probs(shipped, ids, ["kitchen", "hallway"], lengths=lengths, progress=False)
    alone = target_probs(shipped, texts, ["kitchen", "hallway"], progress=False)
    assert np.allclose(df["prob"], alone["prob"], atol=1e-6)
    b = branch_lens(shipped, ids, ["kitchen", "hallway"], lengths=lengths, progress=False)
    b_alone = branch_lens(shipped, texts, ["kitchen", "hallway"], progress=False)
    assert np.allclose(b["value"], b_alone["value"], atol=1e-5)
    with pytest.raises(DiffMambaError, match="one length in 1"):
        logit_lens(shipped, ids, lengths=[3])
    with pytest.raises(DiffMambaError, match="out of range for row 1"):
        logit_lens(shipped, ids, lengths=lengths, positions=-int(lengths[1]) - 1)
