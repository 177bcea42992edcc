"""`HookedMamba`: embedding -> blocks -> norm_f (RMSNorm) -> lm_head, as a TransformerLens
`HookedRootModule`. Hooks are identity modules named by their module path (`blocks.3.mixer_2.hook_dt`),
so `run_with_cache`, `run_with_hooks`, `hooks()` and nnsight all find them.

Layer i is built by the architecture registry (`archs.create_block`); checkpoints are read and
written through `loading/` (`from_pretrained` / `load_model`, `save_pretrained`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import loading
from .archs import create_block
from .config import MambaConfig
from .differential import Differential
from .errors import DiffMambaError, one_line
from .mixers import ScanUnit
from .norms import RMSNorm
from .scan import compute_dtype
from .state import MixerState, ModelState, Recurrence
from .tokens import TokenMethods

log = logging.getLogger(__name__)


class HookedMamba(TokenMethods, HookedRootModule):
    """A Mamba / Mamba-2 / Diff-Mamba-1 / Diff-Mamba-2 / Diff-S6 language model with hooks everywhere.

    `model(input_ids [batch, pos]) -> logits [batch, pos, vocab]`. Build a random one with
    `HookedMamba(MambaConfig(...))`, load a checkpoint with `diffmamba_interp.load_model(path)`.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = None  # set by load_model when the checkpoint has one
        self.checkpoint_path: str | None = None  # set by load_model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.hook_embed = HookPoint()  # [batch, pos, d]
        self.blocks = nn.ModuleList(create_block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.setup()
        self._sync_cfg()
        for name, unit in self.mixers():
            unit.state_key = unit.conv_group = name  # its entry in a ModelState, and which conv state it reads
        for name, module in self.named_modules():  # the scan cores of a Diff-S6 mixer (Mamba-1 form) share its conv
            if isinstance(module, Differential) and module.SHARED_CONV:
                for k in (1, 2):
                    module.branch(k).conv_group = name

    # -- an attached tuned lens follows the model's device and dtype, outside its state dict ----------
    def __setattr__(self, name: str, value) -> None:
        if name == "tuned_lens":  # kept out of _modules: not saved with the weights, not walked by hooks
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._sync_cfg()
        lens = self.__dict__.get("tuned_lens")
        if isinstance(lens, nn.Module):
            lens._apply(fn)
        return self

    def _sync_cfg(self) -> None:
        """cfg.device / cfg.dtype follow the weights (TransformerLens's helpers read them from cfg)."""
        if "embed" in self._modules:
            self.cfg.device, self.cfg.dtype = self.embed.weight.device, self.embed.weight.dtype

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, return_type: str | None = "logits", state: ModelState | None = None,
                return_state: bool = False, in_place: bool = False):
        """input_ids [batch, pos] -> logits [batch, pos, vocab] (return_type "logits"), the mean
        next-token cross-entropy ("loss"), both as a tuple ("both"), or None.

        Recurrent mode: `state` (a `ModelState` from `return_state=True` or `init_state`) is the state
        before input_ids, so a sequence run in pieces with the state carried equals one run;
        `return_state=True` returns (output, the state after the last position). The given state is
        never modified, unless `in_place=True` with one token per sequence: then the decoding step
        overwrites its SSM tensors and they become the returned state's (for a caller that owns the
        state and discards it, as `generate` does: no state-sized allocation per scan unit per token).
        """
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            input_ids = self._texts_to_ids(input_ids)
        self.check_input_ids(input_ids)
        if state is not None:
            self.check_state(state, input_ids.shape[0])
        rec = Recurrence(state, return_state, in_place) if (state is not None or return_state) else None
        resid = self.hook_embed(self.embed(input_ids.to(self.embed.weight.device)))  # [batch, pos, d]
        for block in self.blocks:
            resid = block(resid, rec)
        self._log_paths()
        out = self._output(resid, input_ids, return_type)
        if return_state:
            return out, rec.result((state.seen if state is not None else 0) + input_ids.shape[1])
        return out

    def _texts_to_ids(self, texts) -> torch.Tensor:
        """A text, or texts of one token length, as the forward's input (TransformerLens's `model(text)`)."""
        ids, lengths = self.to_tokens(texts, return_lengths=True)
        if int(lengths.min()) != ids.shape[1]:
            raise DiffMambaError(f"the texts have different token lengths ({sorted(set(lengths.tolist()))}); use "
                                 "ids, lengths = model.to_tokens(texts, return_lengths=True) and read row r at lengths[r] - 1")
        return ids

    def _output(self, resid: torch.Tensor, input_ids: torch.Tensor, return_type):
        if return_type is None:
            return None
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device))
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise DiffMambaError(f"unknown return_type {return_type!r}; expected 'logits', 'loss', 'both' or None")

    # -- recurrent mode --------------------------------------------------------------------------
    def init_state(self, batch: int = 1) -> ModelState:
        """The state before any token (zero conv inputs, zero SSM states), in the compute dtype."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise DiffMambaError(f"batch must be a positive integer, got {batch!r}")
        f = compute_dtype(self.dtype)
        entries, convs = {}, {}
        for name, unit in self.mixers():
            conv_shape, ssm_shape = unit.state_shapes()
            if unit.conv_group not in convs:
                convs[unit.conv_group] = torch.zeros(batch, *conv_shape, dtype=f, device=self.device)
            entries[name] = MixerState(convs[unit.conv_group], torch.zeros(batch, *ssm_shape, dtype=f, device=self.device))
        return ModelState(entries, 0)

    def check_state(self, state, batch: int) -> None:
        """Raise a one-line DiffMambaError unless `state` is a ModelState of this model for `batch` rows,
        in the compute dtype and on the model's device."""
        if not isinstance(state, ModelState):
            raise DiffMambaError(f"state must be a ModelState (from return_state=True or init_state), got {type(state).__name__}")
        units = dict(self.mixers())
        if set(state) != set(units):
            extra, missing = sorted(set(state) - set(units)), sorted(set(units) - set(state))
            raise DiffMambaError(f"the state is from another model: {len(missing)} mixers of this model have no state "
                                 f"({', '.join(missing[:2]) or 'none'}), {len(extra)} entries are unknown ({', '.join(extra[:2]) or 'none'})")
        f = compute_dtype(self.dtype)
        for name, unit in units.items():
            entry = state.entries[name]
            for what, tensor, shape in (("conv", entry.conv, unit.state_shapes()[0]), ("ssm", entry.ssm, unit.state_shapes()[1])):
                if tuple(tensor.shape) != (batch, *shape):
                    raise DiffMambaError(f"state[{name!r}].{what} has shape {tuple(tensor.shape)} but this model and a batch of "
                                         f"{batch} need {(batch, *shape)} (a state from another model or batch size)")
                if tensor.dtype != f:
                    raise DiffMambaError(f"state[{name!r}].{what} is {tensor.dtype} but this model keeps states in {f}; "
                                         f"use state.to({f})")
                if tensor.device != self.device:
                    raise DiffMambaError(f"state[{name!r}].{what} is on {tensor.device} but the model is on {self.device}; "
                                         f"use state.to({str(self.device)!r})")

    def step(self, token_ids: torch.Tensor, state: ModelState, return_type: str | None = "logits", in_place: bool = False):
        """One token per sequence from `state`: token_ids [batch] (or [batch, 1]) -> (logits [batch, vocab],
        the new state). O(1) in the length of what the state has seen; hooks fire with pos = 1. `state`
        is kept, unless `in_place=True`: then it is overwritten and becomes the new state (`forward`)."""
        if isinstance(token_ids, torch.Tensor) and token_ids.ndim == 1:
            token_ids = token_ids[:, None]
        if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 2 or token_ids.shape[1] != 1:
            raise DiffMambaError(f"step takes one token per sequence, token_ids [batch] or [batch, 1]; got "
                                 f"{tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
        if state is None:
            raise DiffMambaError("step needs a state: prefill with model(ids, return_state=True) or use model.init_state(batch)")
        out, new = self(token_ids, return_type=return_type, state=state, return_state=True, in_place=in_place)
        return (out[:, -1] if return_type == "logits" else out), new

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
        """Prefill `input_ids` [batch, pos] (in chunks of `chunk_size` tokens) and decode `max_new_tokens`
        tokens one step at a time -> [batch, pos + max_new_tokens]. Greedy by default (the argmax, as
        transformers' `generate`); `do_sample=True` samples from softmax(logits / temperature), over
        the `top_k` most likely tokens when given, from a generator seeded with `seed`."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                        seed=seed, chunk_size=chunk_size)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """norm_f then lm_head: resid [..., d] -> logits [..., vocab] (the logit lens reuses this)."""
        h = self.norm_f(resid.to(self.norm_f.weight.dtype))
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def check_input_ids(self, input_ids) -> None:
        """Raise a one-line DiffMambaError (a ValueError) for anything but in-range token ids [batch, pos]."""
        V = self.cfg.vocab_size
        if torch.compiler.is_compiling():  # checked once, outside the compiled graph (no sync, no graph break)
            return
        if not isinstance(input_ids, torch.Tensor):
            raise DiffMambaError(f"input_ids must be a LongTensor [batch, pos], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DiffMambaError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise DiffMambaError(
                f"input_ids must have shape [batch, pos] with batch >= 1 and pos >= 1, got shape {tuple(input_ids.shape)}"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise DiffMambaError(f"token id {bad} is out of range for vocab size {V} (valid ids are 0..{V - 1})")

    # -- introspection ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def mixers(self) -> Iterator[tuple[str, ScanUnit]]:
        """(name, module) of every module that runs a scan (`ScanUnit`: Mamba-1/2 mixers, Diff-S6 cores)."""
        units = self.__dict__.get("_units")
        if units is None:  # found once: walking every module on each decoding step costs milliseconds
            units = tuple((name, m) for name, m in self.named_modules() if isinstance(m, ScanUnit))
            object.__setattr__(self, "_units", units)
        return iter(units)

    @property
    def last_path(self) -> str:
        """Which scan path the last forward took: "torch", "numba" or "mamba_ssm" (comma-joined if mixed)."""
        paths = sorted({m.last_path for _, m in self.mixers() if m.last_path})
        return ",".join(paths)

    def _log_paths(self) -> None:
        if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
            log.debug("scan path: %s", self.last_path)

    @contextlib.contextmanager
    def capture_states(self, on: bool = True):
        """Materialise every `hook_ssm_state` inside the block (for nnsight, which adds no torch hook)."""
        old = {name: m.capture_states for name, m in self.mixers()}
        try:
            for _, m in self.mixers():
                m.capture_states = on
            yield self
        finally:
            for name, m in self.mixers():
                m.capture_states = old[name]

    def run_with_cache(self, *args, names_filter=None, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs):
        """TransformerLens's run_with_cache -> (output, `MambaActivationCache`); a plain dict with
        return_cache_object=False. By default every hook except the large `hook_ssm_state`
        ([batch, pos, E, N] per mixer); pass a names_filter that names it to cache states too."""
        from .cache import MambaActivationCache

        if names_filter is None:
            names_filter = lambda name: not name.endswith("hook_ssm_state")  # noqa: E731
        out, cache = super().run_with_cache(*args, names_filter=names_filter, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            cache = MambaActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def hook_shapes(self, pos: int = 4) -> pd.DataFrame:
        """Every hook's name and the shape it sees on a [1, pos] input, as a DataFrame."""
        shapes: dict[str, tuple[int, ...]] = {}

        def record(t, hook):
            shapes[hook.name] = tuple(t.shape)

        ids = torch.zeros(1, pos, dtype=torch.long, device=self.device)
        with torch.no_grad(), self.hooks(fwd_hooks=[(lambda n: True, record)]):
            self(ids)
        return pd.DataFrame({"hook": list(self.hook_dict), "shape": [shapes.get(n) for n in self.hook_dict]})

    # -- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, strict: bool = True, non_finite: str = "error") -> "HookedMamba":
        """Load a checkpoint directory or Hugging Face hub id, in eval mode.

        Formats (`loading.FORMATS`): transformers Mamba / Mamba-2, the paper's Diff-Mamba-2,
        mamba-ssm (state-spaces/mamba-*) and this package's own `save_pretrained` output; weights
        from safetensors (single or sharded) or a `.bin` read with `torch.load(weights_only=True)`.

        device: None -> CPU. dtype: None -> float32; a torch dtype or its name; "auto" -> as stored.
        strict (default): any missing / unexpected key or shape mismatch raises a one-line
        DiffMambaError listing the keys. strict=False loads what fits, leaves the rest at init, logs
        a warning and records the skipped keys in `model.load_report` (a `LoadReport`, always set).
        `model.tokenizer` is the directory's tokenizer when it has tokenizer files, else None.
        non_finite: weights holding NaN or Inf raise a DiffMambaError ("error", the default: such a
        model gives NaN probabilities that no analysis can rank); "warn" loads them with a
        NonFiniteWeightWarning, to inspect a diverged checkpoint.

        The config is checked against the stored tensor shapes on a model built on the meta device
        (no memory), and a model too large for this machine is refused, before any allocation.
        """
        ckpt = loading.read_checkpoint(path, non_finite=non_finite)
        torch_dtype, torch_device = loading.checkpoint.resolve_dtype(dtype, ckpt.state), loading.checkpoint.resolve_device(device)
        report = loading.LoadReport(path=ckpt.directory, format=ckpt.format, files=ckpt.files,
                                    untied_lm_head=loading.checkpoint.untie_if_needed(ckpt))
        # the config against the stored shapes and this machine's memory, before allocating anything
        stored = loading.checkpoint.stored_layers(ckpt)
        if strict and stored is not None and stored != ckpt.config.n_layers:
            raise DiffMambaError(f"{ckpt.directory / 'config.json'}: the model has {ckpt.config.n_layers} layers but the "
                                 f"weights hold {stored} blocks (strict=False loads what fits)")
        shapes = ModelShapes(ckpt.config, where=str(ckpt.directory / "config.json"))
        if not strict:
            loading.checkpoint.check_size(shapes.n_params, torch_dtype, ckpt.directory / "config.json")
        fits = loading.match_state(shapes.state(), ckpt, report)
        if not report.ok:
            where = ckpt.files[0] if len(ckpt.files) == 1 else ckpt.directory
            if strict:
                raise DiffMambaError(
                    f"{where}: the weights do not match config.json: {report.summary()} (strict=False loads what fits)"
                )
            log.warning("%s: loaded with strict=False, left at init or ignored: %s", where, report.summary())
        loading.checkpoint.check_size(shapes.n_params, torch_dtype, ckpt.directory / "config.json")
        model = cls(ckpt.config)
        model.load_state_dict(fits, strict=False)
        try:
            model.to(device=torch_device, dtype=torch_dtype)
        except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a machine without one
            raise DiffMambaError(f"cannot move the model to {torch_device} / {torch_dtype}: {one_line(e)}") from None
        model.eval()
        model.load_report = report
        model.tokenizer = loading.checkpoint.tokenizer_or_none(ckpt.directory)
        model.checkpoint_path = str(ckpt.directory)  # lets lens="tuned" find tuned_lens.* next to the weights
        log.info("loaded %s (%s, %s) from %s", ckpt.config.arch, ckpt.format, torch_dtype, ckpt.directory)
        return model

    def save_pretrained(self, path) -> None:
        """Write config.json + model.safetensors (+ tokenizer) in the transformers / upstream layout
        (or ours, for architectures that have none); `from_pretrained(path)` reads it back."""
        loading.save_pretrained(self, path)


class ModelShapes:
    """The state-dict shapes and parameter count of a HookedMamba of config `cfg`, without allocating
    and without building every block: on the meta device, the model's top level (built with one
    layer) and one block of each kind (plain / differential, `archs.create_block`), whose shapes every
    block of that kind shares. `n_params` is O(1) in n_layers; `state()` lists every key."""

    def __init__(self, cfg: MambaConfig, where: str = "config"):
        try:
            self._build(cfg)
        except (RuntimeError, OverflowError, TypeError) as e:  # "Storage size calculation overflowed", "Overflow when unpacking long"
            raise DiffMambaError(f"{where}: sizes too large to build any model ({one_line(e)})") from None

    def _build(self, cfg: MambaConfig) -> None:
        import dataclasses

        self.cfg = cfg
        with torch.device("meta"):
            top = HookedMamba(dataclasses.replace(cfg, n_layers=1, diff_layers="all" if cfg.is_diff else cfg.diff_layers))
            self.top = {k: v.shape for k, v in top.state_dict().items() if not k.startswith("blocks.")}
            top_params = sum(p.numel() for n, p in top.named_parameters() if not n.startswith("blocks."))
            diff = set(cfg.diff_layer_indices)
            kinds = {}
            for kind, i in (("plain", next((i for i in range(cfg.n_layers) if i not in diff), None)),
                            ("diff", min(diff) if diff else None)):
                if i is not None:
                    block = create_block(cfg, i)
                    kinds[kind] = ({k: v.shape for k, v in block.state_dict().items()}, sum(p.numel() for p in block.parameters()))
        self.kinds = kinds
        self.diff = diff
        n_diff = len(diff)
        self.n_params = top_params + (cfg.n_layers - n_diff) * kinds.get("plain", ({}, 0))[1] + n_diff * kinds.get("diff", ({}, 0))[1]

    def state(self) -> dict[str, torch.Size]:
        out = dict(self.top)
        for i in range(self.cfg.n_layers):
            for k, shape in self.kinds["diff" if i in self.diff else "plain"][0].items():
                out[f"blocks.{i}.{k}"] = shape
        return out


def load_model(path, device=None, dtype=None, strict: bool = True, non_finite: str = "error") -> HookedMamba:
    """`HookedMamba.from_pretrained(path, device, dtype, strict, non_finite)`: see there."""
    return HookedMamba.from_pretrained(path, device=device, dtype=dtype, strict=strict, non_finite=non_finite)
