"""The real Mamba-2 Triton SSD kernel on CPU: mamba-ssm's `mamba_chunk_scan_combined`, run by Triton's
interpreter (TRITON_INTERPRET=1), forward and backward, against our PyTorch SSD (`scan.ssd_torch`,
SPEC §1) and against a float64 step-by-step loop.

The kernel code under test is mamba_ssm/ops/triton/ssd_*.py as released (mamba-ssm 2.3.2.post1 with
triton 3.7.1, installed by `make triton-ssd` = scripts/install_triton_ssd.sh into .venv/triton-ssd, a
directory only these child processes put on their path); the interpreter executes each Triton program
with numpy instead of compiling it for a GPU. tests/triton_cpu.py lists the four
workarounds this needs and the import stand-ins for the CUDA extension modules (never called: every
case checks that nothing was read from them).

Each test runs one case in a child process (`python tests/test_triton_ssd.py CASE`): TRITON_INTERPRET
must be set before triton is imported, and triton_cpu.setup() patches torch.cuda / triton process-wide,
so none of this may happen inside a pytest worker that runs other tests. The child prints its measured
errors as JSON; the test asserts on them. Errors are "max |kernel − reference| / max |reference|" per
tensor, the reference being ssd_torch (or the loop) in float64 on the same inputs, with float64 autograd
for the gradients.
"""

from __future__ import annotations

import pytest

import triton_cpu

pytestmark = pytest.mark.slow  # each case is a child process: ~5 s of imports + the interpreted kernels

# fp32: the kernel and the float64 reference differ only by float32 rounding (unit roundoff 2^-24 ≈ 6e-8)
# in sums over ≤ chunk_size source positions × d_state products plus the carried states, which partly
# cancel. Measured: ≤ 4e-7 (about 3 float32 epsilons) for y and every gradient; 5e-6 leaves a margin.
FP32_TOL = 5e-6
# bf16 (8-bit significand: round to nearest is off by up to 2^-9 of a value; Triton's interpreter
# truncates on store instead, up to 2^-8): besides the bf16 inputs (identical in the reference), the
# kernel rounds to bf16 the decay·Δ-weighted C·B matrix and B·Δ·decay before each tensor-core dot, the
# carried chunk states before they meet C, and the output y (the gradients likewise in backward; dx, dB,
# dC come back in bf16). Each term of a sum so carries a few 2^-9 of relative error, and the sums partly
# cancel (|y| is a few times smaller than Σ|terms|); float32 accumulation keeps the sums themselves exact
# to ~1e-7. Measured over seven input seeds: 1 to 7 × 2^-9 (dB and dC the largest), so 16 × 2^-9 ≈ 3.1e-2
# of the tensor's magnitude is the bound, with a margin of two.
BF16_TOL = 16 * 2.0**-9

# Names of the kernel's gradients as reported by the child.
GRADS = ("dx", "ddt", "dA", "dB", "dC", "dD")


def _run(case: str) -> dict:
    return triton_cpu.run_case(__file__, case)


def _check(errors: dict, names, tol: float):
    bad = {k: errors[k] for k in names if not errors[k] <= tol}
    assert not bad, f"relative errors above {tol:.1e}: {bad} (all: {errors})"


# -- the tests (parent side) -----------------------------------------------------------------------------
def test_fp32_as_our_model_calls_it():
    """Δ already softplus'ed (dt_bias=None, dt_softplus=False, as our Mamba-2 mixer computes it), D [H],
    grouped B/C (G = 2 < H = 4), L = 50 not a multiple of chunk_size 16: y and dx, dΔ, dA, dB, dC, dD."""
    r = _run("fp32")
    _check(r["errors"], ("y", *GRADS), FP32_TOL)


def test_fp32_with_dt_bias_and_softplus_inside_the_kernel():
    """mamba-ssm's own layout: raw dt, dt_bias and dt_softplus=True, against ssd_torch(softplus(dt + dt_bias)),
    including the gradient of dt_bias (G = 2, L = 40, chunk_size 16, D [H, P] broadcast from D [H])."""
    r = _run("fp32_softplus")
    _check(r["errors"], ("y", *GRADS, "ddt_bias"), FP32_TOL)


def test_fp32_initial_and_final_states_against_a_float64_loop():
    """initial_states= and return_final_states=True, against a float64 step-by-step loop (checked against
    ssd_torch with a zero start state first): y, final state, and the gradients including d initial_states
    (the loss reads both y and the final state)."""
    r = _run("fp32_states")
    assert r["errors"]["loop_vs_ssd_torch"] <= 1e-12  # the loop itself is right
    _check(r["errors"], ("y", "final_state", *GRADS, "dinitial_states"), FP32_TOL)
    # the kernel against ssd_torch(initial_state=...) as well
    _check(r["errors"], [k for k in r["errors"] if k.endswith("_vs_ssd_torch")], FP32_TOL)


def test_bf16_forward_backward():
    """bf16 x, Δ, B, C (A, D float32, as our dispatch passes them), G = 2, L = 50, chunk_size 16, with an
    initial state: the kernel against float64 references on the same bf16 values, within BF16_TOL."""
    r = _run("bf16")
    _check(r["errors"], ("y", "final_state", *GRADS, "dinitial_states"), BF16_TOL)
    _check(r["errors"], [k for k in r["errors"] if k.endswith("_vs_ssd_torch")], BF16_TOL)
    assert r["dtypes"]["y"] == "torch.bfloat16" and r["dtypes"]["dx"] == "torch.bfloat16"


def test_through_our_dispatch_argument_layout():
    """`scan.ssd` with `scan._use_kernels` patched to True in the child (it only picks the kernels for CUDA
    tensors): the call goes through the dispatch branch, which calls the kernel function object that
    `scan.gpu_kernels()` returns (asserted to be mamba-ssm's real `mamba_chunk_scan_combined`), with the
    argument layout our model uses (contiguous x/dt/B/C, A.float(), D.float(), dt_softplus=False).
    fp32 with G = 1, L = 37 and chunk_size 8, forward and autograd backward through `ssd`; then with
    initial_state= / return_final_state= (recurrent mode), against naive_ssd."""
    r = _run("dispatch")
    assert r["path"] == "mamba_ssm" and r["same_kernel_object"] and not r["states"]
    _check(r["errors"], ("y", *GRADS), FP32_TOL)
    assert r["path_h0"] == "mamba_ssm"  # initial_state= / return_final_state= go through the kernel too
    _check(r["errors"], [k for k in r["errors"] if k.endswith("_h0")], FP32_TOL)


# -- the cases (child side: python tests/test_triton_ssd.py CASE, with TRITON_INTERPRET=1) --------------
def _inputs(b, L, H, P, N, G, *, seed=0, h0=False):
    """Model-like SSD inputs in float64: x ~ N(0, 1), Δ = softplus(N(−1, 1)) ∈ (0, ~3), A ∈ [−1, −0.05]
    (slow enough decay that earlier chunks matter), B, C ~ N(0, 1), D ~ N(0, 1)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, L, H, P, generator=g, dtype=torch.float64),
        "dt": F.softplus(torch.randn(b, L, H, generator=g, dtype=torch.float64) - 1),
        "A": -torch.empty(H, dtype=torch.float64).uniform_(0.05, 1.0, generator=g),
        "B": torch.randn(b, L, G, N, generator=g, dtype=torch.float64),
        "C": torch.randn(b, L, G, N, generator=g, dtype=torch.float64),
        "D": torch.randn(H, generator=g, dtype=torch.float64),
    }
    if h0:
        t["h0"] = torch.randn(b, H, P, N, generator=g, dtype=torch.float64)
    return t


_rel = triton_cpu.rel_error


def _leaves(t: dict, dtypes: dict):
    """Fresh leaf tensors requiring grad: float64 copies (the reference) and copies in the kernel's dtypes."""
    ref = {k: v.clone().requires_grad_() for k, v in t.items()}
    ker = {k: v.to(dtypes.get(k, v.dtype)).requires_grad_() for k, v in t.items()}
    return ker, ref


def _grad_errors(ker: dict, ref: dict, names: dict) -> dict:
    return {out: _rel(ker[k].grad, ref[k].grad) for out, k in names.items()}


GRAD_OF = {"dx": "x", "ddt": "dt", "dA": "A", "dB": "B", "dC": "C", "dD": "D"}


def naive_ssd(x, dt, A, B, C, D, h0):
    """h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t ⊗ B_t,  y_t = h_t C_t + D x_t  (SPEC §1), one step at a time from
    h_{−1} = h0 [batch, H, P, N]. Returns (y [batch, L, H, P], h_{L−1})."""
    import torch

    H, G = x.shape[2], B.shape[2]
    Bh, Ch = (t.repeat_interleave(H // G, dim=2) for t in (B, C))  # [b, L, H, N]: head h reads group h // (H/G)
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), h


def case_kernel(kernel, dtype="float32", h0=False, shape=(2, 50, 4, 8, 16, 2), chunk=16, seed=0):
    """The kernel called directly as our dispatch would (Δ already softplus'ed, A and D float32), x, Δ, B, C
    in `dtype`; shape = (batch, L, H, P, N, G). With h0: initial_states= and return_final_states=True,
    against naive_ssd; without: against ssd_torch. Both references in float64."""
    import torch

    from diffmamba_interp.scan import ssd_torch

    f = getattr(torch, dtype)
    t = _inputs(*shape, seed=seed, h0=h0)
    ker, ref = _leaves(t, {k: f for k in ("x", "dt", "B", "C")} | {"A": torch.float32, "D": torch.float32,
                                                                     "h0": torch.float32})
    # The reference sees exactly the kernel's input values (bf16-rounded in the bf16 case).
    with torch.no_grad():
        for k in ref:
            ref[k].copy_(ker[k].double())
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(t["x"].shape, generator=g, dtype=torch.float64)
    kw = {"initial_states": ker["h0"], "return_final_states": True} if h0 else {}
    out = kernel(ker["x"], ker["dt"], ker["A"], ker["B"], ker["C"], chunk, D=ker["D"], **kw)
    if h0:
        y, final = out
        y_ref, final_ref = naive_ssd(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D"], ref["h0"])
        gh = torch.randn(final_ref.shape, generator=g, dtype=torch.float64)
        (y.double() * gy).sum().add((final.double() * gh).sum()).backward()
        (y_ref * gy).sum().add((final_ref * gh).sum()).backward()
        errors = {"y": _rel(y, y_ref), "final_state": _rel(final, final_ref)}
        errors |= _grad_errors(ker, ref, GRAD_OF | {"dinitial_states": "h0"})
        # the loop against ssd_torch (both float64) with a zero start state
        with torch.no_grad():
            y0, _ = naive_ssd(*(ref[k] for k in ("x", "dt", "A", "B", "C", "D")), torch.zeros_like(ref["h0"]))
            y1 = ssd_torch(*(ref[k] for k in ("x", "dt", "A", "B", "C", "D")), chunk_size=chunk)[0]
        errors["loop_vs_ssd_torch"] = _rel(y0, y1)
        # and against ssd_torch with the same initial state (y, final state, all gradients)
        ref2 = {k: v.detach().clone().requires_grad_() for k, v in ref.items()}
        out = ssd_torch(*(ref2[k] for k in ("x", "dt", "A", "B", "C", "D")), chunk_size=chunk,
                        initial_state=ref2["h0"], return_final_state=True)
        (out[0] * gy).sum().add((out[2] * gh).sum()).backward()
        errors |= {"y_vs_ssd_torch": _rel(y, out[0]), "final_state_vs_ssd_torch": _rel(final, out[2])}
        errors |= {f"{n}_vs_ssd_torch": _rel(ker[k].grad, ref2[k].grad)
                   for n, k in (GRAD_OF | {"dinitial_states": "h0"}).items()}
    else:
        y = out
        y_ref = ssd_torch(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D"], chunk_size=chunk)[0]
        (y.double() * gy).sum().backward()
        (y_ref * gy).sum().backward()
        errors = {"y": _rel(y, y_ref)} | _grad_errors(ker, ref, GRAD_OF)
    dtypes = {"y": str(y.dtype)} | {n: str(ker[k].grad.dtype) for n, k in GRAD_OF.items()}
    return {"errors": errors, "dtypes": dtypes}


def case_fp32_softplus(kernel):
    import torch
    import torch.nn.functional as F

    from diffmamba_interp.scan import ssd_torch

    b, L, H, P, N, G, chunk = 1, 40, 4, 8, 16, 2, 16
    t = _inputs(b, L, H, P, N, G, seed=2)
    g = torch.Generator().manual_seed(3)
    t["dt"] = torch.randn(b, L, H, generator=g, dtype=torch.float64) - 1  # raw, before softplus
    t["dt_bias"] = torch.randn(H, generator=g, dtype=torch.float64) * 0.5
    t["D"] = t["D"][:, None].expand(H, P).contiguous()  # mamba-ssm's D [H, P] form (values equal per head)
    ker, ref = _leaves(t, {k: torch.float32 for k in t})
    y = kernel(ker["x"], ker["dt"], ker["A"], ker["B"], ker["C"], chunk, D=ker["D"], dt_bias=ker["dt_bias"],
               dt_softplus=True)
    y_ref = ssd_torch(ref["x"], F.softplus(ref["dt"] + ref["dt_bias"]), ref["A"], ref["B"], ref["C"],
                      torch.zeros(H, dtype=torch.float64), chunk_size=chunk)[0]
    y_ref = y_ref + ref["D"] * ref["x"]  # D [H, P]
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    (y.double() * gy).sum().backward()
    (y_ref * gy).sum().backward()
    errors = {"y": _rel(y, y_ref)} | _grad_errors(ker, ref, GRAD_OF | {"ddt_bias": "dt_bias"})
    return {"errors": errors}


def case_dispatch(kernel):
    import torch

    from diffmamba_interp import scan

    kernels = scan.gpu_kernels()  # really imports causal_conv1d / mamba_ssm (their CUDA parts are stand-ins)
    same = kernels is not None and kernels.mamba_chunk_scan_combined is kernel
    scan._use_kernels = lambda *tensors: True  # this child process only: take the CUDA branch on CPU tensors
    chunk = 8
    t = _inputs(1, 37, 2, 8, 16, 1, seed=4)
    ker, ref = _leaves(t, {k: torch.float32 for k in t})
    out = scan.ssd(ker["x"], ker["dt"], ker["A"], ker["B"], ker["C"], ker["D"], chunk_size=chunk)
    y, states, path = out[0], out[1], out[-1]
    y_ref = scan.ssd_torch(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D"], chunk_size=chunk)[0]
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    (y.double() * gy).sum().backward()
    (y_ref * gy).sum().backward()
    errors = {"y": _rel(y, y_ref)} | _grad_errors(ker, ref, GRAD_OF)
    result = {"path": path, "same_kernel_object": same, "states": states is not None}
    # the state-carrying dispatch passes initial_states= to the kernel
    t = _inputs(1, 37, 2, 8, 16, 1, seed=9, h0=True)
    ker, ref = _leaves(t, {k: torch.float32 for k in t})
    out = scan.ssd(ker["x"], ker["dt"], ker["A"], ker["B"], ker["C"], ker["D"], chunk_size=chunk,
                   initial_state=ker["h0"], return_final_state=True)
    y_ref, final_ref = naive_ssd(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D"], ref["h0"])
    gh = torch.randn(final_ref.shape, generator=g, dtype=torch.float64)
    (out[0].double() * gy).sum().add((out[2].double() * gh).sum()).backward()
    (y_ref * gy).sum().add((final_ref * gh).sum()).backward()
    errors |= {"y_h0": _rel(out[0], y_ref), "final_state_h0": _rel(out[2], final_ref)}
    errors |= {f"{n}_h0": _rel(ker[k].grad, ref[k].grad) for n, k in (GRAD_OF | {"dinitial_states": "h0"}).items()}
    result["path_h0"] = out[-1]
    return result | {"errors": errors}


CASES = {
    "fp32": lambda k: case_kernel(k),
    "fp32_softplus": case_fp32_softplus,
    "fp32_states": lambda k: case_kernel(k, h0=True, shape=(2, 45, 4, 8, 16, 2), chunk=16, seed=6),
    "bf16": lambda k: case_kernel(k, dtype="bfloat16", h0=True, shape=(1, 50, 4, 8, 16, 2), seed=8),
    "dispatch": case_dispatch,
}


if __name__ == "__main__":
    triton_cpu.child_main(CASES, triton_cpu.chunk_scan_combined)
