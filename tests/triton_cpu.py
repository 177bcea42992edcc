"""Run mamba-ssm's real Triton SSD kernel on CPU tensors, under Triton's interpreter (TRITON_INTERPRET=1).

Used by tests/test_triton_ssd.py, and only inside the child processes it starts: `setup()` patches
torch.cuda, triton and sys.modules process-wide, so it must never run in a pytest worker that also runs
other tests. What is tested is the Triton kernels' own code (mamba_ssm/ops/triton/ssd_*.py), executed
by the interpreter with numpy; none of the workarounds below touches their arithmetic:

1. `torch.cuda.device(index)` becomes a no-op for CPU tensors (index None): mamba-ssm wraps every
   kernel launch in it, and on a CPU build of torch it raises.
2. `torch.cuda.get_device_properties(...)` answers with a stub whose multi_processor_count is 132 (an
   H100's): three backward launchers (dB, dC, gated-norm) size their grids from it. With 132 they split
   heads across programs as on a real GPU for these small problems, so the split-and-sum path runs.
3. Every `triton.autotune` keeps one config: the one with the smallest tiles (the product of its
   BLOCK_SIZE_* values; mamba-ssm's own deterministic mode picks the same kind of config). Otherwise the
   interpreter would run and time every config of every kernel. Only that config is tested.
4. `tl.dot` of bfloat16 operands: the interpreter stores bf16 as raw uint16 bits and its `create_dot`
   multiplies those bits as integers. Here bf16 operands are widened to float32 first (exact), then
   multiplied and accumulated in float32, which is what the GPU's tensor cores do.

The import stand-ins: mamba_ssm/__init__ (imported by any `mamba_ssm.*` import) does
`import selective_scan_cuda`, and causal_conv1d does `import causal_conv1d_cuda`; these are the CUDA
extensions, never built here. `_ExtensionStandIn` puts an empty module under each name ONLY so those
imports succeed. They are not kernels, nothing is tested through them, and any attribute read from
them (that is, any attempt to call into them) raises and is recorded in `STAND_IN_USES`.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

# Where scripts/install_triton_ssd.sh (`make triton-ssd`) puts triton, mamba-ssm and causal-conv1d:
# a directory of its own next to the venv's site-packages, on sys.path only in the child processes.
SITE = Path(sys.prefix) / "triton-ssd"
# The status line the script leaves ("ok …" or "failed: <why>").
STATUS_FILE = Path(sys.prefix) / "triton-ssd.status"
INSTALL_HINT = "run make triton-ssd"
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
SM_COUNT = 132
STAND_IN_USES: list[str] = []


def missing_reason() -> str | None:
    """Why the kernel tests cannot run here (found without importing anything), or None."""
    packages = (("triton", "triton"), ("mamba-ssm", "mamba_ssm"), ("causal-conv1d", "causal_conv1d"))
    missing = [name for name, mod in packages if importlib.machinery.PathFinder.find_spec(mod, [str(SITE)]) is None]
    if not missing:
        return None
    why = f"{', '.join(missing)} not installed in {SITE}: {INSTALL_HINT}"
    if STATUS_FILE.exists():
        status = STATUS_FILE.read_text().strip()
        if status.startswith("failed"):
            why += f" (last attempt {status})"
    return why


def child_env(root: Path) -> dict[str, str]:
    """The environment of a child process that runs the kernels: TRITON_INTERPRET=1 from the start, and
    SITE (then the project root) first on its path."""
    path = [str(SITE), str(root), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}


class _ExtensionStandIn(types.ModuleType):
    """A STAND-IN for a CUDA extension module (selective_scan_cuda / causal_conv1d_cuda).

    Present only so that `import selective_scan_cuda` inside mamba_ssm/__init__ (and
    `import causal_conv1d_cuda` inside causal_conv1d) succeeds on CPU. It is not a kernel and is never
    called; reading any attribute from it raises and is recorded in STAND_IN_USES.
    """

    def __init__(self, name: str):
        super().__init__(name, self.__doc__)
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # import machinery probing (__path__, …)
            raise AttributeError(attr)
        STAND_IN_USES.append(f"{self.__name__}.{attr}")
        raise AttributeError(f"{self.__name__} is an import stand-in on CPU, not the CUDA extension: "
                             f"{attr!r} does not exist here and must not be used")


class _NoCudaDevice(contextlib.AbstractContextManager):
    """`torch.cuda.device(index)` for CPU tensors (index None): does nothing."""

    def __init__(self, device=None):
        if device is not None and getattr(device, "type", "cuda") != "cpu":
            raise RuntimeError(f"triton_cpu: torch.cuda.device({device!r}) on a machine without CUDA")

    def __exit__(self, *exc):
        return False


def _device_properties(device=None):
    return types.SimpleNamespace(name="CPU (Triton interpreter stub)", multi_processor_count=SM_COUNT)


def _tile_cost(config) -> int:
    cost = 1
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK_SIZE_"):
            cost *= value
    return cost


def setup() -> None:
    """Prepare this process to run mamba-ssm's Triton SSD kernels on CPU (see the module docstring).

    TRITON_INTERPRET must be "1" in the environment before triton is first imported: triton reads it
    when `@triton.jit` wraps a kernel, i.e. while mamba_ssm is being imported.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_cpu.setup(): set TRITON_INTERPRET=1 in the environment before starting Python")
    if any(m in sys.modules for m in ("triton", "mamba_ssm", "causal_conv1d")):
        raise RuntimeError("triton_cpu.setup() must run before triton / mamba_ssm / causal_conv1d are imported")
    import torch

    # 1, 2: the CUDA calls mamba-ssm's launchers make around the kernels.
    torch.cuda.device = _NoCudaDevice
    torch.cuda.get_device_properties = _device_properties

    # The import stand-ins (never called; see _ExtensionStandIn).
    for name in EXTENSIONS:
        sys.modules.setdefault(name, _ExtensionStandIn(name))

    import triton
    from triton.runtime import interpreter

    # 3: one autotune config per kernel (must be in place before mamba_ssm decorates its kernels).
    autotune = triton.autotune

    def autotune_one_config(configs, *args, **kwargs):
        return autotune([min(configs, key=_tile_cost)], *args, **kwargs)

    triton.autotune = autotune_one_config

    # 4: tl.dot of bf16 operands in the interpreter.
    tl = triton.language
    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a, b = (self.create_fp_ext(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16


def chunk_scan_combined():
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined, the real Triton SSD kernel (after setup())."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def selective_state_update():
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update, the real Triton decoding-step
    kernel (after setup())."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

    return kernel


def rel_error(a, ref) -> float:
    """max |a − ref| / max |ref| (the measure both Triton test files report), in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return ((a - ref).abs().max() / ref.abs().max()).item()


# -- one case per child process -------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def run_case(script: str, case: str) -> dict:
    """Parent side: run `python SCRIPT CASE` in a child with TRITON_INTERPRET=1 and return its RESULT (a
    dict with "errors" and whatever else the case reports). Skips where the kernels are not installed or
    the child says so; fails when the child fails or read anything from the import stand-ins."""
    import pytest

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, case], cwd=ROOT, env=child_env(ROOT), capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"case {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["stand_in_uses"] == [], "the CUDA-extension import stand-ins were used"
    print(f"{case} ({time.perf_counter() - start:.1f} s): " + ", ".join(
        f"{k} {v:.2e}" for k, v in result["errors"].items()))
    return result


def child_main(cases: dict, kernel_loader) -> None:
    """Child side (`python SCRIPT CASE`): set up the interpreter, load the kernel with `kernel_loader`,
    run cases[CASE](kernel) and print its result as one RESULT line of JSON."""
    import torch

    torch.set_num_threads(1)  # two pytest workers on two cores
    try:
        setup()
        kernel = kernel_loader()
    except ImportError as e:
        result = {"skip": f"the mamba-ssm Triton kernel is not importable ({e}): {INSTALL_HINT}"}
    else:
        result = cases[sys.argv[1]](kernel)
        result["stand_in_uses"] = list(STAND_IN_USES)
        assert all(math.isfinite(v) for v in result["errors"].values()), result
    print("RESULT " + json.dumps(result))
