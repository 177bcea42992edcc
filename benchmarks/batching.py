"""Batching and state caches (issue 12).

1. `target_probs` on prompts of mixed lengths (babi:qa2, n 200, the shipped models): right-padded
   batches sorted by length (what `target_probs` does, exact for a causal model read at each row's
   own last token) against the earlier grouping of prompts of exactly equal token length, in the
   same run, alternating, medians; the probabilities checked equal.
2. Peak memory of caching `hook_ssm_state` ([b, L, E, N] / [b, L, H, P, N] per mixer) against the
   bytes of the states it holds, each in its own subprocess (peak RSS above the process's RSS after
   building the model), for a Mamba-1 and a Mamba-2 of 130M-like width.

    python benchmarks/batching.py [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

STATES = r"""
import json, resource, sys, torch
from diffmamba_interp import HookedMamba, MambaConfig
torch.set_num_threads(int(sys.argv[2]))
shape, L = json.loads(sys.argv[1]), int(sys.argv[3])
model = HookedMamba(MambaConfig(**shape)).eval()
ids = torch.randint(0, shape["vocab_size"], (1, L), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids[:, :8])  # warm-up: allocator and numba
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_ssm_state"), return_type=None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = sum(t.numel() * t.element_size() for t in cache.values())
print(json.dumps({"held_gb": held / 2**30, "extra_peak_gb": (peak - base) / 2**20, "n_states": len(cache)}))
"""

SHAPES = {
    "mamba1 d768 x4 layers, L 2048": (dict(arch="mamba1", d_model=768, n_layers=4, vocab_size=1000, d_state=16), 2048),
    "mamba2 d768 x4 layers (H 24, P 64, N 128), L 1024": (dict(arch="mamba2", d_model=768, n_layers=4, vocab_size=1000,
                                                           d_state=128, head_dim=64, chunk_size=256), 1024),
}


def exact_length_batches(seqs, batch_size):
    """The earlier grouping: prompts of exactly equal token length together (no padding)."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for length in sorted(by_len):
        idx = by_len[length]
        for j in range(0, len(idx), batch_size):
            part = idx[j:j + batch_size]
            yield part, torch.tensor([seqs[i] for i in part]), [length - 1] * len(part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffmamba_interp.analysis import snr
    from diffmamba_interp.data import load_data
    from diffmamba_interp.jobs import load_models

    prompts = load_data("babi:qa2", n=200)
    models = load_models(None)
    padded = snr.padded_batches
    for model in models:
        seqs = [model.tokenizer.encode(p.prompt, add_special_tokens=False) for p in prompts]
        n_exact = len(list(exact_length_batches(seqs, 8)))
        n_padded = len(list(padded(seqs, 8)))
        snr.target_probs(model, prompts[:16], lens="logit", batch_size=8, progress=False)  # warm-up (numba, allocator)
        times = {"padded": [], "exact-length": []}
        out = {}
        for _ in range(args.reps):
            for name, batches in (("padded", padded), ("exact-length", exact_length_batches)):
                snr.padded_batches = batches
                t = time.perf_counter()
                out[name] = snr.target_probs(model, prompts, lens="logit", batch_size=8, progress=False)
                times[name].append(time.perf_counter() - t)
                snr.padded_batches = padded
        diff = float(np.abs(out["padded"]["prob"].to_numpy() - out["exact-length"]["prob"].to_numpy()).max())
        tp, te = statistics.median(times["padded"]), statistics.median(times["exact-length"])
        print(f"{model.label}: target_probs babi:qa2 n 200, batch 8: padded {tp:.2f} s ({n_padded} forwards), exact-length "
              f"{te:.2f} s ({n_exact} forwards): {te / tp:.1f}x; max |Δprob| {diff:.1e}")
    for label, (shape, L) in SHAPES.items():
        proc = subprocess.run([sys.executable, "-c", STATES, json.dumps(shape), str(args.threads), str(L)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"hook_ssm_state cache, {label}: holds {r['held_gb']:.2f} GiB in {r['n_states']} states, peak above the "
              f"model {r['extra_peak_gb']:.2f} GiB = {r['extra_peak_gb'] / r['held_gb']:.2f}x")


if __name__ == "__main__":
    main()
