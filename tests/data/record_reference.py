"""Record the values that tests/test_regression.py compares against (run once, before a refactor).

For the two shipped models and a tiny random model of every architecture: the logits and every hook's
value (hook_ssm_state included) on a fixed prompt, plus the random models' weights, into
tests/data/reference_values.safetensors. Usage: python tests/data/record_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffmamba_interp as dmi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROMPT = "<context> \nMary went to the kitchen. John moved to the garden.\n</context>\n\nQuestion: Where is Mary? Answer:"
RANDOM = {
    "mamba1": dict(arch="mamba1"),
    "mamba2": dict(arch="mamba2", n_groups=2),
    "diffmamba1": dict(arch="diffmamba1", diff_layers="all"),
    "diffmamba2": dict(arch="diffmamba2", diff_layers="alternate"),
    "diffs6": dict(arch="diffs6", diff_layers="alternate"),
    "diffs6mamba2": dict(arch="diffs6mamba2", diff_layers="alternate"),
}
STATE_POSITIONS = [0, 9, -1]  # positions of the shipped models' hook_ssm_state that are kept
BASE = dict(d_model=16, n_layers=2, vocab_size=40, d_state=4, head_dim=8, chunk_size=4, d_conv=3)


def record(model, ids, prefix: str, out: dict) -> None:
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: True)
    out[f"{prefix}/logits"] = logits.contiguous().clone()
    for name, value in cache.items():
        if prefix.startswith("shipped") and name.endswith("hook_ssm_state"):
            value = value[:, STATE_POSITIONS]  # [batch, 3, ...]: keeps the file small
        out[f"{prefix}/hook/{name}"] = value.contiguous().clone()


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    meta = {"prompt": PROMPT, "random": json.dumps(RANDOM), "base": json.dumps(BASE)}
    for name in ("mamba2-babi", "diffmamba2-babi"):
        model = dmi.load_model(ROOT / "models" / name)
        record(model, model.to_tokens(PROMPT), f"shipped/{name}", out)
    ids = torch.randint(0, BASE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    out["random/ids"] = ids
    for name, kw in RANDOM.items():
        torch.manual_seed(0)
        model = dmi.HookedMamba(dmi.MambaConfig(**{**BASE, **kw})).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for k, v in model.state_dict().items():
            out[f"random/{name}/weight/{k}"] = v.contiguous().clone()
        record(model, ids, f"random/{name}", out)
    save_file(out, str(HERE / "reference_values.safetensors"), metadata=meta)
    print(f"wrote {len(out)} tensors")


if __name__ == "__main__":
    main()
