"""Which scan implementation runs (scan.py's dispatch) and torch.compile (issue 12).

The dispatch tests check decisions only: which path a CUDA tensor would take given which kernels
imported. No kernel is run here (this machine has no GPU); tests/test_triton_ssd.py runs the real
Triton SSD kernel, and the CUDA tests in test_model.py run the CUDA kernels where a GPU exists.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch

from diffmamba_interp import scan
from diffmamba_interp.errors import DiffMambaError


class _CudaLike:
    """Stands for a CUDA tensor in the dispatch decision (only .is_cuda and .dtype are read)."""

    is_cuda = True

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype


@pytest.fixture
def dispatch(monkeypatch):
    """The dispatch with a given set of imported kernels (`objects standing for them, never called`)."""
    monkeypatch.setattr(scan, "_fallback_warned", set())
    monkeypatch.setitem(scan._path, "now", "auto")

    def use(**present):
        names = dict.fromkeys(scan._KERNELS)
        names.update({k: (lambda *a, **k: pytest.fail("a kernel was called")) for k, v in present.items() if v})
        monkeypatch.setattr(scan, "gpu_kernels", lambda: SimpleNamespace(**names))
    return use


def test_each_kernel_is_used_on_its_own(dispatch):
    dispatch(selective_scan_fn=True, mamba_chunk_scan_combined=True)  # causal-conv1d missing
    assert scan._use_kernels("selective_scan_fn", _CudaLike())
    assert scan._use_kernels("mamba_chunk_scan_combined", _CudaLike(torch.bfloat16))
    with pytest.warns(UserWarning, match="causal_conv1d_fn is not available"):
        assert not scan._use_kernels("causal_conv1d_fn", _CudaLike())
    with warnings.catch_warnings():  # warned once, not on every call
        warnings.simplefilter("error")
        assert not scan._use_kernels("causal_conv1d_fn", _CudaLike())
    assert not scan._use_kernels("selective_scan_fn", torch.zeros(1))  # CPU tensors never take a kernel


def test_float64_and_unsupported_sizes_fall_back(dispatch):
    dispatch(selective_scan_fn=True, causal_conv1d_fn=True)
    with pytest.warns(UserWarning, match="float64 is not a kernel dtype"):
        assert not scan._use_kernels("selective_scan_fn", _CudaLike(torch.float64))
    with pytest.warns(UserWarning, match="d_state <= 256"):
        assert not scan._use_kernels("selective_scan_fn", _CudaLike(), False, "the S6 kernel takes d_state <= 256, not 300")


def test_scan_path_torch_and_kernel(dispatch):
    dispatch(selective_scan_fn=True)
    scan.set_scan_path("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing PyTorch is not a fallback: no warning
        assert not scan._use_kernels("selective_scan_fn", _CudaLike())
    scan.set_scan_path("kernel")
    assert scan._use_kernels("selective_scan_fn", _CudaLike())
    with pytest.raises(DiffMambaError, match="scan path 'kernel': causal_conv1d_fn cannot run here"):
        scan._use_kernels("causal_conv1d_fn", _CudaLike())
    with pytest.raises(DiffMambaError, match="unknown scan path"):
        scan.set_scan_path("fast")


def test_a_missing_or_broken_extension_turns_off_only_its_kernel(monkeypatch):
    monkeypatch.setattr(scan, "_broken", {})
    monkeypatch.setitem(scan._KERNELS, "selective_scan_fn", ("json", "dumps", "no_such_extension_cuda"))
    monkeypatch.setitem(scan._KERNELS, "causal_conv1d_fn", ("json", "loads", None))
    assert scan._import_kernel("selective_scan_fn") is None  # the wrapper imports, its extension does not
    assert "no_such_extension_cuda" in scan._broken["selective_scan_fn"]
    import json

    assert scan._import_kernel("causal_conv1d_fn") is json.loads


def test_forcing_the_torch_path_on_cpu(tiny_model, monkeypatch):
    monkeypatch.setitem(scan._path, "now", "auto")
    model = tiny_model("mamba1", shared=True)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        auto = model(ids)
        assert model.last_path == ("numba" if scan._numba() is not None else "torch")
        scan.set_scan_path("torch")
        forced = model(ids)
        assert model.last_path == "torch"
    torch.testing.assert_close(forced, auto, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mamba2", "diffmamba2"])
def test_the_ssd_models_trace_into_one_graph(tiny_model, arch):
    """No graph break: the token-id check and the logging are skipped while compiling."""
    model = tiny_model(arch, shared=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(torch.randint(0, 40, (2, 9)))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba1", "diffmamba2"])
def test_torch_compile_gives_the_same_logits(tiny_model, arch):
    """torch.compile (inductor, CPU): Mamba-1 runs numba outside the graph (torch.compiler.disable)."""
    torch._dynamo.reset()
    model = tiny_model(arch, shared=True)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=0)
