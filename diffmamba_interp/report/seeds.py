"""The report's seed-level sections (`snr --ckpt-a ... --ckpt-b ...`, `--all-seeds`): per measure, each
training seed's per-layer curve with the seed-level mean and interval of its architecture, and the
difference between the two architectures across seeds (`analysis.seeds.compare_seeds`).

Input schemas (validated; a missing column raises :class:`DiffMambaError` naming it):

- ``summary``: `analysis.seeds.SEED_SUMMARY_COLUMNS` (group, layer, measure, mean, ci_low, ci_high, n_seeds, ...)
- ``per_seed``: `analysis.seeds.PER_SEED_COLUMNS` (group, model, layer, measure, mean)
- ``paired``: `analysis.seeds.SEED_PAIRED_COLUMNS` (group_a, group_b, layer, measure, diff_mean, ci_low, ci_high, ...)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import DiffMambaError
from ..schemas import check_columns
from .figures import (LAYER_AXIS, _finish, _floats, _layer_dtick, _measure_label, _model_colours, _rgba, _select_measure,
                      _text, _unique, layer_label, paired_direction, paired_figure)

__all__ = ["seed_curves_figure", "seed_paired_figure", "seed_sections", "SEED_MEASURES"]

# the measures drawn, in order (the raw distractor ratio is compared on its log, as in the model sections)
SEED_MEASURES = ("prob", "snr_db", "distractor_log_ratio", "logprob", "rank")
_SUMMARY = ("group", "layer", "measure", "mean", "ci_low", "ci_high", "n_seeds")
_PER_SEED = ("group", "model", "layer", "measure", "mean")
_PAIRED = ("group_a", "group_b", "layer", "measure", "diff_mean", "ci_low", "ci_high")


def _seed_name(label: str, group: str) -> str:
    """A checkpoint's label without its "group/" prefix (compare_seeds labels it "group/directory")."""
    label = str(label)
    return label[len(group) + 1:] if label.startswith(f"{group}/") else label


def seed_curves_figure(summary: pd.DataFrame, per_seed: pd.DataFrame, measure: str = "prob") -> go.Figure:
    """Per architecture (group): one thin line per training seed (its mean of `measure` per layer), and
    the seed-level mean (the mean of those) as a thick line with its two-level bootstrap interval as a
    band. The legend names every seed under its architecture's title."""
    check_columns(summary, _SUMMARY, "seed summary")
    check_columns(per_seed, _PER_SEED, "per-seed means")
    sub = _select_measure(summary, measure, "seed summary")
    seeds = _select_measure(per_seed, measure, "per-seed means")
    groups = _unique(sub["group"])
    colours = _model_colours(groups)
    label = _measure_label(measure)
    fig = go.Figure()
    for g in groups:
        d = sub[sub["group"] == g]
        x = d["layer"].to_numpy()
        mean, lo, hi = _floats(d["mean"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        k = int(pd.to_numeric(d["n_seeds"]).max())
        title = f"{_text(g)} ({k} seed{'s' if k != 1 else ''})"
        for model in _unique(seeds[seeds["group"] == g]["model"]):
            s = seeds[(seeds["group"] == g) & (seeds["model"] == model)]
            name = _text(_seed_name(model, g))
            fig.add_trace(go.Scatter(
                x=s["layer"].tolist(), y=_floats(s["mean"]).tolist(), mode="lines+markers", name=name,
                legendgroup=str(g), legendgrouptitle=dict(text=title),
                line=dict(color=_rgba(colours[g], 0.7), width=1.5, dash="dot"), marker=dict(size=4),
                customdata=np.asarray(s["layer"].map(layer_label), dtype=object),
                hovertemplate=f"<b>{name}</b> ({_text(g)} seed)<br>%{{customdata}}<br>mean %{{y:.4g}}<extra></extra>"))
        ok = np.isfinite(lo) & np.isfinite(hi)
        fig.add_trace(go.Scatter(
            x=np.concatenate([x[ok], x[ok][::-1]]).tolist(), y=np.concatenate([hi[ok], lo[ok][::-1]]).tolist(),
            fill="toself", fillcolor=_rgba(colours[g], 0.16), line=dict(width=0), mode="lines", hoverinfo="skip",
            showlegend=False, legendgroup=str(g), name=f"{_text(g)}: 95% interval"))
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=mean.tolist(), mode="lines+markers", name=f"seed-level mean ± 95% interval",
            legendgroup=str(g), legendgrouptitle=dict(text=title), line=dict(color=colours[g], width=3),
            marker=dict(size=7),
            customdata=np.stack([np.asarray(d["layer"].map(layer_label), dtype=object), lo, hi,
                                 _floats(d.get("seed_std", pd.Series(np.nan, index=d.index)))], axis=-1),
            hovertemplate=(f"<b>{title}</b><br>%{{customdata[0]}}<br>seed-level mean %{{y:.4g}}"
                           "<br>95% interval [%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
                           "<br>std over seeds %{customdata[3]:.3g}<extra></extra>")))
    how = (f"Dotted lines: each training seed's mean {label} per layer over the examples; thick lines: the "
           "seed-level mean of an architecture (the mean of its seeds' means), its shaded band the 95% two-level "
           "bootstrap interval (seeds and stories resampled). Seeds far apart within an architecture mean a claim "
           "about the architecture needs several seeds.")
    _finish(fig, title=f"{label[0].upper()}{label[1:]} per layer, per training seed", how=how,
            xlabel=LAYER_AXIS, ylabel=label)
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02, groupclick="toggleitem"),
                      margin=dict(r=220))
    if measure == "distractor_log_ratio":
        fig.add_hline(y=0.0, line=dict(color="#888", dash="dot", width=1))
    fig.update_xaxes(dtick=_layer_dtick(sub["layer"]))
    return fig


def seed_paired_figure(paired: pd.DataFrame, measure: str = "prob") -> go.Figure:
    """The seed-level difference b − a per layer (`figures.paired_figure`'s look: whiskers, filled markers
    where significant) with its two-level bootstrap interval (seeds of each architecture resampled
    independently, the examples paired)."""
    check_columns(paired, _PAIRED, "seed paired")
    frame = paired.rename(columns={"group_a": "model_a", "group_b": "model_b"})
    fig = paired_figure(frame, measure)
    sub = _select_measure(frame, measure, "seed paired")
    a, b = sub["model_a"].iloc[0], sub["model_b"].iloc[0]
    label = _measure_label(measure)
    fig.update_layout(title_text=f"Across seeds: difference in {label} per layer ({_text(b)} − {_text(a)})")
    fig.layout.meta = {"how_to_read": (
        f"Each point is the seed-level mean of {b} minus that of {a} (each the mean of its seeds' means) in {label}, "
        f"with its 95% interval from a two-level bootstrap (the seeds of each architecture resampled independently, "
        f"the stories shared); {paired_direction(measure, a, b)}. Filled markers: significant (the interval "
        "excludes zero, has positive width and rests on enough stories); open markers: not.")}
    return fig


def seed_sections(page, seeds) -> None:
    """The two seed-level sections on `page` (a `report.html._Page`) from `seeds`, an
    `analysis.seeds.SeedCompareResult` (summary, per_seed, paired, groups)."""
    summary, per_seed, paired = seeds.summary, seeds.per_seed, seeds.paired
    if summary is None or summary.empty:
        raise DiffMambaError("the seed comparison has no rows")
    measures = [m for m in SEED_MEASURES if m in set(summary["measure"])]
    page.section("Across training seeds: per-seed curves and seed-level means")
    sizes = "; ".join(f"{g}: {len(m)} checkpoint{'s' if len(m) != 1 else ''} "
                      f"({', '.join(_seed_name(x, g) for x in m)})" for g, m in seeds.groups.items())
    page.note(f"Every checkpoint ran on the same examples. {sizes}.")
    if any(len(m) < 2 for m in seeds.groups.values()):
        page.note("With one seed an architecture's interval is the story bootstrap of that one run: it says nothing "
                  "about how much another training seed would differ.")
    for m in measures:
        page.figure(seed_curves_figure(summary, per_seed, m), f"seed-curves-{m}")
    if paired is not None and not paired.empty:
        page.section("Across training seeds: difference between architectures")
        for m in [m for m in SEED_MEASURES if m in set(paired["measure"])]:
            page.figure(seed_paired_figure(paired, m), f"seed-paired-{m}")
