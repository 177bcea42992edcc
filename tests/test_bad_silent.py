"""Bad input, category "silent wrong results" (issue 17): values that used to load or run and give a
wrong answer with exit 0 are now one-line errors naming the field, the tensor or the word."""

import math

import pytest
import torch

from diffmamba_interp import MambaConfig, load_model
from diffmamba_interp.analysis.snr import target_probs
from helpers import one_line_error

PROMPT = "Mary went to the kitchen. John moved to the garden. Where is Mary? Answer:"


@pytest.fixture(scope="module")
def ckpts(tiny_model, tokenizer, tmp_path_factory):
    """A saved tiny mamba2 (transformers layout), diffmamba2 (upstream layout) and diffmamba1 (our
    marker format), each with the bAbI tokenizer."""
    root = tmp_path_factory.mktemp("silent")
    out = {}
    for arch in ("mamba2", "diffmamba2", "diffmamba1"):
        model = tiny_model(arch, vocab_size=len(tokenizer))
        model.tokenizer = tokenizer
        model.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.mark.parametrize("arch, fields, field", [
    ("mamba2", {"diffmamba": "false"}, "'diffmamba'"),
    ("mamba2", {"use_bias": "false"}, "'use_bias'"),
    ("mamba2", {"tie_word_embeddings": "true"}, "'tie_word_embeddings'"),
    ("mamba2", {"residual_in_fp32": 1}, "'residual_in_fp32'"),
    ("mamba2", {"num_hidden_layers": True}, "'num_hidden_layers'"),
    ("mamba2", {"hidden_size": 16.7}, "'hidden_size'"),
    ("mamba2", {"state_size": 4.5}, "'state_size'"),
    ("mamba2", {"vocab_size": -3}, "'vocab_size'"),
    ("mamba2", {"layer_norm_epsilon": float("nan")}, "'layer_norm_epsilon'"),
    ("mamba2", {"layer_norm_epsilon": -1e-5}, "'layer_norm_epsilon'"),
    ("mamba2", {"layer_norm_epsilon": 0}, "'layer_norm_epsilon'"),
    ("mamba2", {"time_step_limit": [5.0, 1.0]}, "'time_step_limit'"),
    ("mamba2", {"time_step_limit": [-1.0, 1.0]}, "'time_step_limit'"),
    ("mamba2", {"time_step_limit": [float("nan"), 1.0]}, "'time_step_limit'"),
    ("diffmamba2", {"diffmamba_settings": 3}, "'diffmamba_settings'"),
    ("diffmamba2", {"diffmamba_settings": [0, True]}, "'diffmamba_settings'"),
])
def test_config_values_that_used_to_load(damaged_checkpoint, ckpts, arch, fields, field):
    bad = damaged_checkpoint(ckpts[arch], "config", fields=fields)
    msg = one_line_error(load_model, bad)
    assert str(bad / "config.json") in msg and field in msg


@pytest.mark.parametrize("key, value", [
    ("tie_embeddings", "false"), ("n_layers", True), ("d_model", 16.5), ("norm_eps", float("nan")),
    ("time_step_limit", [2.0, 1.0]), ("diff_layers", {"a": 1}),
])
def test_our_format_config_values(damaged_checkpoint, ckpts, key, value):
    import json

    config = json.loads((ckpts["diffmamba1"] / "config.json").read_text())
    config["diffmamba_interp"]["config"][key] = value
    bad = damaged_checkpoint(ckpts["diffmamba1"], "config_text", text=json.dumps(config))
    msg = one_line_error(load_model, bad)
    assert f"diffmamba_interp.config.{key}" in msg


def test_whole_floats_still_read_as_integers(damaged_checkpoint, ckpts):
    """JSON has one number type: 16.0 is 16 (transformers' tokenizer loader, which reads config.json too,
    refuses it, so the model then loads without its tokenizer, with a warning saying so)."""
    bad = damaged_checkpoint(ckpts["mamba2"], "config", fields={"hidden_size": 16.0, "num_hidden_layers": 2.0})
    with pytest.warns(UserWarning, match="without its tokenizer"):
        model = load_model(bad)
    assert model.cfg.d_model == 16 and model.cfg.n_layers == 2 and type(model.cfg.d_model) is int


@pytest.mark.parametrize("kw, needle", [
    (dict(d_model=64.7), "d_model"), (dict(n_layers=True), "n_layers"), (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(norm_eps=-1.0), "norm_eps"), (dict(time_step_limit=(1.0, 0.5)), "time_step_limit"),
    (dict(conv_bias="false"), "conv_bias"), (dict(tie_embeddings=0), "tie_embeddings"),
    (dict(arch="diffmamba2", diff_layers={"a": 1}), "diff_layers"), (dict(arch="diffmamba2", diff_layers=[0, 0]), "twice"),
    (dict(dt_rank="big"), "dt_rank"), (dict(arch=["mamba2"]), "arch"),
])
def test_mamba_config_validates_every_field(kw, needle):
    assert needle in one_line_error(MambaConfig, **{"d_model": 16, "n_layers": 2, "vocab_size": 40, "head_dim": 8, **kw})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(damaged_checkpoint, ckpts, value):
    def poison(state):
        key = sorted(k for k in state if k.endswith("mixer.D"))[0]
        state[key][0] = value
        return state

    bad = damaged_checkpoint(ckpts["mamba2"], "tensors", edit=poison)
    msg = one_line_error(load_model, bad)
    assert "model.safetensors: tensor backbone.layers.0.mixer.D has non-finite values" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(damaged_checkpoint, ckpts, dtype):
    def cast(state):
        state["backbone.norm_f.weight"] = state["backbone.norm_f.weight"].to(dtype)
        return state

    bad = damaged_checkpoint(ckpts["mamba2"], "tensors", edit=cast)
    msg = one_line_error(load_model, bad)
    assert "backbone.norm_f.weight" in msg and str(dtype).removeprefix("torch.") in msg and "floating point" in msg


def test_nan_log_probs_raise_instead_of_ranking_first(tiny_model, tokenizer):
    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    with torch.no_grad():
        model.norm_f.weight.fill_(float("nan"))
    msg = one_line_error(target_probs, model, [PROMPT], ["kitchen"], progress=False)
    assert "NaN" in msg


def test_answer_or_candidate_outside_the_vocabulary(tiny_model, tokenizer):
    model = tiny_model("mamba2", vocab_size=len(tokenizer), shared=True)
    model.tokenizer = tokenizer
    msg = one_line_error(target_probs, model, [PROMPT], ["kitchenette"], progress=False)
    assert "'kitchenette' is not in the tokenizer's vocabulary" in msg and "<unk>" in msg
    msg = one_line_error(target_probs, model, [PROMPT], ["kitchen"], candidates=[["garden", "zzyzx"]], progress=False)
    assert "candidate 'zzyzx'" in msg
    df = target_probs(model, [PROMPT], ["kitchen"], candidates=[["garden"]], progress=False)
    assert df["prob"].between(0, 1).all() and not df["distractor_ratio"].isna().any()


def test_report_example_beyond_the_data_is_refused(tiny_model, tokenizer, monkeypatch):
    from diffmamba_interp import jobs

    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    model.tokenizer, model.label = tokenizer, "tiny"
    monkeypatch.setattr(jobs, "load_models", lambda ckpts: [model])
    msg = one_line_error(jobs.full_report, ["x"], "babi:qa1", 2, example=5, out="unused.html", progress=False)
    assert "example 5 is out of range" in msg and "2 examples" in msg


def test_n_above_the_data_is_an_error():
    from diffmamba_interp.data import load_data

    assert "n=5000 but" in one_line_error(load_data, "babi:qa1", n=5000)


def test_time_step_limit_infinity_still_reads(damaged_checkpoint, ckpts):
    bad = damaged_checkpoint(ckpts["mamba2"], "config", fields={"time_step_limit": [0.0, {"__float__": "Infinity"}]})
    assert load_model(bad).cfg.time_step_limit == (0.0, math.inf)
