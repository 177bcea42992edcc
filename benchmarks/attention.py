"""Benchmark: implicit_attention (vectorised, log-space, O(L²) per head) against an upstream-style
reference that loops over target t and source s and multiplies the per-step decays (O(L³)).

One Mamba-2 layer shaped like the 370M checkpoints (d_model 1024, expand 2, head_dim 64 -> H 32,
d_state 128, G 1), random weights, float32, 2 intra-op threads, CPU. Both sides compute the
per-head SSD map α [batch, H, pos, pos]; "ours" is timed end to end (its own forward, caching only
the block's hooks, included) and for the map alone from a cache, the reference for its loops alone
(from the same cache).
Then, one subprocess each, the peak RSS of implicit_attention at L = 2048 with reduce="mean" for kind
"s6" and "block", and reduce="absmean" for "block" (E = 2048 per-channel maps, accumulated chunk by
chunk; the "mean" of "block" sums channels by matrix products instead). Each is skipped if it takes
longer than --memory-timeout (120 s).

Long context (--long, one subprocess per run, ru_maxrss): the answer row (`analysis.answer_row`:
each branch's "block" map, the differential summary, the output-space norm of the whole operator
and of each branch term, and the answer-logit contributions) at --row-lengths tokens for one
370M-shaped Mamba-2 layer and one 370M-shaped Diff-Mamba-2 layer (the real 370M config: d_model
1024, expand 2, head_dim 64, d_state 128, n_groups 1; the differential branches get expand 1 and
head_dim 32, so H 32), and the output-space operator's Frobenius-norm map ‖O[t,s]‖_F over all
t, s at L = --frobenius-length (512) for the Diff-Mamba-2 layer.

    python benchmarks/attention.py [--lengths 64 128 256] [--repeats 5] [--no-memory] [--long]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.analysis.attention import attention_target, implicit_attention

SHAPE = dict(arch="mamba2", d_model=1024, n_layers=1, vocab_size=1024, d_state=128, head_dim=64, expand=2, n_groups=1)


def build(seed: int = 0) -> HookedMamba:
    torch.manual_seed(seed)
    return HookedMamba(MambaConfig(**SHAPE)).eval()


def naive_alpha(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Upstream style: α[:, h, t, s] = (C_t·B_s) · Π_{k=s+1..t} exp(Δ_k A_h) · Δ_s, loops over t and s.

    dt [b, L, H], A [H], B, C [b, L, G, N] -> [b, H, L, L]  (float32 here; upstream used fp16).
    """
    b, L, H = dt.shape
    G = B.shape[2]
    group = torch.arange(H) // (H // G)
    dA = torch.exp(dt * A)  # [b, L, H]  per-step decay
    out = torch.zeros(b, H, L, L, dtype=dt.dtype)
    for t in range(L):
        for s in range(t + 1):
            decay = torch.prod(dA[:, s + 1 : t + 1], dim=1)  # [b, H]   (empty product = 1)
            cb = (C[:, t] * B[:, s]).sum(-1)[:, group]  # [b, H]
            out[:, :, t, s] = cb * decay * dt[:, s]
    return out


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def speed(lengths: list[int], repeats: int, naive_repeats: int) -> None:
    model = build()
    print(f"layer: {SHAPE}, float32, threads={torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| L | ours, end to end (ms) | ours, map only (ms) | naive t,s loop (ms) | speed-up (map only) | max abs diff | max abs α |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for L in lengths:
        ids = torch.randint(0, SHAPE["vocab_size"], (1, L), generator=torch.Generator().manual_seed(L))
        implicit_attention(model, ids, 0)  # warm-up
        t_ours, ours = median_time(lambda: implicit_attention(model, ids, 0), repeats)
        target = attention_target(model, 0, None)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=target.hooks("s6"))
            cache = {k: cache[k] for k in target.hooks("s6")}
            t_map, ours_map = median_time(lambda: target.compute(cache, "s6", None, None), repeats)
            A = -torch.exp(model.blocks[0].mixer.A_log.float())
            args = (cache["blocks.0.mixer.hook_dt"], A, cache["blocks.0.mixer.hook_B"], cache["blocks.0.mixer.hook_C"])
            t_ref, ref = median_time(lambda: naive_alpha(*args), naive_repeats)
        assert torch.equal(ours, ours_map)
        diff = (ours - ref).abs().max().item()
        print(f"| {L} | {t_ours * 1e3:.1f} | {t_map * 1e3:.1f} | {t_ref * 1e3:.0f} | {t_ref / t_map:.0f}× | {diff:.2e} "
              f"| {ref.abs().max().item():.3g} |")
    print(f"\n(medians of {repeats} runs, naive {naive_repeats} runs)\n")


MEMORY_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, "benchmarks")
from attention import build, SHAPE
from diffmamba_interp.analysis.attention import implicit_attention
torch.set_num_threads(2)
kind, reduce, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = build()
ids = torch.randint(0, SHAPE["vocab_size"], (1, L), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids, return_type=None)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = implicit_attention(model, ids, 0, kind=kind, reduce=reduce)
dt = time.perf_counter() - t0
m = out if kind == "s6" else out.matrix
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(kind=kind, reduce=reduce, L=L, seconds=dt, base_mib=base / 1024, peak_mib=peak / 1024,
                      shape=list(m.shape), finite=bool(torch.isfinite(m).all()), upper_zero=bool((m.triu(1) == 0).all()))))
"""


def memory(L: int, runs: list[tuple[str, str]], timeout: float) -> None:
    print(f"peak memory, one 370M-shaped Mamba-2 layer, L = {L}, batch 1, default chunk (one subprocess each, ru_maxrss):\n")
    print("| kind | reduce | time (s) | RSS after model + forward (MiB) | peak RSS (MiB) | peak − baseline (MiB) | result |")
    print("|---|---|---:|---:|---:|---:|---|")
    for kind, reduce in runs:
        try:
            proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, reduce, str(L)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"| {kind} | {reduce} | > {timeout:.0f} | | | | not run to completion (over the time limit) |")
            continue
        if proc.returncode:
            err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"| {kind} | {reduce} | | | | | failed: {err} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {kind} | {reduce} | {r['seconds']:.1f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} "
              f"| {tuple(r['shape'])}, finite={r['finite']}, upper 0={r['upper_zero']} |")
    print()


LONG_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, "benchmarks")
from attention import SHAPE
from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.analysis.answer_row import answer_row
from diffmamba_interp.analysis.attention import implicit_attention
torch.set_num_threads(2)
what, arch, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = HookedMamba(MambaConfig(**{**SHAPE, "arch": arch, "diff_layers": "all"})).eval()
ids = torch.randint(0, SHAPE["vocab_size"], (1, L), generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if what == "row":
    res = answer_row(model, ids, 0, kind="block", reduce="mean", answer=7)
    out = {name: list(r.shape) for name, r in res.maps.items()}
    finite = all(bool(torch.isfinite(r).all()) for r in res.maps.values())
else:
    op = implicit_attention(model, ids, 0, kind="output")
    t1 = time.perf_counter()
    op._factor(None)
    factor = time.perf_counter() - t1
    F = op.frobenius()
    out = {"frobenius": list(F.shape), "factor_s": factor}
    finite = bool(torch.isfinite(F).all()) and bool((F.triu(1) == 0).all())
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
with torch.no_grad():
    model(ids, return_type=None)
fwd = time.perf_counter() - t1
print(json.dumps(dict(what=what, arch=arch, L=L, seconds=dt, forward_s=fwd, base_mib=base / 1024, peak_mib=peak / 1024,
                      out=out, finite=finite)))
"""


def long_context(lengths: list[int], frob_length: int, timeout: float) -> None:
    """Answer rows at long context and the full output-space norm map (module docstring)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine now: fp32 matmul 2048³ at {rate:.0f} GFLOP/s on 2 threads, load average {load:.2f}\n")
    print("answer row (every map of one layer at t = L − 1) and the output-space Frobenius map, one 370M-shaped "
          "layer, batch 1, float32, 2 threads, one subprocess each (ru_maxrss):\n")
    print("| what | layer | L | time (s) | plain forward alone (s) | RSS after model (MiB) | peak RSS (MiB) | peak − baseline (MiB) | result |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    runs = [("row", arch, L) for L in lengths for arch in ("mamba2", "diffmamba2")] + [("frobenius", "diffmamba2", frob_length)]
    for what, arch, L in runs:
        try:
            proc = subprocess.run([sys.executable, "-c", LONG_CHILD, what, arch, str(L)], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"| {what} | {arch} | {L} | > {timeout:.0f} | | | | | not run to completion (over the time limit) |")
            continue
        if proc.returncode:
            err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"| {what} | {arch} | {L} | | | | | | failed: {err} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if what == "row":
            result = f"{len(r['out'])} rows of {L}, finite={r['finite']}"
        else:
            result = (f"{tuple(r['out']['frobenius'])}, Gram matrix + Cholesky {r['out']['factor_s']:.1f} s, "
                      f"finite & causal={r['finite']}")
        print(f"| {what} | {arch} | {L} | {r['seconds']:.1f} | {r['forward_s']:.1f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} "
              f"| {r['peak_mib'] - r['base_mib']:.0f} | {result} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--memory-length", type=int, default=2048)
    p.add_argument("--memory-timeout", type=float, default=120.0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--long", action="store_true", help="only the long-context runs (answer rows, output-space norm map)")
    p.add_argument("--row-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--frobenius-length", type=int, default=512)
    p.add_argument("--long-timeout", type=float, default=900.0)
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.long:
        long_context(a.row_lengths, a.frobenius_length, a.long_timeout)
        return
    speed(a.lengths, a.repeats, a.naive_repeats)
    if not a.no_memory:
        memory(a.memory_length, [("s6", "mean"), ("block", "mean"), ("block", "absmean")], a.memory_timeout)


if __name__ == "__main__":
    main()
