"""Views that fit one HTML page at any length (attention_views.py, report/long_context.py) and the
`attention` command's --view / --positions / --needle / --answer / --max-side / --max-mb."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffmamba_interp import attention_views
from diffmamba_interp.analysis.answer_row import answer_row
from diffmamba_interp.analysis.attention import differential_summary, implicit_attention
from diffmamba_interp.attention_views import attention_view, parse_positions
from diffmamba_interp.cli import app
from diffmamba_interp.data import babilong
from diffmamba_interp.errors import DiffMambaError
from diffmamba_interp.report.long_context import answer_row_figure, write_attention_report

PROMPT = ("<context> \nMary went to the kitchen. John moved to the garden. Mary went to the hallway.\n</context>\n\n"
          "Question: Where is Mary? Answer:")


@pytest.fixture(scope="module")
def make(tiny_model, tokenizer):
    def build(arch="diffmamba2", dtype=torch.float64, **kw):
        model = tiny_model(arch, dtype=dtype, shared=True, vocab_size=len(tokenizer), d_state=4, head_dim=8,
                           chunk_size=256, d_conv=4, **kw)
        model.tokenizer = tokenizer
        return model

    return build


def test_parse_positions():
    assert parse_positions(None, 10) == (0, 10) and parse_positions("2:5", 10) == (2, 5)
    assert parse_positions("-3:", 10) == (7, 10) and parse_positions(":4", 10) == (0, 4)
    for bad in ("5:5", "3", "a:b", "0:11", "1:2:3"):
        with pytest.raises(DiffMambaError, match="positions"):
            parse_positions(bad, 10)


def test_full_view_is_the_map_its_window_and_its_block_means(make, monkeypatch):
    model = make()
    ids = model.to_tokens(PROMPT)
    L = ids.shape[-1]
    b1 = implicit_attention(model, ids, 0, 1, kind="block", reduce="mean").matrix[0].numpy()
    diff = differential_summary(model, ids, 0, kind="block", reduce="mean").matrix[0].numpy()
    monkeypatch.setattr(attention_views, "ROW_CHUNK", 3)  # several row blocks, each from a cut prefix
    e = attention_view(model, PROMPT, 0, kind="block", max_side=L)
    assert list(e["maps"]) == ["branch 1", "branch 2", "differential"] and e["tokens"] == model.to_str_tokens(PROMPT)
    np.testing.assert_allclose(e["maps"]["branch 1"], b1, rtol=1e-3, atol=1e-12)  # 4 significant digits
    np.testing.assert_allclose(e["maps"]["differential"], diff, rtol=1e-3, atol=1e-12)
    w = attention_view(model, PROMPT, 0, kind="block", positions="5:17", max_side=L)
    np.testing.assert_allclose(w["maps"]["branch 1"], b1[5:17, 5:17], rtol=1e-3, atol=1e-12)
    assert w["tokens"] == model.to_str_tokens(PROMPT)[5:17] and "positions 5:17" in w["title"]
    # above max_side: the mean over each block of the map
    d = attention_view(model, PROMPT, 0, kind="block", max_side=5)
    edges = np.unique(np.linspace(0, L, 6).round().astype(int))
    want = np.array([[b1[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean() for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(d["maps"]["branch 1"], want, rtol=1e-3, atol=1e-12)
    assert d["tokens"][0] == f"0–{edges[1] - 1}" and "averaged over blocks" in d["title"]
    # kind "output": the operator's norm, whole and per branch term
    o = attention_view(model, PROMPT, 0, kind="output", max_side=L)
    op = implicit_attention(model, ids, 0, kind="output")
    assert list(o["maps"]) == ["output norm", "output norm, branch 1", "output norm, branch 2"]
    np.testing.assert_allclose(o["maps"]["output norm"], op.frobenius()[0].numpy(), rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(o["maps"]["output norm, branch 2"], op.branch(2).frobenius()[0].numpy(), rtol=1e-3,
                               atol=1e-12)
    one = attention_view(model, PROMPT, 0, branch=2, kind="output", max_side=L)
    assert list(one["maps"]) == ["output norm, branch 2"]


def test_full_view_refuses_what_it_cannot_compute(make, monkeypatch):
    model = make()
    monkeypatch.setattr(attention_views, "MAX_FULL_CELLS", 100)
    with pytest.raises(DiffMambaError, match="--positions a:b or use --view row"):
        attention_view(model, PROMPT, 0)
    attention_view(model, PROMPT, 0, positions="-3:")  # 3 rows × L columns fit


def test_row_view_holds_the_answer_rows_and_marks_the_needle(make, tokenizer):
    model = make()
    ids = model.to_tokens(PROMPT)
    tokens = model.to_str_tokens(PROMPT)
    e = attention_view(model, PROMPT, 0, kind="block", view="row", answer="hallway",
                       needles=["Mary went to the hallway."])
    row = answer_row(model, ids, 0, answer=tokenizer.encode(" hallway", add_special_tokens=False)[0])
    assert e["view"] == "row" and e["target"] == len(tokens) - 1 and list(e["rows"]) == list(row.maps)
    for name, r in row.maps.items():
        np.testing.assert_allclose(e["rows"][name], r[0].numpy(), rtol=1e-3, atol=1e-12)
    (lo, hi), = e["marks"]
    assert tokens[lo:hi] == tokenizer.tokenize("Mary went to the hallway.")
    w = attention_view(model, PROMPT, 0, view="row", positions="3:12", needles=["Mary"])
    assert w["positions"] == list(range(3, 12)) and all(3 <= a < b <= 12 for a, b in w["marks"])
    np.testing.assert_allclose(w["rows"]["branch 1"], answer_row(model, ids, 0, kind="s6").maps["branch 1"][0, 3:12],
                               rtol=1e-3, atol=1e-12)
    only = attention_view(model, PROMPT, 0, branch=1, kind="output", view="row", answer="hallway")
    assert list(only["rows"]) == ["output norm, branch 1", "logit, branch 1"]
    with pytest.raises(DiffMambaError, match="not in the prompt"):
        attention_view(model, PROMPT, 0, view="row", needles=["Bill"])
    with pytest.raises(DiffMambaError, match="2 tokens"):
        attention_view(model, PROMPT, 0, view="row", answer="the kitchen")


def test_a_16k_answer_row_page_is_under_10_mb(make, tokenizer, tmp_path):
    model = make("diffmamba2", dtype=torch.float32, n_layers=1, diff_layers="all")
    p = babilong("qa2", "16k", n=1, tokenizer=tokenizer, filler="babi")[0]
    assert p.meta["n_tokens"] > 16000
    e = attention_view(model, p.prompt, 0, kind="block", view="row", answer=p.answer,
                       needles=list(p.meta["supporting_facts"]))
    assert len(e["positions"]) == p.meta["n_tokens"] and e["marks"]
    path = write_attention_report(tmp_path / "row.html", title="16k", entries=[e])
    assert path.stat().st_size < 10 * 2**20


def test_page_numbers_are_shortened_to_four_significant_digits():
    from diffmamba_interp.report.long_context import _short

    got = _short(np.array([0.000123456, -98765.4, 0.0, np.nan, 1 / 3]))
    np.testing.assert_array_equal(got[[0, 1, 2, 4]], [0.0001235, -98770.0, 0.0, 0.3333])
    assert np.isnan(got[3]) and repr(float(got[4])) == "0.3333"


def test_answer_row_figure():
    e = {"view": "row", "title": "t", "rows": {"branch 1": [0.1, 0.2, 0.3], "output norm": [1.0, 0.0, 2.0]},
         "positions": [4, 5, 6], "tokens": ["a", "b", "c"], "target": 6, "marks": [[5, 6]]}
    fig = answer_row_figure(e)
    assert [t.name for t in fig.data] == ["branch 1", "output norm"]
    assert fig.data[0].x0 == 4 and list(fig.data[1].y) == pytest.approx([1.0, 0.0, 2.0])
    assert len([s for s in fig.layout.shapes if s.type == "rect"]) == 2  # one shaded range in each panel
    with pytest.raises(DiffMambaError, match="shape"):
        answer_row_figure({**e, "rows": {"x": [1.0]}})
    with pytest.raises(DiffMambaError, match="missing"):
        answer_row_figure({"title": "t"})


def test_the_page_has_a_hard_size_cap(make, tmp_path, monkeypatch):
    model = make()
    entries = [attention_view(model, PROMPT, 0), attention_view(model, PROMPT, 0, view="row")]
    path = write_attention_report(tmp_path / "ok.html", title="x", entries=entries)
    html = path.read_text()
    assert '<meta name="diffmamba-figures" content="2">' in html
    with pytest.raises(DiffMambaError, match=r"about .* MB, above the cap of 4\.0 MB"):
        write_attention_report(tmp_path / "no.html", title="x", entries=entries, max_bytes=4 * 2**20)
    # the drawn page is measured too, whatever the estimate says
    import diffmamba_interp.report.long_context as lc

    monkeypatch.setattr(lc, "_estimate_bytes", lambda entries: 0)
    with pytest.raises(DiffMambaError, match=r"would be \d+\.\d MB, above the cap of 4\.0 MB: show fewer positions"):
        write_attention_report(tmp_path / "no.html", title="x", entries=entries, max_bytes=4 * 2**20)
    assert not (tmp_path / "no.html").exists()


@pytest.fixture(scope="module")
def ckpt(tiny_model, tokenizer, tmp_path_factory):
    model = tiny_model("diffmamba2", vocab_size=len(tokenizer), d_state=4, head_dim=8, chunk_size=256, d_conv=4)
    model.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("ckpt") / "diff-tiny"
    model.save_pretrained(path)
    return str(path)


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_attention_command_views(ckpt, tmp_path):
    out = tmp_path / "a.html"
    code, stdout, err = run("attention", "--ckpt", ckpt, "--prompt", PROMPT, "--layer", 0, "--view", "row", "--answer",
                            "hallway", "--needle", "Mary went to the hallway.", "--out", out)
    assert code == 0, err
    assert "answer row" in stdout and "logit, branch 2" in stdout and out.exists()
    code, stdout, err = run("attention", "--ckpt", ckpt, "--prompt", PROMPT, "--layer", 0, "--kind", "output",
                            "--positions", "2:12", "--out", out)
    assert code == 0, err
    assert "output norm, branch 1" in stdout and "over 10 positions" in stdout
    code, stdout, err = run("attention", "--ckpt", ckpt, "--prompt", PROMPT, "--layer", 0, "--max-side", 4, "--out", out)
    assert code == 0, err
    assert "over 4 positions" in stdout
    for args, msg in [(["--max-mb", 1], "above the cap of 1.0 MB"), (["--positions", "9:3"], "selects no positions"),
                      (["--view", "row", "--needle", "Bill"], "not in the prompt"),
                      (["--view", "row", "--answer", "zyzzyva"], "is not in the tokenizer's vocabulary"),
                      (["--answer", "hallway"], "are for the answer row (--view row)")]:
        code, stdout, err = run("attention", "--ckpt", ckpt, "--prompt", PROMPT, "--layer", 0, "--out", out, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and msg in lines[0], err


def test_needle_attention_from_checkpoint_paths_and_a_data_spec(ckpt):
    from diffmamba_interp.analysis.needle_attention import needle_attention

    res = needle_attention([ckpt], "babi:qa2", n=3, n_boot=50, layers=[0])
    assert set(res.summary.model) == {"diff-tiny"} and res.per_example.example.nunique() == 3
    assert res.paired.empty  # one model: nothing to pair
