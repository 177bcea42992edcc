"""The design's promises: the import graph has no cycle, analysis code never names an architecture,
every architecture is one registry entry, and a new one works everywhere without other edits."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import torch

import diffmamba_interp as dmi
from diffmamba_interp.archs import ARCHS, ArchSpec
from diffmamba_interp.differential import Differential
from diffmamba_interp.mixers import Mamba2Mixer

PACKAGE = Path(dmi.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in `path` (module level or inside functions; not under TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}  # `if TYPE_CHECKING:` imports are for annotations, never run
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def test_import_graph_has_no_cycle():
    files = {(_module_name(p)): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # a package's __init__ re-exports its children: importing a child through it is not a back edge
    graph = {m: {t for t in _imports(p, modules) if not m.startswith(t + ".")} for m, p in files.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_analysis_and_jobs_never_name_an_architecture():
    names = set(ARCHS)
    for path in [*(PACKAGE / "analysis").rglob("*.py"), PACKAGE / "jobs.py", PACKAGE / "implicit.py", PACKAGE / "model.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, f"{path.name} branches on the architecture name {node.value!r}"


def test_every_architecture_is_one_registry_entry(tiny_model):
    for name, spec in ARCHS.items():
        model = tiny_model(name, diff_layers="all")
        assert model.cfg.spec is spec
        for i, block in enumerate(model.blocks):
            if spec.diff == "block":
                assert isinstance(block, Differential) and isinstance(block.branch(1), spec.mixer)
            elif spec.diff == "mixer":
                assert isinstance(block.mixer, spec.diff_mixer) and isinstance(block.mixer, Differential)
            else:
                assert isinstance(block.mixer, spec.mixer) and not isinstance(block, Differential)


class _ScaledMamba2Mixer(Mamba2Mixer):
    """A made-up architecture for the test: a Mamba-2 mixer whose output is halved."""

    def forward(self, h, rec=None):
        return 0.5 * super().forward(h, rec)


def test_a_new_architecture_needs_only_a_registry_entry(monkeypatch, tiny_model):
    spec = ArchSpec("halfmamba2", _ScaledMamba2Mixer, "mamba2", "transformers-mamba2", diff="block",
                    branch_dims=ARCHS["diffmamba2"].branch_dims, lambda_form="q1", lambda_size=lambda cfg: cfg.d_model)
    monkeypatch.setitem(ARCHS, "halfmamba2", spec)
    model = tiny_model("halfmamba2", diff_layers="alternate", dtype=torch.float64)
    ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(ids)
    assert isinstance(model.blocks[0], Differential) and isinstance(model.blocks[1].mixer, _ScaledMamba2Mixer)
    # the analysis functions work unchanged: lenses, branch lens, implicit attention of both kinds
    lp = dmi.logit_lens(model, ids)
    torch.testing.assert_close(lp[-1, 0], torch.log_softmax(logits[0], -1))
    block = dmi.implicit_attention(model, ids, layer=1, kind="block")
    x = cache["blocks.1.mixer.hook_xBC"][..., : model.blocks[1].mixer.d_inner]
    torch.testing.assert_close(block.reconstruct(x), cache["blocks.1.mixer.norm.hook_normalized"])
    diff = dmi.differential_attention(model, ids, layer=0)
    assert diff.shape == (1, 7, 7)
    rows = dmi.branch_lens(model, ids, targets=torch.tensor([3]), progress=False)
    a, state = model(ids[:, :4], return_state=True)  # recurrent mode too
    torch.testing.assert_close(torch.cat([a, model(ids[:, 4:], state=state)], 1), logits)
    assert set(rows.component) == {"mixer_1", "-λ·mixer_2", "block"}
    assert dataclasses.replace(model.cfg).arch == "halfmamba2"
