"""Long prompts in recurrent mode: the logit lens at the last position of 8k / 32k / 128k-token
prompts, chunked (state carried, only the read position kept) against one unchunked forward, and
decoding speed against transformers' `generate` on the same weights.

Each measurement runs in its own subprocess, so its peak RSS (ru_maxrss, whole process: weights,
activations, Python) is its own. Random weights in the published shapes:
- 130M-shaped Mamba-1: d 768, 24 layers, vocab 50280, N 16 (state-spaces/mamba-130m);
- 370M-shaped Diff-Mamba-2: d 1024, 48 layers, head_dim 64, N 128, vocab 50280, alternate layers.

    python benchmarks/long_context.py                         # 130M at 8k, 32k, 128k; 370M at 8k, 32k
    python benchmarks/long_context.py --models mamba130m --lengths 8192 32768
    python benchmarks/long_context.py --decode                # ms per generated token vs transformers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {
    "mamba130m": dict(arch="mamba1", d_model=768, n_layers=24, vocab_size=50280, d_state=16, expand=2),
    "diffmamba370m": dict(arch="diffmamba2", d_model=1024, n_layers=48, vocab_size=50280, d_state=128, expand=2,
                          head_dim=64, n_groups=1, chunk_size=256, diff_layers="alternate"),
}

CHILD = r"""
import json, resource, sys, time, torch
from diffmamba_interp import HookedMamba, MambaConfig
from diffmamba_interp.analysis.lens import logit_lens
torch.manual_seed(0)
shape, L, mode, chunk = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model = HookedMamba(MambaConfig(**shape)).eval()
ids = torch.randint(0, shape["vocab_size"], (1, L), generator=torch.Generator().manual_seed(1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with torch.no_grad():
    if mode == "chunked":
        lp = logit_lens(model, ids, positions=[-1], chunk_size=chunk)[-1, 0, 0]
    else:  # one unchunked forward that builds the [1, L, vocab] logits, as before recurrent mode
        lp = torch.log_softmax(model(ids)[0, -1].float(), -1)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": wall, "peak_rss_gb": peak / 2**20, "weights_rss_gb": base / 2**20, "top": int(lp.argmax())}))
"""

DECODE = r"""
import json, sys, time, torch, transformers
from diffmamba_interp import HookedMamba
from diffmamba_interp.loading.hf import read_hf_config
from diffmamba_interp.loading.keys import KEYS
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[2]))
kind, new, L = sys.argv[1], 32, 256
if kind == "mamba130m":
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24))
else:  # "diffmamba370m": decoding is against transformers, which has no Diff-Mamba, so a Mamba-2 of that shape
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(vocab_size=50280, hidden_size=1024, state_size=128,
        num_hidden_layers=48, head_dim=64, num_heads=32, expand=2, n_groups=1, chunk_size=256))
hf.eval()
ours = HookedMamba(read_hf_config(hf.config.to_dict()))
ours.load_state_dict(KEYS.to_ours(hf.state_dict())[0])
ours.eval()
ids = torch.randint(0, 50280, (1, L), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
# Per generated token: the median interval between consecutive decoding steps inside one `generate`
# call (our `step`, transformers' logits processors: each runs once per new token), over three
# alternating rounds, so the prefill and its noise are not in it.
marks = []
class Mark(transformers.LogitsProcessor):
    def __call__(self, input_ids, scores):
        marks.append(time.perf_counter()); return scores
step = ours.step
def marked_step(*a, **k):
    marks.append(time.perf_counter()); return step(*a, **k)
ours.step = marked_step
def intervals(fn):
    marks.clear(); out = fn(); return [b - a for a, b in zip(marks, marks[1:])], out
hf_gen = lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                               logits_processor=transformers.LogitsProcessorList([Mark()]))
with torch.no_grad():
    ours.generate(ids[:, :8], max_new_tokens=2); hf.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
    o_int, h_int = [], []
    for _ in range(3):
        d, a = intervals(lambda: ours.generate(ids, max_new_tokens=new)); o_int += d
        d, b = intervals(lambda: hf_gen(new)); h_int += d
    # the floor both share: every linear layer once on one token (batch-1 decoding reads each weight once)
    lins = [(m, torch.randn(1, 1, m.in_features)) for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    floor = []
    for _ in range(7):
        t = time.perf_counter()
        for m, x in lins:
            m(x)
        floor.append(time.perf_counter() - t)
    t = time.perf_counter(); ours.generate(ids, max_new_tokens=1); tp = time.perf_counter() - t
    t = time.perf_counter(); ours(ids, return_type=None); tf = time.perf_counter() - t
med = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({"ours_ms_per_token": 1e3 * med(o_int), "hf_ms_per_token": 1e3 * med(h_int), "linear_ms": 1e3 * med(floor),
                  "same_tokens": bool(torch.equal(a, b)), "prefill_tok_s": L / tp, "forward_tok_s": L / tf}))
"""


def child(code: str, args: list[str], timeout: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unchunked-max", type=int, default=8192, help="Longest prompt also run unchunked.")
    ap.add_argument("--decode", action="store_true", help="Decoding speed against transformers instead.")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    if args.decode:
        print("| model | ours ms/token | transformers ms/token | ratio | linear layers alone, ms (× transformers) "
              "| same tokens | prefill tok/s (chunked) | forward tok/s |")
        print("|---|---:|---:|---:|---:|---|---:|---:|")
        for name in args.models:
            r = child(DECODE, [name, str(args.threads)], args.timeout)
            if "error" in r:
                print(f"| {name} | error: {r['error']} |")
                continue
            print(f"| {name} | {r['ours_ms_per_token']:.1f} | {r['hf_ms_per_token']:.1f} | "
                  f"{r['ours_ms_per_token'] / r['hf_ms_per_token']:.2f}× | {r['linear_ms']:.1f} "
                  f"({r['linear_ms'] / r['hf_ms_per_token']:.2f}×) | {r['same_tokens']} | {r['prefill_tok_s']:.0f} | "
                  f"{r['forward_tok_s']:.0f} |")
        return
    print(f"logit lens at the last position, batch 1, {args.threads} threads, chunk {args.chunk} (one subprocess per row)\n")
    print("| model | tokens | mode | wall (s) | peak RSS (GB) | RSS after weights (GB) |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        lengths = args.lengths or ([8192, 32768, 131072] if name == "mamba130m" else [8192, 32768])
        for L in lengths:
            modes = ["chunked"] + (["unchunked"] if L <= args.unchunked_max else [])
            for mode in modes:
                r = child(CHILD, [json.dumps(SHAPES[name]), str(L), mode, str(args.chunk), str(args.threads)], args.timeout)
                if "error" in r:
                    print(f"| {name} | {L} | {mode} | error: {r['error']} | | |", flush=True)
                    continue
                print(f"| {name} | {L} | {mode} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['weights_rss_gb']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
