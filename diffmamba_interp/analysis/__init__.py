"""The science: lenses over the residual stream, the branch lens, target probability / SNR per layer,
implicit attention, model comparison with bootstrap intervals. Layer numbering (SPEC §4): layer 0 = embeddings, layer k =
residual after block k − 1 (k = 1..n_layers); the branch lens uses block indices.
"""

from .attention import ImplicitAttention, differential_attention, implicit_attention
from .branch_lens import branch_lens
from .compare import CompareResult, compare
from .lens import Lens, LogitLens, TunedLens, logit_lens
from .snr import snr_summary, target_probs
from .stats import bootstrap_mean, paired_bootstrap

__all__ = ["Lens", "LogitLens", "TunedLens", "logit_lens", "branch_lens", "target_probs", "snr_summary",
           "compare", "CompareResult", "bootstrap_mean", "paired_bootstrap", "implicit_attention",
           "differential_attention", "ImplicitAttention"]
