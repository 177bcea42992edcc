"""The real decoding-step kernel on CPU: mamba-ssm's Triton `selective_state_update`, run by Triton's
interpreter (TRITON_INTERPRET=1), through our dispatch (`scan.selective_state_step` for S6 and
`scan.ssd_state_step` for SSD, which is the kernel's multi-head form with A, Δ and D tied across a
head's channels) against our PyTorch step in float64, and inside `HookedMamba.generate` for every
architecture against the same model on the PyTorch path.

Same set-up as tests/test_triton_ssd.py (tests/triton_cpu.py: kernels installed by `make triton-ssd`,
one child process per case, the CUDA extensions only import stand-ins that are never read from). Only
this kernel is taken in the child: `scan._use_kernels` is patched to say yes for
"selective_state_update" alone, so the conv step (a CUDA extension, `causal_conv1d_update`) and the
prefill scans stay on PyTorch. Errors are max |kernel − reference| / max |reference|.
"""

from __future__ import annotations

import pytest

import triton_cpu

pytestmark = pytest.mark.slow  # each case is a child process: ~5 s of imports + the interpreted kernel

# float32: one step is a handful of float32 operations per state entry and an N-term sum for y;
# measured ≤ 2e-7, so 1e-6 leaves a margin.
FP32_TOL = 1e-6
# bfloat16 inputs (identical in the reference), float32 arithmetic and state, y stored in bf16 (8-bit
# significand). Triton's interpreter converts float32 to bf16 on store by truncation (checked: every y
# equals the truncated float32 result; a GPU rounds to nearest, half this), so each y is off by less
# than 2^-7 of itself; measured 3e-3 to 6e-3 of max |y|.
BF16_TOL = 2.0**-7 + FP32_TOL


def _run(case: str) -> dict:
    return triton_cpu.run_case(__file__, case)


@pytest.mark.parametrize("form", ["s6", "ssd"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_through_our_dispatch(form, dtype):
    """One token from a random state, batch 2: y and the new state against our float64 PyTorch step on
    the same values (S6: E 40, N 16; SSD: H 4, P 8, N 16, G 2); the caller's state is left as it was,
    the kernel ran exactly once and is mamba-ssm's own function object."""
    r = _run(f"{form}_{dtype}")
    assert r["calls"] == 1 and r["same_kernel_object"] and r["state_kept"]
    tol = FP32_TOL if dtype == "float32" else BF16_TOL
    bad = {k: v for k, v in r["errors"].items() if not v <= tol}
    assert not bad, f"relative errors above {tol:.1e}: {bad}"
    assert r["y_dtype"] == f"torch.{dtype}" and r["state_dtype"] == "torch.float32"


def test_generate_on_the_kernel_equals_generate_on_pytorch():
    """Every architecture (tiny, perturbed, float32): greedy `generate` of 8 tokens for 2 prompts with the
    step kernel gives the tokens of the PyTorch path, each step's logits agree, and the kernel ran for
    every SSM unit at every step."""
    r = _run("generate")
    for arch, got in r["archs"].items():
        assert got["same_tokens"], arch
        assert got["calls"] == got["units"] * got["steps"] > 0, (arch, got)
        assert got["logits"] <= 1e-5, (arch, got)


# -- the cases (child side: python tests/test_triton_step.py CASE, with TRITON_INTERPRET=1) --------------
_rel = triton_cpu.rel_error


def _take_only_the_step_kernel(kernel):
    """Patch our dispatch (this child only) to use the step kernel on CPU tensors, through a wrapper
    that counts its calls. Returns (counter, whether gpu_kernels() found mamba-ssm's own function)."""
    from diffmamba_interp import scan

    kernels = scan.gpu_kernels()  # really imports mamba_ssm / causal_conv1d (their CUDA parts are stand-ins)
    same = kernels is not None and kernels.selective_state_update is kernel
    calls = {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return kernel(*args, **kwargs)

    kernels.selective_state_update = counted
    scan._use_kernels = lambda name, *args, **kwargs: name == "selective_state_update"
    return calls, same


def case_step(kernel, form: str, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    from diffmamba_interp import scan

    g = torch.Generator().manual_seed(0)
    f = getattr(torch, dtype)
    if form == "s6":
        b, E, N = 2, 40, 16
        t = {"state": torch.randn(b, E, N, generator=g), "u": torch.randn(b, E, generator=g),
             "dt": F.softplus(torch.randn(b, E, generator=g) - 1), "A": -torch.rand(E, N, generator=g) - 0.05,
             "B": torch.randn(b, N, generator=g), "C": torch.randn(b, N, generator=g), "D": torch.randn(E, generator=g)}
        step = scan.selective_state_step
    else:
        b, H, P, N, G = 2, 4, 8, 16, 2
        t = {"state": torch.randn(b, H, P, N, generator=g), "u": torch.randn(b, H, P, generator=g),
             "dt": F.softplus(torch.randn(b, H, generator=g) - 1), "A": -torch.rand(H, generator=g) - 0.05,
             "B": torch.randn(b, G, N, generator=g), "C": torch.randn(b, G, N, generator=g), "D": torch.randn(H, generator=g)}
        step = scan.ssd_state_step
    for k in ("u", "dt", "B", "C"):  # the model's activations in `dtype`; A, D, the state float32
        t[k] = t[k].to(f)
    order = ("state", "u", "dt", "A", "B", "C", "D")
    y_ref, new_ref = step(*(t[k].double() for k in order))  # before the patch: the PyTorch step
    calls, same = _take_only_the_step_kernel(kernel)
    before = t["state"].clone()
    y, new = step(*(t[k] for k in order))
    return {"errors": {"y": _rel(y, y_ref), "state": _rel(new, new_ref)}, "calls": calls["n"], "same_kernel_object": same,
            "state_kept": bool(torch.equal(t["state"], before)), "y_dtype": str(y.dtype), "state_dtype": str(new.dtype)}


def case_generate(kernel) -> dict:
    import torch

    from diffmamba_interp import HookedMamba, MambaConfig
    from diffmamba_interp.config import ARCHS
    from helpers import perturb_

    steps, out = 8, {}
    models = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        models[arch] = perturb_(HookedMamba(MambaConfig(arch=arch, d_model=16, n_layers=2, vocab_size=40, d_state=16,
                                                        head_dim=8, chunk_size=4, d_conv=3))).eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))

    def run(model, calls=None):
        """-> (generated tokens, the logits of `steps` explicit steps along them, kernel calls in those steps)."""
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=steps)
            _, state = model(ids, return_type=None, return_state=True)
            start, logits = calls["n"] if calls else 0, []
            for i in range(steps):
                lg, state = model.step(tokens[:, ids.shape[1] + i], state)
                logits.append(lg)
        return tokens, torch.stack(logits), (calls["n"] if calls else 0) - start

    ref = {arch: run(model) for arch, model in models.items()}  # PyTorch path
    calls, _ = _take_only_the_step_kernel(kernel)
    for arch, model in models.items():
        tokens, logits, n = run(model, calls)
        out[arch] = {"same_tokens": bool(torch.equal(tokens, ref[arch][0])), "logits": _rel(logits, ref[arch][1]),
                     "calls": n, "units": len(list(model.mixers())), "steps": steps}
    errors = {f"{arch}_logits": v["logits"] for arch, v in out.items()}
    return {"errors": errors, "archs": out}


CASES = {f"{form}_{dtype}": (lambda k, form=form, dtype=dtype: case_step(k, form, dtype))
         for form in ("s6", "ssd") for dtype in ("float32", "bfloat16")} | {"generate": case_generate}


if __name__ == "__main__":
    triton_cpu.child_main(CASES, triton_cpu.selective_state_update)
