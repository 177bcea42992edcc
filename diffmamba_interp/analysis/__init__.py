"""The science: lenses over the residual stream, the branch lens, target probability / SNR per layer,
implicit attention, model comparison with bootstrap intervals.

Layer numbering (docs/conventions.md, "Lens and SNR"): layer 0 = embeddings, layer k = residual
after block k − 1 (k = 1..n_layers); the branch lens and implicit attention use block indices.
A new lens kind is a `Lens` subclass in lens.py plus an entry in `lens.LENSES`.
"""

from .answer_row import answer_row, answer_rows
from .attention import ImplicitAttention, OutputAttention, differential_attention, differential_summary, implicit_attention
from .branch_lens import branch_lens
from .compare import CompareResult, compare
from .lens import LENSES, Lens, LogitLens, TunedLens, logit_lens, resolve_lens
from .lens_training import train_tuned_lens
from .needle_attention import needle_attention
from .snr import snr_summary, target_probs
from .stats import bootstrap_mean, paired_bootstrap

__all__ = ["LENSES", "Lens", "LogitLens", "TunedLens", "logit_lens", "resolve_lens", "train_tuned_lens", "branch_lens", "target_probs", "snr_summary",
           "compare", "CompareResult", "bootstrap_mean", "paired_bootstrap", "implicit_attention",
           "differential_attention", "differential_summary", "ImplicitAttention", "OutputAttention", "answer_row",
           "answer_rows", "needle_attention"]
