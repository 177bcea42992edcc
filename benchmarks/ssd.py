"""Benchmark: the chunked SSD (Mamba-2 scan) in PyTorch, before and after the rewrite of issue 11.

    python benchmarks/ssd.py [--batch 1 --length 2048 --heads 32 --head-dim 64 --state 128 --groups 1
                              --chunk 256 --threads 2 --repeats 7]
    python benchmarks/ssd.py --states [--length 256 ...]   # per-position states, with peak memory
    python benchmarks/ssd.py --model [--length 512 ...]    # the 370M-shaped Mamba-2 forward, old vs new SSD

(a) "old": `ssd_old` below, a verbatim copy of `scan.ssd_torch` before issue 11 (all chunks at once;
    within-chunk decay exp(cumsum[l] − cumsum[s]); states through a [b, c, l, s, H, P] intermediate);
(b) "new": `diffmamba_interp.scan.ssd_torch` (chunk by chunk carrying the state; decays as products
    over each span; states by sub-blocks);
(c) "transformers": `mamba2_chunk_scan` of transformers' Mamba-2, the PyTorch SSD its Mamba2Mixer
    runs on CPU (the same computation as ssd_minimal.py), called on the same Δ (already softplus'd).

float32, one warm-up call each, then the repeats alternate between the methods so that load from
other processes hits all of them alike; prints a markdown table (median and min wall seconds, median
CPU seconds of the process, and the speed-up of the median CPU time vs (a): on a shared machine the
CPU time is the steadier measure) and the largest difference of each output to a float64 run of (b) (which the unit
tests check against a per-token float64 loop to ~1e-12). With --states each method runs in its own
subprocess, so that its peak RSS (ru_maxrss, minus the RSS after building the inputs) is its own.
With --model: transformers' Mamba2ForCausalLM (d 1024, 48 layers, N 128, P 64, expand 2, random
weights), our HookedMamba on the same weights with the new SSD, and the same HookedMamba with the old
SSD patched in (`mixers.ssd`), alternated as above.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from diffmamba_interp.scan import compute_dtype, ssd_torch

Tensor = torch.Tensor


# -- (a) the algorithm before issue 11, verbatim ------------------------------------------------
def decay_matrix(cum: Tensor) -> Tensor:
    T = cum.shape[-1]
    diff = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # [..., l, s]
    causal = torch.ones(T, T, dtype=torch.bool, device=cum.device).tril()
    return torch.exp(diff.masked_fill(~causal, -torch.inf))


def ssd_old(x, dt, A, B, C, D, *, chunk_size: int, return_states: bool = False):
    dtype = x.dtype
    f = compute_dtype(dtype)
    x, dt, A, B, C, D = (t.to(f) for t in (x, dt, A, B, C, D))
    b, L, H, P = x.shape
    G = B.shape[2]
    c = -(-L // chunk_size)  # chunks of at most chunk_size, as even as possible (padding < c)
    T = -(-L // c)
    pad = c * T - L
    Xdt = x * dt.unsqueeze(-1)  # [b, L, H, P]   Δ_s x_s
    Adt = A * dt  # [b, L, H]   log decay, ≤ 0
    if pad:
        Xdt = F.pad(Xdt, (0, 0, 0, 0, 0, pad))
        Adt = F.pad(Adt, (0, 0, 0, pad))
        B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
    Xdt = Xdt.view(b, c, T, G, H // G, P)  # heads split as (group, head-in-group)
    Bc = B.view(b, c, T, G, -1)  # [b, c, s, g, n]
    Cc = C.view(b, c, T, G, -1)  # [b, c, l, g, n]
    Acs = Adt.view(b, c, T, H).permute(0, 3, 1, 2)  # [b, h, c, l]
    Acum = torch.cumsum(Acs, dim=-1)  # [b, h, c, l]

    Lmask = decay_matrix(Acum).view(b, G, H // G, c, T, T)  # [b, g, j, c, l, s]
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # [b, g, c, l, s]
    M = CB.unsqueeze(2) * Lmask  # [b, g, j, c, l, s]
    Y = torch.einsum("bgjcls,bcsgjp->bclgjp", M, Xdt)

    decay_to_end = torch.exp(Acum[..., -1:] - Acum).view(b, G, H // G, c, T)  # [b, g, j, c, s]
    chunk_states = torch.einsum("bcsgn,bgjcs,bcsgjp->bcgjpn", Bc, decay_to_end, Xdt)

    zeros = torch.zeros_like(chunk_states[:, :1])
    chunk_states = torch.cat([zeros, chunk_states], dim=1)  # [b, c+1, g, j, p, n]
    chunk_cum = torch.cumsum(F.pad(Acum[..., -1], (1, 0)), dim=-1)  # [b, h, c+1]
    decay_chunk = decay_matrix(chunk_cum).view(b, G, H // G, c + 1, c + 1)
    starts = torch.einsum("bgjzc,bcgjpn->bzgjpn", decay_chunk, chunk_states)[:, :-1]  # [b, c, g, j, p, n]

    decay_from_start = torch.exp(Acum).view(b, G, H // G, c, T)  # [b, g, j, c, l]
    Y = Y + torch.einsum("bclgn,bcgjpn,bgjcl->bclgjp", Cc, starts, decay_from_start)
    y = Y.reshape(b, c * T, H, P)[:, :L] + D.view(H, 1) * x

    states = None
    if return_states:
        local = torch.einsum("bgjcls,bcsgjp,bcsgn->bclgjpn", Lmask, Xdt, Bc)
        carried = torch.einsum("bgjcl,bcgjpn->bclgjpn", decay_from_start, starts)
        states = (local + carried).reshape(b, c * T, H, P, -1)[:, :L]
    return y.to(dtype), states


# -- inputs and methods -------------------------------------------------------------------------
def make_inputs(args, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b, L, H, P, N, G = args.batch, args.length, args.heads, args.head_dim, args.state, args.groups
    x = torch.randn(b, L, H, P, generator=g)
    dt = F.softplus(torch.randn(b, L, H, generator=g) - 3.0)  # typical Δ: positive, mostly small
    A = -torch.exp(torch.rand(H, generator=g) * 2.77)  # A ∈ [−16, −1], Mamba-2's init range
    B = torch.randn(b, L, G, N, generator=g)
    C = torch.randn(b, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return [t.to(dtype) for t in (x, dt, A, B, C, D)]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def y_states(out):
    return out.y, out.states


def methods(args, inputs, states=False):
    T = args.chunk
    out = {
        f"(a) old ssd_torch (chunk {T})": lambda: ssd_old(*inputs, chunk_size=T, return_states=states),
        f"(b) new ssd_torch (chunk {T})": lambda: y_states(ssd_torch(*inputs, chunk_size=T, return_states=states)),
    }
    if not states:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

        x, dt, A, B, C, D = inputs
        out[f"(c) transformers mamba2_chunk_scan (chunk {T})"] = lambda: (mamba2_chunk_scan(x, dt, A, B, C, T, D=D), None)
        for T2 in args.extra_chunks:
            out[f"(b) new ssd_torch (chunk {T2})"] = lambda T2=T2: y_states(ssd_torch(*inputs, chunk_size=T2))
    return out


def strong_decay_check() -> str:
    """The issue-11 precision case: Δ = 1000.1 for 30 steps, then 0.7 (L 32, one head, A = −1)."""
    L = 32
    dt = torch.full((1, L, 1), 0.7)
    dt[:, :30] = 1000.1
    ones = torch.ones(1, L, 1, 1)
    args = [ones, dt, -torch.ones(1), ones, ones, torch.zeros(1)]
    truth = ssd_torch(*(t.double() for t in args), chunk_size=32).y[0, -1].item()
    old = ssd_old(*args, chunk_size=32)[0][0, -1].item()
    new = ssd_torch(*args, chunk_size=32).y[0, -1].item()
    return (f"strong decay (L 32, float32): truth {truth:.6f}; old {old:.6f} (rel {abs(old - truth) / truth:.1e}); "
            f"new {new:.6f} (rel {abs(new - truth) / truth:.1e})")


def time_methods(args) -> None:
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args)
    fns = methods(args, inputs)
    times = {name: [] for name in fns}
    outputs = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()[0]
            print(f"warm-up {name}: {time.perf_counter() - start:.3f} s", file=sys.stderr)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(timed(fn))
        ref = ssd_torch(*(t.double() for t in inputs), chunk_size=args.chunk).y
    b, L, H, P, N, G = args.batch, args.length, args.heads, args.head_dim, args.state, args.groups
    print(f"\nSSD, batch {b}, L {L}, H {H}, P {P}, N {N}, G {G}, float32, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternating repeats, load average before/after: {args.load} / {load()}\n")
    base = statistics.median(c for _, c in next(iter(times.values())))
    print("| method | median wall s | min wall s | median CPU s | speed-up vs (a), CPU | max abs diff to float64 |")
    print("|---|---|---|---|---|---|")
    scale = ref.abs().max().item()
    for name, ts in times.items():
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        diff = (outputs[name].double() - ref).abs().max().item()
        print(f"| {name} | {wall:.4f} | {min(w for w, _ in ts):.4f} | {cpu:.4f} | {base / cpu:.2f}× | {diff:.1e} |")
    print(f"\nmax |y| = {scale:.2f}; {strong_decay_check()}")


def states_child(args, which: str) -> None:
    """One method with return_states, in this (fresh) process: prints a JSON line."""
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = next(f for name, f in methods(args, inputs, states=True).items() if name.startswith(which))
    ts = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            ts.append(timed(fn))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
    print(json.dumps({"median": statistics.median(w for w, _ in ts), "cpu": statistics.median(c for _, c in ts),
                      "peak_mib": peak / 1024}))


def time_states(args) -> None:
    b, L, H, P, N = args.batch, args.length, args.heads, args.head_dim, args.state
    states_mib = b * L * H * P * N * 4 / 2**20
    print(f"\nSSD with per-position states, batch {b}, L {L}, H {H}, P {P}, N {N}, G {args.groups}, chunk {args.chunk}, "
          f"float32, {args.threads} threads, {args.repeats} repeats in a fresh process per method; the states "
          f"tensor is {states_mib:.0f} MiB; load average before: {args.load}\n")
    print("| method | median wall s | median CPU s | peak RSS over inputs (MiB) | peak / states |")
    print("|---|---|---|---|---|")
    for which in ("(a)", "(b)"):
        cmd = [sys.executable, __file__, "--child", which, *sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {which} {'old' if which == '(a)' else 'new'} ssd_torch | {r['median']:.3f} | {r['cpu']:.3f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] / states_mib:.2f} |")
    print(f"\nload average after: {load()}")


def time_model(args) -> None:
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.utils import logging as hf_logging

    from diffmamba_interp import HookedMamba, mixers
    from diffmamba_interp import MambaConfig as OurConfig
    from diffmamba_interp.keys import to_ours

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    vocab = 50280
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=1024, state_size=128, head_dim=64, num_heads=32,
                                        num_hidden_layers=48, n_groups=1, chunk_size=args.chunk)).eval()
    ours = HookedMamba(OurConfig.from_hf_dict(hf.config.to_dict()))
    ours.load_state_dict(to_ours(hf.state_dict())[0])
    ours.eval()
    ids = torch.randint(0, vocab, (args.batch, args.length))
    new_ssd = mixers.ssd

    def old_ssd(x, dt, A, B, C, D, *, chunk_size, return_states=False, **_):
        return ssd_old(x, dt, A, B, C, D, chunk_size=chunk_size, return_states=return_states) + ("torch",)

    def with_ssd(fn):
        def run():
            mixers.ssd = fn
            try:
                return ours(ids)
            finally:
                mixers.ssd = new_ssd
        return run

    runs = {"transformers": lambda: hf(ids).logits, "ours, new SSD": with_ssd(new_ssd), "ours, old SSD": with_ssd(old_ssd)}
    with torch.no_grad():
        outs = {k: fn() for k, fn in runs.items()}  # also the warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(timed(fn))
    print(f"\nMamba-2 370M-shaped (d 1024, 48 layers, N 128, P 64, chunk {args.chunk}), {args.batch}x{args.length}, "
          f"float32, {args.threads} threads, {args.repeats} alternating repeats, load average before/after: "
          f"{args.load} / {load()}\n")
    base = statistics.median(c for _, c in times["transformers"])
    ref = outs["transformers"]
    print("| run | median wall s | min wall s | median CPU s | × transformers, CPU | max relative logit difference to transformers |")
    print("|---|---|---|---|---|---|")
    for k, ts in times.items():
        err = ((outs[k] - ref).abs().max() / ref.abs().max()).item()
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        print(f"| {k} | {wall:.3f} | {min(w for w, _ in ts):.3f} | {cpu:.3f} | {cpu / base:.2f} | {err:.1e} |")


def load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--extra-chunks", type=lambda s: [int(v) for v in s.split(",") if v], default=[128, 64],
                        help="chunk sizes at which to time (b) as well")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--states", action="store_true", help="time return_states=True and measure peak memory")
    parser.add_argument("--model", action="store_true", help="time the 370M-shaped Mamba-2 forward, old vs new SSD")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.load = load()
    if args.child:
        states_child(args, args.child)
    elif args.states:
        time_states(args)
    elif args.model:
        time_model(args)
    else:
        time_methods(args)


if __name__ == "__main__":
    main()
