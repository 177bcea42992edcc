"""Tests for diffmamba_interp.loading: every checkpoint format, save round trips, transformers parity,
mamba-ssm and upstream Diff-Mamba-2 layouts, bad files, strictness, dtype/device, tokenizers and the
Mamba -> Diff-Mamba conversion. Tiny random models only; nothing is downloaded."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffmamba_interp.config import MambaConfig
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp import load_model, mamba_to_diffmamba
from diffmamba_interp.loading import (
    FORMATS, LoadReport, NonFiniteWeightWarning, detect_format, load_tokenizer, save_pretrained,
)
from diffmamba_interp.loading.mamba_ssm import mamba_ssm_config
from diffmamba_interp.model import HookedMamba

from helpers import perturb_

V = 50  # not a multiple of 8, for the mamba-ssm padding tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and avoids spinning when the CPUs are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ids(batch=2, pos=11, vocab=V, seed=0):
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def assert_close(a, b, rel=1e-4):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() <= rel * scale, float((a - b).abs().max() / scale)


def error(fn, *args, **kwargs) -> str:
    """The message of the DiffMambaError fn raises; checks it is one line."""
    with pytest.raises(DiffMambaError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg, msg
    return msg


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


# -- transformers references ---------------------------------------------------------------------
def hf_mamba(tied=True, seed=0, **kw):
    cfg = transformers.MambaConfig(
        vocab_size=V, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
        tie_word_embeddings=tied, **kw,
    )
    torch.manual_seed(seed)
    return perturb_(transformers.MambaForCausalLM(cfg).eval(), seed=seed)


def hf_mamba2(tied=False, seed=0, **kw):
    kw = {"state_size": 8, "head_dim": 8, "num_heads": 4, "n_groups": 1, "chunk_size": 4, **kw}
    cfg = transformers.Mamba2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, expand=2, conv_kernel=4, tie_word_embeddings=tied, **kw
    )
    torch.manual_seed(seed)
    return perturb_(transformers.Mamba2ForCausalLM(cfg).eval(), seed=seed)


@pytest.fixture(scope="module")
def hf2_dir(tmp_path_factory):
    """A transformers Mamba-2 checkpoint (untied) and its reference model."""
    model = hf_mamba2()
    d = tmp_path_factory.mktemp("hf2")
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def hf1_dir(tmp_path_factory):
    """A transformers Mamba-1 checkpoint (tied) and its reference model."""
    model = hf_mamba()
    d = tmp_path_factory.mktemp("hf1")
    model.save_pretrained(d)
    return d, model


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- our own round trips -------------------------------------------------------------------------
ROUND_TRIPS = [
    ("mamba1", "alternate", True),
    ("mamba1", "alternate", False),
    ("mamba2", "alternate", True),
    ("mamba2", "alternate", False),
    ("diffmamba1", "alternate", True),
    ("diffmamba1", "all", False),
    ("diffmamba1", "quarter", True),
    ("diffmamba2", "alternate", False),
    ("diffmamba2", "all", True),
    ("diffmamba2", "quarter", False),
    ("diffmamba2", [1, 2], True),
    ("diffs6", "alternate", True),
    ("diffs6", "all", False),
    ("diffs6mamba2", "alternate", False),
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """tiny(arch, diff_layers="alternate", tied=True, **config overrides): a 4-layer tiny perturbed model."""
    return lambda arch, diff_layers="alternate", tied=True, **kw: tiny_model(
        arch, n_layers=4, vocab_size=V, d_state=8, d_conv=4, diff_layers=diff_layers, tie_embeddings=tied, **kw)


@pytest.mark.parametrize("arch,diff_layers,tied", ROUND_TRIPS)
def test_round_trip_every_arch(tiny, tmp_path, arch, diff_layers, tied):
    model = tiny(arch, diff_layers, tied)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.training and loaded.load_report.ok and loaded.tokenizer is None
    assert loaded.cfg.arch == arch and loaded.cfg.diff_layer_indices == model.cfg.diff_layer_indices
    assert loaded.cfg.tie_embeddings == tied and (loaded.lm_head.weight is loaded.embed.weight) == tied
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not tied)  # a tied lm_head is written once, as the embedding
    assert all(t.is_contiguous() for t in stored.values())
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    if arch in ("diffmamba1", "diffs6", "diffs6mamba2"):
        assert set(config) == {"diffmamba_interp"} and loaded.load_report.format == "diffmamba-interp"
    else:
        assert config["model_type"] == ("mamba" if arch == "mamba1" else "mamba2")
        assert config.get("diffmamba", False) == (arch == "diffmamba2")
        assert all(k.startswith(("backbone.", "lm_head.")) for k in stored)


def test_round_trip_keeps_sizes_and_finite_time_step_limit(tiny, tmp_path):
    model = tiny("mamba2", n_groups=2, time_step_limit=(0.0, 0.05), expand=2, norm_eps=1e-6)
    model.save_pretrained(tmp_path)  # HookedMamba.save_pretrained delegates here
    loaded = load_model(tmp_path)
    for name in ("d_model", "n_layers", "vocab_size", "d_state", "d_conv", "expand", "head_dim", "n_groups",
                 "chunk_size", "norm_eps", "time_step_limit", "residual_in_fp32"):
        assert getattr(loaded.cfg, name) == getattr(model.cfg, name), name
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_save_overwrites_and_keeps_dtype(tiny, tmp_path):
    save_pretrained(tiny("mamba1"), tmp_path)
    model = tiny("mamba2").to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path, dtype="auto")
    assert loaded.cfg.arch == "mamba2" and loaded.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("arch,tied", [("mamba1", True), ("mamba1", False), ("mamba2", False), ("mamba2", True)])
def test_saved_plain_model_loads_in_transformers(tiny, tmp_path, arch, tied):
    model = tiny(arch, tied=tied)
    save_pretrained(model, tmp_path)
    cls, config_cls = {
        "mamba1": (transformers.MambaForCausalLM, transformers.MambaConfig),
        "mamba2": (transformers.Mamba2ForCausalLM, transformers.Mamba2Config),
    }[arch]
    hf_cfg = config_cls.from_pretrained(tmp_path)
    assert hf_cfg.hidden_size == 16 and hf_cfg.num_hidden_layers == 4 and hf_cfg.tie_word_embeddings == tied
    hf = cls.from_pretrained(tmp_path).eval()
    assert_close(logits(hf, ids()), logits(model, ids()), rel=1e-5)


def test_saved_diffmamba2_config_reads_as_mamba2_config(tiny, tmp_path):
    save_pretrained(tiny("diffmamba2", "alternate"), tmp_path)
    hf_cfg = transformers.Mamba2Config.from_pretrained(tmp_path)
    assert hf_cfg.diffmamba is True and hf_cfg.diffmamba_settings == "alternate"
    assert hf_cfg.architectures == ["DiffMamba2ForCausalLM"] and math.isinf(hf_cfg.time_step_limit[1])


# -- transformers checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("kind,tied", [("mamba", True), ("mamba", False), ("mamba2", False), ("mamba2", True)])
def test_transformers_checkpoint(tmp_path, kind, tied):
    ref = hf_mamba(tied) if kind == "mamba" else hf_mamba2(tied)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.load_report.format == f"transformers-{kind}"
    assert model.cfg.tie_embeddings == tied
    assert_close(logits(model, ids()), logits(ref, ids()))


def test_transformers_mamba2_groups_and_finite_limit(tmp_path):
    ref = hf_mamba2(n_groups=2, time_step_limit=(0.0, 0.05))
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.cfg.n_groups == 2 and model.cfg.time_step_limit == (0.0, 0.05)
    assert_close(logits(model, ids()), logits(ref, ids()))


def test_sharded_safetensors(tmp_path, hf2_dir):
    _, ref = hf2_dir
    ref.save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model = load_model(tmp_path)
    assert len(model.load_report.files) > 1
    assert_close(logits(model, ids()), logits(ref, ids()))


def test_pytorch_bin(tmp_path, hf1_dir):
    src, ref = hf1_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # older transformers' .bin: both tied keys
    model = load_model(tmp_path)
    assert model.load_report.files == [tmp_path / "pytorch_model.bin"]
    assert_close(logits(model, ids()), logits(ref, ids()))


def test_sharded_pytorch_bin(tmp_path, hf2_dir):
    src, ref = hf2_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    state = ref.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / shard)
    write_json(tmp_path / "pytorch_model.bin.index.json", {"weight_map": {k: s for s, ks in shards.items() for k in ks}})
    model = load_model(tmp_path)
    assert_close(logits(model, ids()), logits(ref, ids()))


@pytest.mark.parametrize("spelling", ["object", "bare", "absent"])
def test_time_step_limit_spellings(tmp_path, hf2_dir, spelling):
    src, ref = hf2_dir
    copy_dir(src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    assert config["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # what transformers writes
    if spelling == "bare":
        config["time_step_limit"] = [0.0, math.inf]
    elif spelling == "absent":
        del config["time_step_limit"]
    text = json.dumps(config)
    assert ("Infinity" in text) == (spelling != "absent")
    (tmp_path / "config.json").write_text(text)
    model = load_model(tmp_path)
    assert model.cfg.time_step_limit == (0.0, math.inf)
    assert_close(logits(model, ids()), logits(ref, ids()))


# -- mamba-ssm layout ----------------------------------------------------------------------------
def to_mamba_ssm(tmp_path: Path, ref, config: dict, padded: int) -> None:
    """A mamba-ssm checkpoint from a transformers model: singular embedding key, padded vocab,
    tied lm_head stored beside the embedding (as torch.save of MambaLMHeadModel's state dict)."""
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in ref.state_dict().items()}
    emb = state["backbone.embedding.weight"]
    extra = torch.randn(padded - emb.shape[0], emb.shape[1], generator=torch.Generator().manual_seed(1))
    state["backbone.embedding.weight"] = torch.cat([emb, extra])
    if config.get("tie_embeddings", True):
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    else:
        state["lm_head.weight"] = torch.cat([state["lm_head.weight"], extra * 2])
    torch.save(state, tmp_path / "pytorch_model.bin")
    write_json(tmp_path / "config.json", config)


def test_mamba_ssm_mamba1_empty_ssm_cfg(tmp_path):
    torch.manual_seed(0)
    ref = perturb_(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=V, hidden_size=16, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4)).eval())
    config = {"d_model": 16, "n_layer": 2, "vocab_size": V, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    to_mamba_ssm(tmp_path, ref, config, padded=56)
    model = load_model(tmp_path)
    assert model.load_report.format == "mamba-ssm"
    assert model.cfg.arch == "mamba1" and model.cfg.vocab_size == 56 and model.cfg.d_state == 16
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.embed.weight
    out = logits(model, ids())
    assert out.shape == (2, 11, 56)  # the padded vocabulary is kept
    assert_close(out[..., :V], logits(ref, ids()))


def test_mamba_ssm_mamba2_untied_default_padding(tmp_path):
    ref = hf_mamba2()
    config = {"d_model": 16, "n_layer": 2, "vocab_size": V, "tie_embeddings": False,
              "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4}}
    to_mamba_ssm(tmp_path, ref, config, padded=56)  # pad_vocab_size_multiple absent: 8
    model = load_model(tmp_path)
    assert model.cfg.arch == "mamba2" and model.cfg.vocab_size == 56 and not model.cfg.tie_embeddings
    out = logits(model, ids())
    assert out.shape == (2, 11, 56)
    assert_close(out[..., :V], logits(ref, ids()))


def test_mamba_ssm_config_defaults():
    m1 = mamba_ssm_config({"d_model": 32, "n_layer": 2, "vocab_size": 50277, "ssm_cfg": {}})
    assert (m1.arch, m1.d_state, m1.d_conv, m1.expand, m1.dt_rank, m1.conv_bias, m1.bias) == ("mamba1", 16, 4, 2, 2, True, False)
    assert m1.vocab_size == 50280 and m1.tie_embeddings and m1.pad_vocab_size_multiple == 8
    m2 = mamba_ssm_config({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2"},
                           "pad_vocab_size_multiple": 16})
    assert (m2.arch, m2.head_dim, m2.n_groups, m2.d_state, m2.chunk_size, m2.vocab_size) == ("mamba2", 64, 1, 128, 256, 112)
    assert m2.time_step_limit == (0.0, math.inf)
    with pytest.raises(DiffMambaError, match="LayerNorm"):
        mamba_ssm_config({"d_model": 32, "n_layer": 2, "vocab_size": 8, "rms_norm": False})
    with pytest.raises(DiffMambaError, match="MLP"):
        mamba_ssm_config({"d_model": 32, "n_layer": 2, "vocab_size": 8, "d_intermediate": 64})


# -- the paper's Diff-Mamba-2 layout, written by hand ----------------------------------------------
def test_upstream_diffmamba2_checkpoint(tiny, tmp_path):
    model = tiny("diffmamba2", "alternate", tied=False)
    cfg = model.cfg
    state = {"backbone.embeddings.weight": model.embed.weight, "backbone.norm_f.weight": model.norm_f.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        state[f"backbone.layers.{i}.norm.weight"] = block.norm.weight
        if i % 2 == 0:  # differential layers: mixer_1, mixer_2, lambda_q1, subln
            for m in (1, 2):
                for name, p in getattr(block, f"mixer_{m}").named_parameters():
                    state[f"backbone.layers.{i}.mixer_{m}.{name}"] = p
            state[f"backbone.layers.{i}.lambda_q1"] = block.lambda_q1
            state[f"backbone.layers.{i}.subln.weight"] = block.subln.weight
        else:
            for name, p in block.mixer.named_parameters():
                state[f"backbone.layers.{i}.mixer.{name}"] = p
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["DiffMamba2ForCausalLM"], "model_type": "mamba2", "diffmamba": True,
        "diffmamba_settings": "alternate", "hidden_size": 16, "num_hidden_layers": 4, "vocab_size": V,
        "state_size": cfg.d_state, "expand": 2, "head_dim": 8, "num_heads": 4, "n_groups": 1, "chunk_size": 4,
        "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": True, "tie_word_embeddings": False, "time_step_limit": [0.0, math.inf],
        "rms_norm": True, "norm_before_gate": False, "time_step_rank": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert loaded.load_report.format == "diffmamba2" and loaded.cfg.arch == "diffmamba2"
    assert loaded.cfg.diff_layer_indices == (0, 2)
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


# -- the registry --------------------------------------------------------------------------------
def test_registry_and_detection():
    assert set(FORMATS) == {"transformers-mamba", "transformers-mamba2", "diffmamba2", "mamba-ssm", "diffmamba-interp"}
    assert detect_format({"model_type": "mamba"}) == "transformers-mamba"
    assert detect_format({"model_type": "mamba2"}) == "transformers-mamba2"
    assert detect_format({"model_type": "mamba2", "diffmamba": True}) == "diffmamba2"
    assert detect_format({"d_model": 8, "n_layer": 2, "ssm_cfg": {}}) == "mamba-ssm"
    assert detect_format({"diffmamba_interp": {}}) == "diffmamba-interp"


# -- bad files -----------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    msg = error(load_model, tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "no such directory" in msg


def test_path_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert "is a file" in error(load_model, tmp_path / "model.safetensors")


def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)  # so the id is not a local path
    msg = error(load_model, "nadavsc/diffmamba2-370M")
    assert "nadavsc/diffmamba2-370M: no such directory, and it could not be downloaded" in msg
    assert "huggingface-cli download nadavsc/diffmamba2-370M --local-dir DIR" in msg


def test_no_config(tmp_path):
    msg = error(load_model, tmp_path)
    assert f"{tmp_path}: no config.json" in msg


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "mamba",\n  "hidden_size": 16,,\n}')
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "config.json") in msg and "malformed JSON at line 3 column" in msg


def test_config_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in error(load_model, tmp_path)


def test_unknown_model_type(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "llama", "hidden_size": 16})
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "config.json") in msg and "unknown model_type 'llama'" in msg


def test_unrecognised_config(tmp_path):
    write_json(tmp_path / "config.json", {"foo": 1})
    assert "not a recognised checkpoint config" in error(load_model, tmp_path)


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_config_missing_field(damaged_checkpoint, hf2_dir, drop):
    src, _ = hf2_dir
    bad = damaged_checkpoint(src, "config", fields={drop: None})
    msg = error(load_model, bad)
    assert str(bad / "config.json") in msg and f"lacks the field '{drop}'" in msg


def test_mamba_ssm_config_missing_field(tmp_path):
    write_json(tmp_path / "config.json", {"d_model": 16, "vocab_size": V, "ssm_cfg": {}})
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "config.json") in msg and "lacks the field 'n_layer'" in msg


def test_config_wrong_type(damaged_checkpoint, hf2_dir):
    src, _ = hf2_dir
    bad = damaged_checkpoint(src, "config", fields={"head_dim": "eight"})
    assert str(bad / "config.json") in error(load_model, bad)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(damaged_checkpoint, hf2_dir, damage):
    src, _ = hf2_dir
    if damage == "truncated":
        bad = damaged_checkpoint(src, "truncate")
    else:
        bad = damaged_checkpoint(src, "write", name="model.safetensors", data={"garbage": b"not a safetensors file" * 4, "empty": b""}[damage])
    msg = error(load_model, bad)
    assert str(bad / "model.safetensors") in msg and "not a valid safetensors file" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_bin(tmp_path, hf1_dir, damage):
    src, ref = hf1_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "good.bin")
    data = (tmp_path / "good.bin").read_bytes()
    blob = {"truncated": data[: len(data) // 2], "garbage": b"hello world" * 10, "empty": b""}[damage]
    (tmp_path / "pytorch_model.bin").write_bytes(blob)
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "pytorch_model.bin") in msg and "not a readable PyTorch weights file" in msg


class _NotATensor:
    pass


def test_bin_with_pickled_objects_is_refused(tmp_path, hf1_dir):
    src, _ = hf1_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save({"backbone.norm_f.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "pytorch_model.bin") in msg and "weights_only=True" in msg


def test_shapes_do_not_match_config(tmp_path, hf2_dir):
    src, _ = hf2_dir
    copy_dir(src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["state_size"] = 16  # the weights were written with 8
    write_json(tmp_path / "config.json", config)
    msg = error(load_model, tmp_path)
    assert str(tmp_path / "model.safetensors") in msg and "shape mismatches" in msg
    assert "backbone.layers.0.mixer.in_proj.weight [84, 16] in checkpoint vs [100, 16] in model" in msg
    assert "… and 3 more" in msg  # in_proj, conv1d weight and bias, in 2 layers: 6, 3 shown


def test_config_without_weights(tmp_path, hf2_dir):
    src, _ = hf2_dir
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "weights.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    msg = error(load_model, tmp_path)
    assert f"{tmp_path}: has config.json but no weights" in msg and "weights.safetensors" in msg


def test_sharded_index_names_a_missing_shard(tmp_path, hf2_dir):
    _, ref = hf2_dir
    ref.save_pretrained(tmp_path, max_shard_size="8KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    msg = error(load_model, tmp_path)
    assert "model.safetensors.index.json" in msg and shard.name in msg and "missing" in msg


def test_non_finite_weights_refused_or_warned(tmp_path, hf2_dir):
    src, _ = hf2_dir
    copy_dir(src, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["backbone.layers.1.mixer.D"][0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    msg = error(load_model, tmp_path)
    assert "model.safetensors: tensor backbone.layers.1.mixer.D has non-finite values (1 NaN, 0 Inf)" in msg
    with pytest.warns(NonFiniteWeightWarning, match=r"model\.safetensors: tensor backbone\.layers\.1\.mixer\.D has non-finite"):
        load_model(tmp_path, non_finite="warn")


# -- strictness ----------------------------------------------------------------------------------
def test_strict_and_non_strict(tmp_path, hf2_dir, caplog):
    src, ref = hf2_dir
    copy_dir(src, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["backbone.layers.1.mixer.D"]
    state["backbone.layers.1.mixer.extra_bias"] = torch.zeros(3)
    state["something.else"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    msg = error(load_model, tmp_path)
    assert "1 missing keys (backbone.layers.1.mixer.D)" in msg
    assert "2 unexpected keys (something.else, backbone.layers.1.mixer.extra_bias)" in msg
    assert "strict=False" in msg

    with caplog.at_level(logging.WARNING, logger="diffmamba_interp.loading"):
        model = load_model(tmp_path, strict=False)
    assert "strict=False" in caplog.text and "backbone.layers.1.mixer.D" in caplog.text
    report = model.load_report
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["backbone.layers.1.mixer.D"]
    assert sorted(report.unexpected) == ["backbone.layers.1.mixer.extra_bias", "something.else"]
    assert set(report.skipped) == {"backbone.layers.1.mixer.D", "backbone.layers.1.mixer.extra_bias", "something.else"}
    assert torch.equal(model.blocks[1].mixer.D, torch.ones(4))  # left at init
    assert torch.equal(model.blocks[1].mixer.A_log, ref.backbone.layers[1].mixer.A_log)  # the rest loaded


def test_strict_truncates_long_key_lists(tmp_path, hf2_dir):
    src, _ = hf2_dir
    copy_dir(src, tmp_path)
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.startswith("backbone.layers.0.")}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    msg = error(load_model, tmp_path)
    assert "9 missing keys" in msg and "… and 6 more" in msg
    assert load_model(tmp_path, strict=False).load_report.missing[0].startswith("backbone.layers.0.")


def test_tied_config_with_different_lm_head_loads_untied(tmp_path, hf1_dir):
    src, ref = hf1_dir
    copy_dir(src, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    state["lm_head.weight"] = state["backbone.embeddings.weight"] * 2
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="differs"):
        model = load_model(tmp_path)
    assert model.load_report.untied_lm_head and not model.cfg.tie_embeddings
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


# -- dtype and device ----------------------------------------------------------------------------
def test_dtype_and_device(hf2_dir):
    src, ref = hf2_dir
    model = load_model(src, device="cpu", dtype=torch.bfloat16)
    assert model.device == torch.device("cpu") and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_close(logits(model, ids()), logits(ref, ids()), rel=5e-2)
    assert load_model(src, dtype="float64").dtype == torch.float64
    assert load_model(src).dtype == torch.float32
    assert load_model(src, dtype="auto").dtype == torch.float32  # as stored
    assert "unknown dtype" in error(load_model, src, dtype="int8")
    assert "invalid device" in error(load_model, src, device="nonsense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device(hf2_dir):
    src, ref = hf2_dir
    model = load_model(src, device="cuda")
    assert model.device.type == "cuda"
    assert_close(logits(model, ids().cuda()).cpu(), logits(ref, ids()))


# -- tokenizers ----------------------------------------------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "the", "cat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("arch", ["mamba2", "diffs6"])
def test_tokenizer_saved_and_loaded(tiny, tmp_path, arch):
    model = tiny(arch)
    model.tokenizer = tiny_tokenizer()
    save_pretrained(model, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_model(tmp_path)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("hello the cat dog", add_special_tokens=False) == [1, 3, 4, 0]
    assert load_tokenizer(tmp_path).encode("world", add_special_tokens=False) == [2]


def test_load_tokenizer_without_files(tiny, tmp_path):
    save_pretrained(tiny("mamba1"), tmp_path)
    msg = error(load_tokenizer, tmp_path)
    assert f"{tmp_path}: no tokenizer files" in msg


def test_broken_tokenizer_files(tiny, tmp_path):
    save_pretrained(tiny("mamba1"), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    assert "the tokenizer files cannot be loaded" in error(load_tokenizer, tmp_path)
    with pytest.warns(UserWarning, match="without its tokenizer"):
        assert load_model(tmp_path).tokenizer is None


# -- Mamba -> Diff-Mamba -------------------------------------------------------------------------
def test_mamba2_to_diffmamba2_alternate(tiny):
    src = tiny("mamba2")  # d 16, E 32, H 4, P 8, G 1, N 8: in_proj [2*32 + 2*8 + 4 = 84, 16]
    new = mamba_to_diffmamba(src, "alternate")
    assert new.cfg.arch == "diffmamba2" and new.cfg.diff_layer_indices == (0, 2) and not new.training
    assert torch.equal(new.embed.weight, src.embed.weight) and torch.equal(new.norm_f.weight, src.norm_f.weight)
    for i in (1, 3):  # plain layers: copied unchanged
        for (name, p), (_, q) in zip(new.blocks[i].named_parameters(), src.blocks[i].named_parameters()):
            assert torch.equal(p, q), name
    blk, old = new.blocks[0], src.blocks[0].mixer
    assert torch.equal(blk.norm.weight, src.blocks[0].norm.weight)
    m1, m2 = blk.mixer_1, blk.mixer_2
    # halved mixer: E' = 16, same H = 4: in_proj [2*16 + 2*8 + 4 = 52, 16]; conv channels 16 + 16 = 32
    assert m1.in_proj.weight.shape == (52, 16) and m1.conv1d.weight.shape == (32, 1, 4)
    assert m1.out_proj.weight.shape == (16, 16) and m1.norm.weight.shape == (16,)
    assert torch.equal(m1.in_proj.weight, old.in_proj.weight[:52]) and torch.equal(m2.in_proj.weight, old.in_proj.weight[-52:])
    assert torch.equal(m1.conv1d.weight, old.conv1d.weight[:32]) and torch.equal(m2.conv1d.weight, old.conv1d.weight[-32:])
    assert torch.equal(m1.conv1d.bias, old.conv1d.bias[:32]) and torch.equal(m2.conv1d.bias, old.conv1d.bias[-32:])
    assert torch.equal(m1.out_proj.weight, old.out_proj.weight[:, :16])
    assert torch.equal(m2.out_proj.weight, old.out_proj.weight[:, -16:])
    assert torch.equal(m1.norm.weight, old.norm.weight[:16]) and torch.equal(m2.norm.weight, old.norm.weight[-16:])
    for name in ("dt_bias", "A_log", "D"):  # equal shape [H]: copied to both
        assert torch.equal(getattr(m1, name), getattr(old, name)) and torch.equal(getattr(m2, name), getattr(old, name))
    assert torch.equal(blk.subln.weight, torch.ones(16)) and blk.lambda_q1.shape == (16,)
    # lambda_q1 as upstream initialises it: randn(d), std 1 (not 0.1)
    lam = torch.cat([mamba_to_diffmamba(src, "all").blocks[i].lambda_q1.detach() for i in range(4) for _ in range(8)])
    assert 0.7 < float(lam.std()) < 1.3
    out = logits(new, ids())
    assert out.shape == (2, 11, V) and torch.isfinite(out).all()


def test_mamba1_to_diffmamba1_all(tiny):
    src = tiny("mamba1", tied=False)  # d 16, E 32, N 8, R 1
    new = mamba_to_diffmamba(src, "all")
    assert new.cfg.arch == "diffmamba1" and new.cfg.diff_layer_indices == (0, 1, 2, 3)
    assert torch.equal(new.lm_head.weight, src.lm_head.weight)
    old, m1, m2 = src.blocks[2].mixer, new.blocks[2].mixer_1, new.blocks[2].mixer_2
    assert m1.in_proj.weight.shape == (32, 16)
    rows = {"in_proj.weight": 32, "conv1d.weight": 16, "conv1d.bias": 16, "dt_proj.weight": 16, "dt_proj.bias": 16,
            "A_log": 16, "D": 16}
    for name, n in rows.items():  # per-channel tensors: E halved, first / last rows or entries
        a, b, full = m1.get_parameter(name), m2.get_parameter(name), old.get_parameter(name)
        assert torch.equal(a, full[:n]) and torch.equal(b, full[-n:]), name
    assert torch.equal(m1.x_proj.weight, old.x_proj.weight[:, :16]) and torch.equal(m2.x_proj.weight, old.x_proj.weight[:, -16:])
    assert torch.equal(m1.out_proj.weight, old.out_proj.weight[:, :16]) and torch.equal(m2.out_proj.weight, old.out_proj.weight[:, -16:])
    assert torch.isfinite(logits(new, ids())).all()


def test_converted_model_saves_and_loads(tiny, tmp_path):
    new = mamba_to_diffmamba(tiny("mamba2"), "quarter")
    assert new.cfg.diff_layer_indices == (3,)
    save_pretrained(new, tmp_path)
    assert torch.equal(logits(load_model(tmp_path), ids()), logits(new, ids()))


def test_conversion_errors(tiny):
    assert "mamba1 or mamba2" in error(mamba_to_diffmamba, tiny("diffmamba2"))
    assert "unknown diff setting" in error(mamba_to_diffmamba, tiny("mamba2"), "half")
