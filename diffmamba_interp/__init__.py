"""diffmamba-interp: mechanistic interpretability for Mamba and Differential Mamba models.

The public names below are imported lazily, so `import diffmamba_interp` (and the CLI's `--help`)
stays fast and never touches the optional GPU kernels (mamba-ssm, causal-conv1d, triton).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MambaConfig": "config",
    "HookedMamba": "model",
    "load_model": "model",
    "save_pretrained": "loading",
    "load_tokenizer": "loading",
    "mamba_to_diffmamba": "convert",
    "ARCHS": "archs",
    "ModelState": "state",
    "MixerState": "state",
    "patch_state": "recurrent",
    "Lens": "analysis.lens",
    "LogitLens": "analysis.lens",
    "TunedLens": "analysis.lens",
    "logit_lens": "analysis.lens",
    "resolve_lens": "analysis.lens",
    "train_tuned_lens": "analysis.lens_training",
    "branch_lens": "analysis.branch_lens",
    "target_probs": "analysis.snr",
    "snr_summary": "analysis.snr",
    "implicit_attention": "analysis.attention",
    "differential_attention": "analysis.attention",
    "differential_summary": "analysis.attention",
    "answer_row": "analysis.answer_row",
    "needle_attention": "analysis.needle_attention",
    "compare": "analysis.compare",
    "accuracy_by_length": "analysis.accuracy",
    "patch": "analysis.patching",
    "logit_diff": "analysis.patching",
    "answer_prob": "analysis.patching",
    "PatchingResult": "analysis.patching",
    "MambaActivationCache": "cache",
    "MambaNNsight": "nnsight_model",
    "set_scan_path": "scan",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffmamba_interp' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
