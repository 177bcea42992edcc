"""Report layer: plotly figures and one self-contained offline HTML page, from DataFrames.

The analysis code produces tidy DataFrames (schemas in :mod:`.figures`, :mod:`.model_figures` and
`diffmamba_interp.schemas`); this package only draws and writes them. Each figure keeps a one-sentence
reading guide in ``fig.layout.meta`` (:func:`how_to_read`), shown under the figure in the HTML report.
"""

from .figures import (
    BRANCH_COLUMNS,
    BRANCH_COMPONENTS,
    MEASURE_LABELS,
    PAIRED_COLUMNS,
    SUMMARY_COLUMNS,
    attention_figure,
    branch_figure,
    how_to_read,
    measure_curves_figure,
    needle_prob_figure,
    paired_figure,
)
from .html import FIGURE_DIV_CLASS, write_report
from .model_figures import accuracy_figure, lambda_figure

__all__ = [
    "SUMMARY_COLUMNS",
    "PAIRED_COLUMNS",
    "BRANCH_COLUMNS",
    "BRANCH_COMPONENTS",
    "MEASURE_LABELS",
    "FIGURE_DIV_CLASS",
    "how_to_read",
    "needle_prob_figure",
    "measure_curves_figure",
    "paired_figure",
    "branch_figure",
    "attention_figure",
    "accuracy_figure",
    "lambda_figure",
    "write_report",
]
