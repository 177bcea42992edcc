"""Figures of what each model is and how well it does: λ per differential block and task accuracy.

Input schemas (validated; a missing column raises :class:`DiffMambaError` naming it):

- ``accuracy``: `schemas.ACCURACY_COLUMNS` (model, task, n, correct, accuracy, ci_low, ci_high, deff), one row
  per model and task (the task label may carry a length, e.g. "qa1 · 1k")
- ``lambdas``: `schemas.LAMBDA_COLUMNS` (model, block, lambda, lambda_init), one row per differential block
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import DiffMambaError
from ..schemas import ACCURACY_COLUMNS, LAMBDA_COLUMNS, check_columns
from .figures import BLOCK_AXIS, _custom, _err, _finish, _floats, _model_colours, _text, _unique, block_label

__all__ = ["accuracy_figure", "lambda_figure"]


def accuracy_figure(accuracy: pd.DataFrame) -> go.Figure:
    """Task accuracy per task, one colour per model: points with their 95% interval as whiskers."""
    check_columns(accuracy, ACCURACY_COLUMNS, "accuracy")
    if accuracy.empty:
        raise DiffMambaError("accuracy has no rows")
    models = _unique(accuracy["model"])
    colours = _model_colours(models)
    fig = go.Figure()
    for m in models:
        d = accuracy[accuracy["model"] == m]
        acc, lo, hi = _floats(d["accuracy"]), _floats(d["ci_low"]), _floats(d["ci_high"])
        fig.add_trace(go.Scatter(
            x=d["task"].astype(str).tolist(), y=acc.tolist(), mode="markers", name=_text(m), offsetgroup=str(m),
            marker=dict(size=10, color=colours[m]),
            error_y=dict(type="data", symmetric=False, array=_err(hi, acc), arrayminus=_err(acc, lo),
                         thickness=1.2, width=4, color=colours[m]),
            customdata=_custom(d["correct"], d["n"], lo, hi, d["deff"]),
            hovertemplate=(f"<b>{_text(m)}</b><br>%{{x}}: %{{y:.1%}} (%{{customdata[0]}} of %{{customdata[1]}})"
                           "<br>95% interval [%{customdata[2]:.1%}, %{customdata[3]:.1%}]"
                           "<br>design effect %{customdata[4]:.2f}<extra></extra>")))
    fig.update_layout(scattermode="group", scattergap=0.4)
    how = ("Each point is the share of questions whose answer is the model's top token at the last prompt "
           "position (argmax of the output, i.e. rank 1 at the final layer); whiskers are the 95% Wilson "
           "interval at the effective sample size of the story clustering (questions of one story are not "
           "independent evidence: n is divided by the design effect, shown on hover).")
    _finish(fig, title="Task accuracy (argmax at the answer position)", how=how, xlabel="task",
            ylabel="accuracy", height=400)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(type="category")
    return fig


def lambda_figure(lambdas: pd.DataFrame) -> go.Figure:
    """λ of every differential block per model (markers and line), with the constant λ_init (dotted)."""
    check_columns(lambdas, LAMBDA_COLUMNS, "lambdas")
    if lambdas.empty:
        raise DiffMambaError("lambdas has no rows")
    models = _unique(lambdas["model"])
    colours = _model_colours(models)
    fig = go.Figure()
    for m in models:
        d = lambdas[lambdas["model"] == m].sort_values("block")
        blocks = d["block"].astype(int).tolist()
        labels = [block_label(b) for b in blocks]
        fig.add_trace(go.Scatter(
            x=blocks, y=_floats(d["lambda"]).tolist(), mode="lines+markers", name=f"{_text(m)}: λ",
            legendgroup=str(m), line=dict(color=colours[m], width=2), marker=dict(size=9),
            customdata=_custom(labels, _floats(d["lambda_init"])),
            hovertemplate=(f"<b>{_text(m)}</b><br>%{{customdata[0]}}<br>λ %{{y:.4g}}"
                           "<br>λ_init %{customdata[1]:.4g}<extra></extra>")))
        fig.add_trace(go.Scatter(
            x=blocks, y=_floats(d["lambda_init"]).tolist(), mode="lines+markers", name=f"{_text(m)}: λ_init",
            legendgroup=str(m), line=dict(color=colours[m], width=1, dash="dot"),
            marker=dict(size=6, symbol="circle-open"), hovertemplate="λ_init %{y:.4g}<extra></extra>"))
    fig.add_hline(y=0.0, line=dict(color="#888", width=1))
    how = ("λ is how much of the second branch each differential block subtracts (output = branch 1 − λ·branch 2, "
           "then normalised and scaled by 1 − λ_init); dotted: λ_init = 0.8 − 0.6·exp(−0.3·i), the constant λ's "
           "parametrisation adds. λ near 0 means the block barely uses its second branch; a negative λ adds it.")
    _finish(fig, title="λ per differential block", how=how, xlabel=BLOCK_AXIS, ylabel="λ", height=380)
    fig.update_xaxes(dtick=max(1, int(np.ceil(lambdas["block"].nunique() / 25))))
    return fig
