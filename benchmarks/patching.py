"""Patching at 1k tokens on a 130M-shaped Mamba-1 (d 768, 24 layers, vocab 50280, N 16; random
weights), against the TransformerLens way of doing it in the same run:

1. exact resid_pre patching (`analysis.patching.patch(what="resid")`) vs the hand-written TL loop (one
   full corrupted forward with full logits per cell, as `transformer_lens.patching.get_act_patch_resid_pre`
   runs), on a sample of cells (layers 0, n/2, n−1 × 8 positions at the start and in the middle), the
   values checked equal; both extrapolated to the full 24 × 1024 grid (ours: a fixed cost per call
   plus a cost per cell ∝ (L − first position of its batch)·(n − layer), fitted on the sample in
   batches of 8; TL: constant per cell);
2. attribution patching of the full grid (measured) against that extrapolated exact grid;
3. state patching (`what="state"`) over every scan unit at 8 positions spread over the prompt,
   reusing the corrupted prefix state and starting at the unit's block, vs `recurrent.patch_state`
   cell by cell (which re-runs the prefix and the whole model, with logits at every position) on a
   sample of those cells, per cell, the values checked equal.

    python benchmarks/patching.py [--length 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffmamba_interp import HookedMamba, MambaConfig, patch_state
from diffmamba_interp.analysis.patching import logit_diff, patch

SHAPE = dict(arch="mamba1", d_model=768, n_layers=24, vocab_size=50280, d_state=16, expand=2)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def tl_cell(model, clean_cache, corrupt, layer, p, metric):
    name = f"blocks.{layer}.hook_resid_pre"

    def put(t, hook):
        t = t.clone()
        t[:, p] = clean_cache[name][:, p]
        return t

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, put)])[:, -1])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(**SHAPE)).eval()
    n, L = model.cfg.n_layers, args.length
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, SHAPE["vocab_size"], (1, L), generator=g)
    corrupt = clean.clone()
    changed = torch.randperm(L, generator=g)[:16]
    corrupt[0, changed] = torch.randint(0, SHAPE["vocab_size"], (16,), generator=g)
    metric = logit_diff(11, 12)
    print(f"130M-shaped Mamba-1, {L} tokens, {args.threads} threads, {len(changed)} corrupted positions")

    # 1. exact resid patching on a sample of cells, ours vs the TL loop
    layers, starts, R = [0, n // 2, n - 1], [0, L // 2], 8
    # the fixed cost of a call (the two baselines, the clean values, the corrupted residuals): one cell
    # at the last position of the last block, whose own cost is one token through one block
    overhead, _ = timed(lambda: patch(model, clean, corrupt, metric, what="resid", positions=[L - 1], layers=[n - 1],
                                      progress=False))
    ours_t, ours_cells, fit = 0.0, 0, []
    ours_vals = {}
    for s in starts:
        for layer in layers:
            t, res = timed(lambda: patch(model, clean, corrupt, metric, what="resid", positions=list(range(s, s + R)),
                                         layers=[layer], batch_size=R, progress=False))
            ours_t += t - overhead
            ours_cells += R
            fit.append(max(t - overhead, 0.0) / ((L - s) * (n - layer)))
            ours_vals.update({(layer, int(p)): v for p, v in zip(res.frame["position"], res.frame["value"])})
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    tl_t, tl_n, diff = 0.0, 0, 0.0
    for s in starts:
        for layer in layers:
            for p in (s, s + R - 1):
                t, v = timed(lambda: tl_cell(model, clean_cache, corrupt, layer, p, metric))
                tl_t += t
                tl_n += 1
                diff = max(diff, abs(v - ours_vals[(layer, p)]))
    k = float(np.mean(fit))  # seconds per (token after the batch start × block from the layer on), batches of R
    groups = range(0, L, R)
    ours_full = overhead + k * sum(L - s for s in groups) * sum(n - layer for layer in range(n))
    tl_full = tl_t / tl_n * n * L
    print(f"exact resid patching, sample: ours {ours_t:.1f} s for {ours_cells} cells ({ours_t / ours_cells:.3f} s/cell, "
          f"after a fixed {overhead:.1f} s per call); "
          f"TL loop {tl_t:.1f} s for {tl_n} cells ({tl_t / tl_n:.3f} s/cell); max |difference| {diff:.2e}")
    print(f"  full {n} x {L} grid, extrapolated: ours {ours_full / 3600:.2f} h, TL loop {tl_full / 3600:.2f} h "
          f"(ours {tl_full / ours_full:.1f}x faster)")

    # 2. attribution patching of the full grid
    t_attr, attr = timed(lambda: patch(model, clean, corrupt, metric, what="resid", method="attribution", progress=False))
    print(f"attribution patching, full {n} x {L} grid: {t_attr:.1f} s, {len(attr.frame)} cells; "
          f"{ours_full / t_attr:.0f}x faster than our exact (extrapolated), {tl_full / t_attr:.0f}x than the TL loop")

    # 3. state patching: every unit at a few positions, ours (batched, prefix state reused) vs patch_state per cell
    positions = [L * k // 8 - 1 for k in range(1, 8)] + [L - 2]  # spread over the prompt
    units = [k for k, _ in model.mixers()]
    fixed, _ = timed(lambda: patch(model, clean, corrupt, metric, what="state", positions=[L - 1], progress=False))
    t_state, st_res = timed(lambda: patch(model, clean, corrupt, metric, what="state", positions=positions, progress=False))
    sample = [units[0], units[n // 2], units[-1]]
    t_naive, naive_n, sdiff = 0.0, 0, 0.0
    for p in positions[1::3]:
        with torch.no_grad():
            _, st = model(clean[:, : p + 1], return_type=None, return_state=True)
        for u in sample:
            t, logits = timed(lambda: patch_state(model, corrupt, u, p, fn=lambda h: st[u].ssm))
            t_naive += t
            naive_n += 1
            v = float(metric(logits[:, -1])[0])
            got = st_res.frame.query("hook == @u and position == @p")["value"].item()
            sdiff = max(sdiff, abs(v - got))
    cells = len(units) * len(positions)
    per_ours, per_naive = t_state / cells, t_naive / naive_n
    marginal = (t_state - fixed) / cells
    print(f"state patching at positions {positions}: ours {t_state:.1f} s for {cells} cells ({per_ours:.3f} s/cell; "
          f"{marginal:.3f} s/cell after the fixed {fixed:.1f} s of a call); patch_state per cell {per_naive:.3f} s/cell "
          f"({naive_n} cells); ours {per_naive / per_ours:.1f}x faster ({per_naive / marginal:.1f}x per cell past the "
          f"fixed cost); max |difference| {sdiff:.2e}")


if __name__ == "__main__":
    main()
