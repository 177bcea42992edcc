"""Bad input, category "where it reads" (issue 17): a missing local path or a symlink loop is never
sent to the Hugging Face hub (an argument is a hub id only when it looks like "owner/name" and no
local path of that name, or of its owner part, exists), and a sharded index may only name shard
files inside its own directory."""

import json
import os

import pytest

from diffmamba_interp import load_model
from diffmamba_interp.loading import resolve_path
from helpers import one_line_error


@pytest.fixture
def hub_calls(monkeypatch):
    """Every call to huggingface_hub.snapshot_download, recorded; each fails as if offline."""
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append(repo_id)
        raise OSError("offline (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("reads") / "mamba2"
    tiny_model("mamba2").save_pretrained(path)
    return path


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for arg in ["out/t6", "./t6", "t6", str(tmp_path / "out" / "t6"), "../nope/x", "~/surely-not-here/x", "a/b/c"]:
        msg = one_line_error(resolve_path, arg)
        assert "no such directory" in msg, msg
    assert hub_calls == []


def test_a_path_object_is_never_a_hub_id(tmp_path, monkeypatch, hub_calls):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    assert "no such directory" in one_line_error(resolve_path, Path("owner/name"))
    assert hub_calls == []


def test_an_owner_name_with_no_local_path_goes_to_the_hub(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(load_model, "nadavsc/diffmamba2-370M")
    assert hub_calls == ["nadavsc/diffmamba2-370M"]
    assert msg.startswith("nadavsc/diffmamba2-370M: no such directory, and it could not be downloaded")


def test_symlink_loop_is_named_and_not_sent_to_the_hub(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.makedirs("owner")
    os.symlink("name", "owner/name")
    for arg in ["loop", "owner/name"]:
        assert "symlink loop" in one_line_error(load_model, arg)
    os.symlink("nowhere", "dangling")
    assert "broken symlink" in one_line_error(load_model, "dangling")
    assert hub_calls == []


def test_a_file_is_not_a_checkpoint_directory(ckpt, hub_calls):
    assert "is a file" in one_line_error(load_model, ckpt / "config.json")
    assert hub_calls == []


def sharded(damaged_checkpoint, ckpt, weight_map):
    """A copy of ckpt whose weights are the shard model-00001-of-00001.safetensors named by an index
    with the given weight_map (a function of the tensor names)."""
    from safetensors.torch import load_file

    names = sorted(load_file(str(ckpt / "model.safetensors")))
    step = damaged_checkpoint(ckpt, "write", name="model-00001-of-00001.safetensors",
                              data=(ckpt / "model.safetensors").read_bytes())
    step = damaged_checkpoint(step, "remove", name="model.safetensors")
    index = {"metadata": {}, "weight_map": weight_map(names)}
    return damaged_checkpoint(step, "write", name="model.safetensors.index.json", data=json.dumps(index))


def test_a_good_sharded_index_loads(damaged_checkpoint, ckpt):
    good = sharded(damaged_checkpoint, ckpt, lambda names: {n: "model-00001-of-00001.safetensors" for n in names})
    assert load_model(good).load_report.files == [good / "model-00001-of-00001.safetensors"]


@pytest.mark.parametrize("shard", [
    "/etc/passwd", "../model-00001-of-00001.safetensors", "sub/../../x.safetensors", "~/x.safetensors",
    "C:\\weights\\x.safetensors",
])
def test_index_pointing_outside_the_directory_is_refused(damaged_checkpoint, ckpt, tmp_path, shard):
    bad = sharded(damaged_checkpoint, ckpt, lambda names: {**{n: "model-00001-of-00001.safetensors" for n in names},
                                                            names[0]: shard})
    msg = one_line_error(load_model, bad)
    assert "model.safetensors.index.json" in msg and "outside the checkpoint directory" in msg and repr(names0(bad)) in msg


def names0(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(index["weight_map"])[0]


@pytest.mark.parametrize("value", [3, None, ["a.safetensors"], {"x": 1}, ""])
def test_weight_map_value_of_the_wrong_type_is_named(damaged_checkpoint, ckpt, value):
    bad = sharded(damaged_checkpoint, ckpt, lambda names: {**{n: "model-00001-of-00001.safetensors" for n in names},
                                                            names[0]: value})
    msg = one_line_error(load_model, bad)
    assert "model.safetensors.index.json" in msg and f"entry {names0(bad)!r} must be a shard file name" in msg
