"""nnsight on a `HookedMamba`: `MambaNNsight(model)`, an `nnsight.NNsight` that knows two things
about this model that plain `NNsight(model)` does not.

1. **SSM states on request.** A mixer materialises its per-position states (`hook_ssm_state`,
   [batch, pos, H, P, N] or [batch, pos, E, N]) only when something asks for them: a TransformerLens
   hook, or `capture_states` (`HookedMamba.capture_states()`), because nnsight adds no torch hook.
   With plain `NNsight(model)`, reading `.output` of a `hook_ssm_state` without
   `with model.capture_states():` ends in nnsight's `OutOfOrderError`. `MambaNNsight` turns the
   capture on, for this trace only, for each mixer whose `hook_ssm_state` the trace reads or writes
   (`.output`, `.input`, `.inputs`) or names in `tracer.cache(modules=[...])`:
   `capture_states="auto"` (the default). Requests are made in execution order, so the capture is
   on before that mixer's scan runs. `capture_states=True` captures every mixer's states in every
   trace (for `tracer.cache()` over all modules, which otherwise leaves the states out, as
   `run_with_cache` does); `capture_states=False` never turns it on (states are then read only
   inside `with model.capture_states():`, and asking for one without it raises at once). When a
   state cannot be served — asked for after its mixer ran past it, or with `capture_states=False` —
   the error is a one-line `DiffMambaError` that names `capture_states`.

2. **Several invokes in one trace.** `with ns.trace() as tr:` may hold several
   `with tr.invoke(x):` blocks. Each `x` is token ids (a LongTensor [batch, pos] or [pos], a list
   of ints or of lists of ints) or text (a str or a list of str, tokenised with `model.tokenizer`,
   no special tokens, like `model.to_tokens`). nnsight runs all invokes as one forward; this wrapper
   builds that batch by RIGHT-padding every invoke to the longest one (pad id:
   `tokenizer.pad_token_id`, else 0). The model is causal, so each row's values at its own
   positions are those of a separate run (up to floating-point rounding). Each invoke's block then
   sees only **its own rows and its own positions**: nnsight narrows every batched value to the
   invoke's rows, and this wrapper also cuts every [batch, pos, ...] value to the invoke's length,
   so `output[:, -1]` is the invoke's own last token and saved values have the shapes of a separate
   run. Edits write through (in place, or `.output = value` of the invoke's shape; the pad
   positions are left as they were), and gradients (`with loss.backward():`) come back per invoke.

Limits (nnsight 0.8.1 batches invokes as a dim-0 stack, narrowing any value whose dim 0 is the
batch; these follow from it):
- The rows of one invoke must have one length (a list of texts of different token lengths is
  refused: give each text its own `tr.invoke`).
- An empty `tr.invoke()` sees the whole padded batch, pad positions included.
- With two or more invokes, `return_type="loss"`/`"both"` (one number over the padded batch) and the
  recurrent-mode arguments `state=` / `return_state=` are refused: use one invoke, or
  `HookedMamba` directly.
- A value is cut to an invoke's positions when its dim 0 is the batch and its dim 1 the padded
  length; every hook and module output of a `HookedMamba` is [batch, pos, ...] except λ
  (`hook_lambda`, a scalar, which every invoke sees whole).

    from diffmamba_interp.nnsight_model import MambaNNsight

    ns = MambaNNsight(model)
    with ns.trace(ids):                                          # no capture_states() needed
        h = ns.blocks[0].mixer.hook_ssm_state.output.save()
    with ns.trace() as tr:
        with tr.invoke("Mary went to the kitchen."):
            a = ns.output.save()                                 # [1, len_a, vocab]
        with tr.invoke(other_ids):
            ns.blocks[0].hook_diff.output[:, -1] = 0             # this invoke's last token only
            b = ns.output.save()                                 # [1, len_b, vocab]

Needs nnsight >= 0.8 (its `Batcher` and `eproperty`).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DiffMambaError

try:
    from nnsight import NNsight
    from nnsight.intervention.batching import Batcher
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.eproperty import eproperty
    from nnsight.intervention.interleaver import OutOfOrderError
    from nnsight.intervention.tracer import InterleavingTracer
except ImportError as e:  # nnsight before 0.8 has none of these
    import nnsight as _nnsight

    raise ImportError(f"diffmamba_interp.nnsight_model needs nnsight >= 0.8 (found "
                      f"{getattr(_nnsight, '__version__', 'an older version')}): {e}") from e

Tensor = torch.Tensor

CAPTURE_MODES = ("auto", True, False)
STATE_HOOK = "hook_ssm_state"
# forward arguments that make no sense for a batch of several right-padded invokes
_ONE_INVOKE_ONLY = ("state", "return_state")


# -- inputs ----------------------------------------------------------------------------------------
def _rows(model, x) -> Tensor:
    """One invoke's input -> LongTensor [rows, len] on the model's device: token ids as given, text
    tokenised with `model.tokenizer` (no special tokens). Rows of one invoke must share a length."""
    if isinstance(x, Tensor):
        if torch.is_floating_point(x) or x.is_complex() or x.dtype == torch.bool:
            raise DiffMambaError(f"an invoke's input must be integer token ids or text, got a {x.dtype} tensor")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DiffMambaError(f"an invoke's token ids must have shape [batch, pos] or [pos] with batch, pos >= 1, "
                                 f"got shape {tuple(x.shape)}")
        return x.to(device=model.device, dtype=torch.long)
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, (list, tuple)) or not x:
        raise DiffMambaError(f"an invoke's input must be token ids (a LongTensor, a list of ints) or text (a str, a "
                             f"list of str), got {type(x).__name__ if not isinstance(x, (list, tuple)) else 'an empty list'}")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        x = [list(x)]
    elif all(isinstance(t, str) for t in x):
        if model.tokenizer is None:
            raise DiffMambaError("this model has no tokenizer; give the invoke token ids, not text")
        x = [model.tokenizer.encode(t, add_special_tokens=False) for t in x]
    elif not all(isinstance(r, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in x):
        raise DiffMambaError("an invoke's input must be token ids (a LongTensor, a list of ints or of lists of ints) or "
                             "text (a str, a list of str), not a mix")
    lengths = [len(r) for r in x]
    if min(lengths) == 0:
        raise DiffMambaError("an invoke's input has a row of 0 tokens (an empty text?)")
    if len(set(lengths)) > 1:
        raise DiffMambaError(f"the rows of one invoke have different token lengths {lengths}: give each its own "
                             f"tr.invoke(...) (invokes are right-padded to one batch; rows within one invoke are not)")
    return torch.tensor(x, dtype=torch.long, device=model.device)


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # tensors of several elements, states: only the very same object is the same
        return False


def _check_batch_kwargs(kwargs: dict) -> None:
    """Refuse the forward arguments that are wrong for several right-padded invokes run as one batch."""
    for key in _ONE_INVOKE_ONLY:
        if kwargs.get(key) not in (None, False):
            raise DiffMambaError(f"{key}= needs a trace with one invoke: several invokes are right-padded into one "
                                 f"batch, so a state would include the padding")
    if kwargs.get("return_type", "logits") not in ("logits", None):
        raise DiffMambaError(f"return_type={kwargs['return_type']!r} is one number for the whole padded batch; with "
                             f"several invokes read ns.output (logits) and compute each invoke's loss from it")


class _PaddingBatcher(Batcher):
    """nnsight's dim-0 `Batcher`, plus right padding: each invoke's token ids are recorded with their
    length, `_batch` pads them to the longest, and an invoke reads (and writes) its own rows *and* its
    own positions of every [batch, pos, ...] value."""

    def __init__(self, envoy, kwargs: dict | None = None) -> None:
        super().__init__(envoy, kwargs)
        self.lengths: dict[int, int] = {}  # first row of an invoke's group -> its number of tokens
        self.width = 0  # the padded length: the longest invoke

    def add(self, *inputs: Any, **kwargs: Any):
        inputs, kwargs = self.envoy._normalise(inputs, kwargs)
        group = super().add(*inputs, **kwargs)
        if group is not None:
            length = inputs[0].shape[1]
            self.lengths[group[0]] = length
            self.width = max(self.width, length)
        return group

    def assemble(self, fn: Any) -> tuple:
        args, kwargs = super().assemble(fn)
        if self.batching:
            _check_batch_kwargs(kwargs)
        return args, kwargs

    def _cut(self, tensor: Tensor, group: list) -> int | None:
        """The invoke's length when `tensor` ([total, width, ...]) must be cut to it, else None."""
        length = self.lengths.get(group[0], self.width)
        if length < self.width and tensor.ndim >= 2 and tensor.shape[0] == self.total and tensor.shape[1] == self.width:
            return length
        return None

    def _narrow_tensor(self, tensor: Tensor, group: list) -> Tensor:
        view = super()._narrow_tensor(tensor, group)
        length = self._cut(tensor, group)
        if length is None:
            return view
        view = view.narrow(1, 0, length)  # still a view of the batch: in-place edits reach the model
        view._nnsight_batch = True  # nnsight's mark for a batch slice (its gradient hooks read the base)
        return view

    def _widen_tensor(self, full: Tensor, group: list, edited: Any) -> Tensor:
        length = self._cut(full, group)
        if length is not None and isinstance(edited, Tensor) and not (edited.ndim >= 2 and edited.shape[1] == self.width):
            start, size = group
            rows = full.narrow(0, start, size)
            try:
                edited = edited.to(full.dtype).expand(size, length, *full.shape[2:])
            except RuntimeError as e:
                raise DiffMambaError(f"the value assigned in an invoke of {length} tokens has shape {tuple(edited.shape)}; "
                                     f"it must broadcast to {(size, length, *full.shape[2:])}") from e
            edited = torch.cat([edited, rows.narrow(1, length, self.width - length)], dim=1)  # pads kept
        return super()._widen_tensor(full, group, edited)


# -- states on request -----------------------------------------------------------------------------
class _ArmingEProperty(eproperty):
    """An `Envoy` value (output / input / inputs) of a `hook_ssm_state` that, when a trace asks for it,
    first turns on its mixer's state capture (`MambaNNsight._request_state`)."""

    def __get__(self, obj, owner=None):
        if obj is not None:
            _request_state(obj)
        return super().__get__(obj, owner)

    def __set__(self, obj, value) -> None:
        _request_state(obj)
        super().__set__(obj, value)


def _arming(base: eproperty) -> _ArmingEProperty:
    prop = _ArmingEProperty(key=base.key, description=base.description)
    prop.name, prop.__doc__ = base.name, base.__doc__
    prop._preprocess, prop._postprocess, prop._transform = base._preprocess, base._postprocess, base._transform
    return prop


def _request_state(envoy) -> None:
    if not envoy.interleaver.interleaving:  # outside a run nnsight raises its own error
        return
    request = getattr(envoy.root, "_request_state", None)
    if request is not None:
        request(envoy.path)


class _StateEnvoy(Envoy):
    """The envoy of a `hook_ssm_state`: reading or writing it asks for its mixer's states."""

    output = _arming(Envoy.__dict__["output"])
    input = _arming(Envoy.__dict__["input"])
    inputs = _arming(Envoy.__dict__["inputs"])


class _Tracer(InterleavingTracer):
    """`tracer.cache(modules=[...])` that names a `hook_ssm_state` asks for its mixer's states."""

    def cache(self, modules=None, *args, **kwargs):
        view = super().cache(modules, *args, **kwargs)
        request = getattr(self.envoy, "_request_state", None)
        for m in modules or ():
            path = m if isinstance(m, str) else getattr(m, "path", None)
            if request is not None and isinstance(path, str):
                request(path)
        return view


_DANGLING = re.compile(r"'([\w.]+\.hook_ssm_state)\.(?:output|input)(?:\.i\d+)?'")


# -- the wrapper -----------------------------------------------------------------------------------
class MambaNNsight(NNsight):
    """`nnsight.NNsight` for a `HookedMamba`: SSM states on request and several invokes per trace.

    `MambaNNsight(model, capture_states="auto")`; see the module docstring. Everything else is
    nnsight's `NNsight` (`trace`, `.output`, `.input`, `.save()`, `tracer.cache`, `edit`, ...), and the
    module paths are the model's (`ns.blocks[0].mixer_2.hook_dt`).
    """

    _batcher_class = _PaddingBatcher

    def __init__(self, model, capture_states="auto", rename: dict | None = None) -> None:
        from .model import HookedMamba

        if not isinstance(model, HookedMamba):
            raise DiffMambaError(f"MambaNNsight wraps a HookedMamba, got {type(model).__name__}")
        if not any(capture_states is m or (isinstance(m, str) and capture_states == m) for m in CAPTURE_MODES):
            raise DiffMambaError(f"capture_states must be 'auto', True or False, got {capture_states!r}")
        super().__init__(model, rename=rename, envoys={STATE_HOOK: _StateEnvoy})
        object.__setattr__(self, "_capture", capture_states)
        object.__setattr__(self, "_units", {f"{self.path}.{name}.{STATE_HOOK}": (name, unit) for name, unit in model.mixers()})
        object.__setattr__(self, "_restore", {})  # unit -> its capture_states before this run
        sig = inspect.signature(type(model).forward)  # the class's: nnsight replaces the instance's forward
        object.__setattr__(self, "_signature", sig.replace(parameters=list(sig.parameters.values())[1:]))

    # -- tracing ---------------------------------------------------------------------------------
    def trace(self, *args: Any, tracer_cls=None, **kwargs: Any):
        return super().trace(*args, tracer_cls=tracer_cls or _Tracer, **kwargs)

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._capture is True:
            for _, unit in self._units.values():
                self._turn_on(unit)
        try:
            return super().interleave(fn, *args, **kwargs)
        except OutOfOrderError as e:
            found = _DANGLING.search(str(e))
            if found is None:
                raise
            # every request turned its mixer's capture on (or, with capture_states=False, found it on or
            # raised at once), so a state still waiting when the run ends was asked for too late
            raise DiffMambaError(self._state_error(found.group(1), late=True)) from e
        finally:
            for unit, old in self._restore.items():
                unit.capture_states = old
            self._restore.clear()

    def _turn_on(self, unit) -> None:
        self._restore.setdefault(unit, unit.capture_states)
        unit.capture_states = True

    def _request_state(self, path: str) -> None:
        """A trace asked for `path` (a `hook_ssm_state`): capture its mixer's states in this run."""
        entry = self._units.get(path)
        if entry is None:
            return
        name, unit = entry
        if self._capture is False:
            if not unit.wants_states():
                raise DiffMambaError(self._state_error(path))
            return
        self._turn_on(unit)

    def _state_error(self, path: str, late: bool = False) -> str:
        """The one line for a state that cannot be served: never captured, or asked for too late."""
        short = path.removeprefix(f"{self.path}.")
        if not late:
            return (f"{short} is computed only when states are captured: use MambaNNsight(model, capture_states='auto') "
                    f"(the default) or True, or run the trace inside `with model.capture_states():`")
        return (f"{short} was asked for after the model had run past it: ask for it before its mixer's hook_ssm_out "
                f"and any later module, in the order the model runs (capture_states={self._capture!r} captures a state "
                f"only for a request made in time)")

    # -- inputs and batching (nnsight's Envoy hooks) ---------------------------------------------
    def _normalise(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """An invoke's (args, kwargs) -> ((input_ids [rows, len],), the other forward arguments by name);
        ((), kwargs) when it has no input (a params-only or empty invoke)."""
        if not inputs and "input_ids" not in kwargs:
            return inputs, kwargs
        try:
            bound = self._signature.bind(*inputs, **kwargs)
        except TypeError as e:
            raise DiffMambaError(f"bad arguments for HookedMamba.forward in a trace or invoke: {e}") from e
        bound.apply_defaults()  # invokes that spell a default out and those that leave it agree
        arguments = dict(bound.arguments)
        ids = arguments.pop("input_ids")
        if isinstance(ids, Tensor) and ids.dtype == torch.long and ids.ndim == 2 and ids.device == self._module.device:
            return (ids,), arguments  # already normalised (nnsight asks more than once)
        return (_rows(self._module, ids),), arguments

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        inputs, _ = self._normalise(inputs, kwargs)
        return inputs[0].shape[0] if inputs else 0

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        if not invokes:
            return (), {}
        invokes = [self._normalise(inputs, kwargs) for inputs, kwargs in invokes]
        if len(invokes) == 1:
            return invokes[0]
        kwargs = dict(invokes[0][1])
        for _, other in invokes[1:]:
            for key in set(kwargs) | set(other):
                if not _same(kwargs.get(key, inspect.Parameter.empty), other.get(key, inspect.Parameter.empty)):
                    raise DiffMambaError(f"the invokes of one trace pass different {key}= ({kwargs.get(key)!r} vs "
                                         f"{other.get(key)!r}); they run as one forward: pass it to trace(...) instead")
        ids = [inputs[0] for inputs, _ in invokes]
        width = max(t.shape[1] for t in ids)
        pad = self._pad_id()
        batch = torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad) for t in ids])  # [total, width] right-padded
        return (batch,), kwargs

    def _pad_id(self) -> int:
        tok = self._module.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return pad if isinstance(pad, int) and 0 <= pad < self._module.cfg.vocab_size else 0

