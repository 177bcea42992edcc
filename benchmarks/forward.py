"""Forward-pass speed: HookedMamba vs transformers' MambaForCausalLM / Mamba2ForCausalLM on CPU.

Same random weights in both (ours loaded from the transformers state dict), 2 threads, runs
alternated and medians taken. Also our full-cache forward (every hook but hook_ssm_state).

    python benchmarks/forward.py            # both shapes (a few minutes on 2 cores)
    python benchmarks/forward.py --quick    # small shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

from diffmamba_interp import HookedMamba
from diffmamba_interp.loading.hf import read_hf_config
from diffmamba_interp.loading.keys import KEYS


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = min(_time(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / t / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def linear_flops(model: torch.nn.Module, tokens: int) -> float:
    """2·params·tokens over every Linear (in_proj, x_proj, dt_proj, out_proj, lm_head)."""
    return sum(2 * m.weight.numel() * tokens for m in model.modules() if isinstance(m, torch.nn.Linear))


def bench(name: str, hf, ids: torch.Tensor, reps: int) -> list[dict]:
    hf.eval()
    ours = HookedMamba(read_hf_config(hf.config.to_dict()))
    ours.load_state_dict(KEYS.to_ours(hf.state_dict())[0])
    ours.eval()
    not_state = lambda n: not n.endswith("hook_ssm_state")  # noqa: E731
    runs = {
        "transformers": lambda: hf(ids).logits,
        "ours": lambda: ours(ids),
        "ours, full cache": lambda: ours.run_with_cache(ids, names_filter=not_state)[0],
    }
    with torch.no_grad():
        ref, out = runs["transformers"](), runs["ours"]()
        err = ((ref - out).abs().max() / ref.abs().max()).item()
        for fn in runs.values():  # warm-up (numba JIT, allocator)
            fn()
        times = {k: [] for k in runs}
        for _ in range(reps):
            for k, fn in runs.items():
                times[k].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = linear_flops(ours, ids.numel())
    print(f"{name}: max relative logit difference {err:.2e}, scan path {ours.last_path}")
    return [
        {"shape": name, "run": k, "median_s": med[k], "vs_transformers": med[k] / med["transformers"],
         "vs_ours": med[k] / med["ours"], "linear_gflops": flops / med[k] / 1e9}
        for k in runs
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    q = args.quick
    vocab = 1000 if q else 50280
    m1 = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=128 if q else 768, state_size=16,
                                      num_hidden_layers=2 if q else 24))
    L1 = 128 if q else 1024
    m2 = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=128 if q else 1024, state_size=128, head_dim=64,
                                        num_heads=(256 if q else 2048) // 64, num_hidden_layers=2 if q else 48,
                                        n_groups=1, chunk_size=256))
    L2 = 128 if q else 512
    rows = bench(f"Mamba-1 {'d128 2L' if q else '130M-shaped (d 768, 24 L, N 16)'} 1x{L1}", m1, torch.randint(0, vocab, (1, L1)), args.reps)
    del m1
    rows += bench(f"Mamba-2 {'d128 2L' if q else '370M-shaped (d 1024, 48 L, N 128, P 64)'} 1x{L2}", m2, torch.randint(0, vocab, (1, L2)), args.reps)
    peak = matmul_gflops()
    print(f"\nthreads {args.threads}; measured fp32 matmul rate (2048^3): {peak:.1f} GFLOP/s\n")
    print("| shape | run | median s | × transformers | × ours plain | linear-layer GFLOP/s (% of matmul rate) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['run']} | {r['median_s']:.3f} | {r['vs_transformers']:.2f} | {r['vs_ours']:.2f} | "
              f"{r['linear_gflops']:.1f} ({100 * r['linear_gflops'] / peak:.0f}%) |")


if __name__ == "__main__":
    main()
