"""Bad input, category "messages that do not name the problem" (issue 17): every case is a one-line
error that names the file, the field or the option and says what is wrong with it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffmamba_interp import load_model
from diffmamba_interp.cli import app
from helpers import one_line_error

runner = CliRunner()
PROMPT = "Mary went to the kitchen. John moved to the garden. Where is Mary? Answer:"


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def cli_error(*args) -> str:
    code, out, err = run(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tiny_model, tokenizer, tmp_path_factory):
    """A tiny diffmamba2 checkpoint with the bAbI tokenizer and a tuned lens."""
    from diffmamba_interp.analysis.lens import TunedLens

    model = tiny_model("diffmamba2", vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("messages") / "diffmamba2"
    model.save_pretrained(path)
    TunedLens(model).save(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


# -- files that are not what they should be ---------------------------------------------------------
@pytest.mark.parametrize("how, needle", [("symlink", "is a symlink loop"), ("mkdir", "is a directory, not a file")])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_symlink_loop_or_directory_where_a_file_should_be(damaged_checkpoint, ckpt, how, needle, name):
    bad = damaged_checkpoint(ckpt, how, name=name)
    msg = one_line_error(load_model, bad)
    assert f"{bad / name}: {needle}" in msg


def test_tokenizer_file_that_is_a_directory_is_named(damaged_checkpoint, ckpt):
    bad = damaged_checkpoint(ckpt, "mkdir", name="tokenizer.json")
    with pytest.warns(UserWarning, match=r"tokenizer\.json: is a directory, not a file"):
        assert load_model(bad).tokenizer is None


@pytest.mark.parametrize("name, data, needle", [
    ("tuned_lens.safetensors", b"not a safetensors file", "tuned_lens.safetensors: not a valid safetensors file"),
    ("tuned_lens.safetensors", b"", "tuned_lens.safetensors: not a valid safetensors file"),
    ("tuned_lens.json", "{not json", "tuned_lens.json: malformed JSON"),
    ("tuned_lens.json", "[1]", "tuned_lens.json: expected a JSON object"),
])
def test_corrupt_tuned_lens_names_the_file(damaged_checkpoint, ckpt, name, data, needle):
    from diffmamba_interp.analysis.lens import TunedLens

    bad = damaged_checkpoint(ckpt, "write", name=name, data=data)
    assert needle in one_line_error(TunedLens.load, bad, load_model(ckpt))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: {**m, "surprise": 1}, "unknown key 'surprise'"),
    (lambda m: {**m, "train": {"steps": 1, "lr": 0.1, "seed": 0, "batch": 1, "seq_len": 4, "n_tokens": 9, "bogus": 2}},
     "unknown key in 'train': 'bogus'"),
    (lambda m: {**m, "train": {"steps": 1}}, "'train' is incomplete"),
    (lambda m: {**m, "n_layers": "two"}, "'n_layers' must be a whole number"),
    (lambda m: {**m, "dtype": "int64"}, "'dtype' must be a floating-point dtype name"),
])
def test_tuned_lens_json_problems_name_the_file(damaged_checkpoint, ckpt, model, edit, needle):
    from diffmamba_interp.analysis.lens import TunedLens

    meta = json.loads((ckpt / "tuned_lens.json").read_text())
    bad = damaged_checkpoint(ckpt, "write", name="tuned_lens.json", data=json.dumps(edit(meta)))
    msg = one_line_error(TunedLens.load, bad, model)
    assert str(bad / "tuned_lens.json") in msg and needle in msg


def test_tuned_lens_errors_reach_the_cli(damaged_checkpoint, ckpt):
    bad = damaged_checkpoint(ckpt, "write", name="tuned_lens.safetensors", data=b"\x00" * 10)
    line = cli_error("lens", "--ckpt", bad, "--prompt", PROMPT, "--answer", "kitchen", "--lens", "tuned")
    assert str(bad / "tuned_lens.safetensors") in line


# -- config fields named ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, needle", [
    ({"time_step_rank": "big"}, "field 'time_step_rank' must be a positive whole number, got \"big\" (a string)"),
    ({"diffmamba_settings": 3}, "field 'diffmamba_settings' must be one of"),
    ({"diffmamba_settings": {"a": 1}}, "field 'diffmamba_settings' must be one of"),
    ({"hidden_size": "64"}, "field 'hidden_size' must be a positive whole number, got \"64\" (a string)"),
    ({"head_dim": "eight"}, "field 'head_dim'"),
    ({"time_step_limit": "wide"}, "field 'time_step_limit' must be a pair of numbers"),
    ({"time_step_limit": [0, {"__float__": "lots"}]}, "field 'time_step_limit' must be a number"),
])
def test_config_fields_are_named_and_not_wrapped_twice(damaged_checkpoint, ckpt, fields, needle):
    bad = damaged_checkpoint(ckpt, "config", fields=fields)
    msg = one_line_error(load_model, bad)
    assert msg.startswith(f"{bad / 'config.json'}: ") and needle in msg
    assert "has a field of the wrong type" not in msg and "tokenizer" not in msg


@pytest.mark.parametrize("fields, needle", [
    ({"ssm_cfg": 3}, "field 'ssm_cfg' must be an object"),
    ({"ssm_cfg": {"d_state": "big"}}, "field 'ssm_cfg.d_state'"),
    ({"ssm_cfg": {"layer": "Mamba2", "dt_limit": [1, 0]}}, "field 'ssm_cfg.dt_limit'"),
    ({"rms_norm": "yes"}, "field 'rms_norm' must be true or false"),
    ({"pad_vocab_size_multiple": 0}, "field 'pad_vocab_size_multiple'"),
    ({"n_layer": 2.5}, "field 'n_layer'"),
])
def test_mamba_ssm_config_fields_are_named(tmp_path, fields, needle):
    config = {"d_model": 16, "n_layer": 2, "vocab_size": 40, "ssm_cfg": {}, **fields}
    (tmp_path / "config.json").write_text(json.dumps(config))
    msg = one_line_error(load_model, tmp_path)
    assert str(tmp_path / "config.json") in msg and needle in msg and "wrong type" not in msg


# -- data and output files ---------------------------------------------------------------------------
def test_latin1_jsonl_names_file_and_line(tmp_path):
    from diffmamba_interp.data import load_data

    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok", "answer": "a"}\n{"prompt": "caf\u00e9", "answer": "b"}\n'.encode("latin-1"))
    msg = one_line_error(load_data, f"jsonl:{path}")
    assert f"{path} line 2: not UTF-8" in msg


def test_load_data_n_not_a_whole_number():
    from diffmamba_interp.data import load_data

    assert "2.5" in one_line_error(load_data, "babi:qa1", n=2.5)


@pytest.mark.parametrize("target, needle", [
    ("/dev/full", "/dev/full: cannot be written (No space left on device)"),
    ("/proc/version", "/proc/version"),
])
def test_unwritable_json_target_is_named(ckpt, target, needle):
    # enough stories (60 questions) that no minimum-sample warning precedes the error line
    line = cli_error("snr", "--ckpt", ckpt, "--n", 60, "--json", target, "-q")
    assert needle in line


def test_json_into_a_directory_or_under_a_file_is_refused_before_work(ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a directory" in cli_error("snr", "--ckpt", ckpt, "--n", 2, "--json", tmp_path, "-q")
    assert "not a directory" in cli_error("snr", "--ckpt", ckpt, "--n", 2, "--json", tmp_path / "file" / "x.json", "-q")


# -- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["snr", "--seed", "-5"], "--seed must be a whole number from 0 to"),
    (["compare", "--seed", str(2**40)], "--seed must be"),
    (["lens", "--prompt", PROMPT, "--answer", "kitchen", "--top", "999"], "--top 999 is more than the vocabulary"),
    (["lens", "--prompt", PROMPT, "--answer", "kitchen", "--top", "0"], "--top must be a positive"),
    (["report", "--example", "-5"], "--example must be an example index >= 0"),
    (["report", "--n", "2", "--example", "2"], "--example 2 is out of range for --n 2 examples (0..1)"),
])
def test_bad_options(ckpt, args, needle):
    assert needle in cli_error(args[0], "--ckpt", ckpt, *args[1:])


# -- the Python API --------------------------------------------------------------------------------------
def test_empty_batch(model):
    msg = one_line_error(model, torch.zeros(0, 3, dtype=torch.long))
    assert "batch >= 1" in msg and "(0, 3)" in msg


@pytest.mark.parametrize("kw, needle", [
    (dict(answers=[-1]), "answer token id -1 is negative"),
    (dict(answers=["kitchen"], candidates=[[-3]]), "candidate token id -3 is negative"),
    (dict(answers="kitchen"), "answers must be a list (one per prompt), got the string 'kitchen'"),
    (dict(answers=["kitchen"], candidates=["garden"]), "candidates[0] must be a list"),
    (dict(answers=["kitchen"], candidates="garden"), "candidates must be a list"),
    (dict(answers=[2.5]), "answer must be a string or a token id, got float"),
    (dict(answers=[None]), "answer must be a string or a token id"),
])
def test_target_probs_arguments(model, kw, needle):
    from diffmamba_interp.analysis.snr import target_probs

    assert needle in one_line_error(target_probs, model, [PROMPT], progress=False, **kw)


def test_prompts_given_as_one_string(model):
    from diffmamba_interp.analysis.snr import target_probs

    msg = one_line_error(target_probs, model, PROMPT, ["kitchen"], progress=False)
    assert "prompts must be a list" in msg and "got the string" in msg


@pytest.mark.parametrize("prompt, needle", [([1, 2.5], "whole numbers"), ([3, -1], "token id -1"),
                                            (torch.tensor([1.0, 2.0]), "integer tensor")])
def test_prompt_ids_must_be_whole_non_negative(model, prompt, needle):
    from diffmamba_interp.analysis.snr import target_probs

    assert needle in one_line_error(target_probs, model, [prompt], [3], progress=False)
