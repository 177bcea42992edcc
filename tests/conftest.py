"""Shared test fixtures: one builder of tiny random models, one helper that damages a checkpoint, the
bAbI tokenizer. Test modules take these as fixtures (never import from each other)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import perturb_

# `make test` runs two pytest workers on two cores: one torch thread each (tiny ops are far slower
# with two threads competing for a busy core)
torch.set_num_threads(1)

# the sizes of a tiny model; every test that needs other sizes passes them as overrides
TINY = dict(d_model=16, n_layers=2, vocab_size=40, d_state=4, head_dim=8, chunk_size=4, d_conv=3)


@pytest.fixture(scope="session")
def perturb():
    """`perturb(model, seed=0, scale=0.1)`: every parameter moved off its init (for transformers models too)."""
    return perturb_


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: `tiny_model(arch="mamba2", *, seed=0, dtype=torch.float32, shared=False, perturb=True, **overrides)`
    -> a HookedMamba of the TINY sizes (overridden by `overrides`, any MambaConfig field), in eval mode,
    built after `torch.manual_seed(seed)` and with every parameter moved off its init.
    shared=True returns one cached model per argument set, for tests that only read it."""
    from diffmamba_interp import HookedMamba, MambaConfig

    cache = {}

    def make(arch="mamba2", *, seed=0, dtype=torch.float32, shared=False, perturb=True, **overrides):
        key = repr((arch, seed, dtype, perturb, sorted(overrides.items())))
        if shared and key in cache:
            return cache[key]
        torch.manual_seed(seed)
        model = HookedMamba(MambaConfig(arch=arch, **{**TINY, **overrides}))
        if perturb:
            perturb_(model, seed=seed)
        model = model.to(dtype).eval()
        if shared:
            cache[key] = model
        return model

    return make


@pytest.fixture
def damaged_checkpoint(tmp_path):
    """Factory: `damaged_checkpoint(src, how, **kw)` -> a damaged copy of checkpoint directory `src`.

    how: "truncate" (the weight file cut to `keep` bytes, default half), "config" (config.json fields
    replaced by `fields`, a dict; a value None deletes the field), "config_text" (config.json
    replaced by `text`), "remove" (the file `name` deleted), "write" (the file `name` written with
    `data`, bytes or str), "tensors" (model.safetensors rewritten with `edit(state) -> state`, a
    function of the stored state dict), "symlink" (the file `name` replaced by a symlink to `target`;
    default `name` itself: a symlink loop), "mkdir" (the file `name` replaced by an empty directory).
    """
    count = [0]

    def damage(src, how: str, **kw) -> Path:
        count[0] += 1
        dst = tmp_path / f"damaged-{count[0]}"
        shutil.copytree(src, dst)
        if how == "truncate":
            weights = next(p for p in sorted(dst.iterdir()) if p.suffix in (".safetensors", ".bin"))
            data = weights.read_bytes()
            weights.write_bytes(data[: kw.get("keep", len(data) // 2)])
        elif how == "config":
            config = json.loads((dst / "config.json").read_text())
            for key, value in kw["fields"].items():
                if value is None:
                    config.pop(key, None)
                else:
                    config[key] = value
            (dst / "config.json").write_text(json.dumps(config))
        elif how == "config_text":
            (dst / "config.json").write_text(kw["text"])
        elif how == "remove":
            (dst / kw["name"]).unlink()
        elif how == "write":
            data = kw["data"]
            target = dst / kw["name"]
            target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
        elif how == "tensors":
            from safetensors.torch import load_file, save_file

            weights = dst / "model.safetensors"
            save_file(kw["edit"](load_file(str(weights))), str(weights), metadata={"format": "pt"})
        elif how in ("symlink", "mkdir"):
            target = dst / kw["name"]
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            if how == "mkdir":
                target.mkdir()
            else:
                os.symlink(kw.get("target", kw["name"]), target)
        else:
            raise ValueError(f"unknown damage {how!r}")
        return dst

    return damage


@pytest.fixture(scope="session")
def tokenizer():
    """The word-level bAbI tokenizer the shipped models use."""
    from diffmamba_interp.data import build_babi_tokenizer

    return build_babi_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tokenizer, tmp_path_factory):
    """A saved tiny mamba2 checkpoint with the bAbI tokenizer (read-only: damage copies of it)."""
    model = tiny_model("mamba2", vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("checkpoint") / "mamba2"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair_checkpoints(tiny_model, tokenizer, tmp_path_factory):
    """Saved tiny mamba2 and diffmamba2 checkpoints (seeds 0 and 1) with the bAbI tokenizer, as paths
    (read-only)."""
    root = tmp_path_factory.mktemp("pair-checkpoints")
    paths = []
    for k, arch in enumerate(["mamba2", "diffmamba2"]):
        model = tiny_model(arch, seed=k, vocab_size=len(tokenizer))
        model.tokenizer = tokenizer
        model.save_pretrained(root / f"{arch}-tiny")
        paths.append(str(root / f"{arch}-tiny"))
    return paths


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
