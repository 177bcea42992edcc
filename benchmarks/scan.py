"""Benchmark: three CPU implementations of the Mamba-1 (S6) selective scan.

    python benchmarks/scan.py [--batch 1 --length 1024 --channels 1536 --state 16 --repeats 7]

(a) "loop": transformers' MambaMixer.slow_forward, a Python loop over the L positions after
    materialising exp(Δ A) and Δ B u as [batch, E, L, N];
(b) "chunked": `selective_scan_chunked` below, a two-level scan with T + 2·L/T Python steps;
(c) "numba": `diffmamba_interp.cpu_scan.selective_scan_numba`, the compiled kernel.

All run on 2 threads (torch.set_num_threads(2); the numba scan follows torch's thread count),
float32, after one warm-up call each (which also compiles or loads the numba kernel); the repeats
alternate between the methods so that load from other processes hits all of them alike. The script
prints a markdown table (median and min seconds, speed-up of the median vs the loop) and checks that
the three outputs agree.

Run it on an otherwise idle machine. With both cores busy elsewhere, (b) slowed down 10-25x in our
runs (its large ops run on 2 OpenMP threads that wait for each other; with --threads 1 it was back
to ~0.25 s), while (a), whose per-step ops are below torch's parallel grain size, and (c) slowed ~2x.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from diffmamba_interp.cpu_scan import selective_scan_numba

Tensor = torch.Tensor


def selective_scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """transformers' MambaMixer.slow_forward scan (ssm part only), in this module's [batch, L, E] layout.

    u, delta [b, L, E]; A [E, N]; B, C [b, L, N]; D [E] -> y [b, L, E].
    """
    hidden_states = u.transpose(1, 2)  # [b, E, L]
    discrete_time_step = delta.transpose(1, 2)  # [b, E, L]
    batch_size, _, seq_len = hidden_states.shape
    discrete_A = torch.exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])  # [b, E, L, N]
    discrete_B = discrete_time_step[:, :, :, None] * B[:, None, :, :]  # [b, E, L, N]
    deltaB_u = discrete_B * hidden_states[:, :, :, None]
    ssm_state = torch.zeros(batch_size, A.shape[0], A.shape[1], dtype=u.dtype)
    scan_outputs = []
    for i in range(seq_len):
        ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]  # [b, E, N]
        scan_output = torch.matmul(ssm_state, C[:, i, :].unsqueeze(-1))  # [b, E, 1]
        scan_outputs.append(scan_output[:, :, 0])
    scan_output = torch.stack(scan_outputs, dim=-1)  # [b, E, L]
    scan_output = scan_output + hidden_states * D[None, :, None]
    return scan_output.transpose(1, 2)


def selective_scan_chunked(u, delta, A, B, C, D, chunk_size: int = 32, return_states: bool = False):
    """The S6 selective scan as a two-level scan in PyTorch: T + c + T Python steps instead of L.

        h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t    (h_{-1} = 0),   y_t = C_t . h_t + D * u_t

    Shapes: u, delta [b, L, E]; A [E, N]; B, C [b, L, N]; D [E]
            -> y [b, L, E] (u's dtype), and with return_states=True (y, states [b, L, E, N]).
    Accumulates in float32 (float64 for float64 inputs).

    L is split into c = ceil(L / T) chunks of T = chunk_size positions (the tail is padded with
    delta = 0, which leaves the state unchanged). Writing P_t = exp(A * sum_{chunk start <= s <= t} delta_s)
    for the decay since the chunk's start, every state splits into a local part and a carried part:
        h_t = h_t^local + P_t * h_start(chunk),
    1. local pass, T steps: the recurrence from a zero state, for all c chunks at once ([b, c, E, N]
       per step); gives y^local_t = C_t . h_t^local and each chunk's end state;
    2. carry pass, c steps: h_start(k+1) = P_end(k) * h_start(k) + h_end^local(k);
    3. correction pass, T steps: y_t += C_t . (P_t * h_start), again for all chunks at once.
    Only exponentials of non-positive numbers appear (no overflow). Per step it holds [b, c, E, N],
    never [b, L, E, N] (unless the states are asked for). A good chunk size is about sqrt(L).
    """
    dtype = u.dtype
    f = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C, D = (t.to(f) for t in (u, delta, A, B, C, D))
    b, L, E = u.shape
    N = A.shape[1]
    T = max(1, min(chunk_size, L))
    c = -(-L // T)
    pad = c * T - L
    du = delta * u  # [b, L, E]
    if pad:
        delta, du = (F.pad(t, (0, 0, 0, pad)) for t in (delta, du))
        B, C = (F.pad(t, (0, 0, 0, pad)) for t in (B, C))
    delta, du = delta.view(b, c, T, E), du.view(b, c, T, E)
    B, C = B.view(b, c, T, N), C.view(b, c, T, N)
    cum = torch.cumsum(delta, dim=2)  # [b, c, T, E]  delta summed from the chunk's start

    y = torch.empty(b, c, T, E, dtype=f)
    states = torch.empty(b, c, T, E, N, dtype=f) if return_states else None
    h = torch.zeros(b, c, E, N, dtype=f)
    for t in range(T):  # 1. local pass, all chunks in parallel
        h = torch.exp(delta[:, :, t, :, None] * A) * h + du[:, :, t, :, None] * B[:, :, t, None, :]
        y[:, :, t] = torch.matmul(h, C[:, :, t, :, None])[..., 0]
        if return_states:
            states[:, :, t] = h

    decay = torch.exp(cum[:, :, -1, :, None] * A)  # [b, c, E, N]  whole-chunk decay
    starts = torch.empty(b, c, E, N, dtype=f)
    start = torch.zeros(b, E, N, dtype=f)
    for k in range(c):  # 2. carry pass over chunks
        starts[:, k] = start
        start = decay[:, k] * start + h[:, k]

    for t in range(T):  # 3. add the carried state's contribution
        carried = torch.exp(cum[:, :, t, :, None] * A) * starts  # [b, c, E, N]
        y[:, :, t] += torch.matmul(carried, C[:, :, t, :, None])[..., 0]
        if return_states:
            states[:, :, t] += carried

    y = y.view(b, c * T, E)[:, :L] + D * u
    if return_states:
        return y.to(dtype), states.view(b, c * T, E, N)[:, :L]
    return y.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=1536)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    b, L, E, N = args.batch, args.length, args.channels, args.state
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, L, E, generator=g)
    delta = F.softplus(torch.randn(b, L, E, generator=g) - 3.0)  # typical Δ: positive, mostly small
    A = -torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N)
                   + 0.1 * torch.randn(E, N, generator=g))  # Mamba's S4D-real init, perturbed
    B = torch.randn(b, L, N, generator=g)
    C = torch.randn(b, L, N, generator=g)
    D = torch.randn(E, generator=g)
    inputs = (u, delta, A, B, C, D)

    methods = {
        "(a) PyTorch per-token loop (transformers slow_forward)": lambda: selective_scan_loop(*inputs),
        f"(b) PyTorch chunked two-level scan (T={args.chunk_size})": lambda: selective_scan_chunked(
            *inputs, chunk_size=args.chunk_size),
        "(c) numba kernel (cpu_scan.selective_scan_numba)": lambda: selective_scan_numba(*inputs),
    }
    times = {name: [] for name in methods}
    outputs = {}
    with torch.inference_mode():
        for name, fn in methods.items():  # warm-up (and JIT compile / cache load)
            start = time.perf_counter()
            outputs[name] = fn()
            print(f"warm-up {name}: {time.perf_counter() - start:.3f} s")
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    print(f"\nS6 selective scan, batch {b}, L {L}, E {E}, N {N}, float32, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternating repeats\n")
    loop = statistics.median(next(iter(times.values())))
    print("| method | median s | min s | speed-up vs loop |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.4f} | {min(ts):.4f} | {loop / med:.1f}x |")

    ref = next(iter(outputs.values())).double()
    scale = ref.abs().max().item()
    print(f"\nagreement with (a), max |y| = {scale:.3f}:")
    ok = True
    for name, y in list(outputs.items())[1:]:
        diff = (y.double() - ref).abs().max().item()
        ok &= diff <= 1e-4 * scale and math.isfinite(diff)
        print(f"  {name}: max abs diff {diff:.3e} (relative to max |y|: {diff / scale:.1e})")
    with torch.inference_mode():  # and in float64, against each other
        y64 = [fn() for fn in (lambda: selective_scan_loop(*(t.double() for t in inputs)),
                               lambda: selective_scan_chunked(*(t.double() for t in inputs), chunk_size=args.chunk_size),
                               lambda: selective_scan_numba(*(t.double() for t in inputs)))]
    d64 = max((y - y64[0]).abs().max().item() for y in y64[1:])
    ok &= d64 <= 1e-10 * scale
    print(f"  float64: max abs diff of (b), (c) vs (a): {d64:.3e}")
    if not ok:
        raise SystemExit("the three scans disagree")


if __name__ == "__main__":
    main()
