"""Running a model in pieces with its state carried: chunked prefill, collecting hook values at a few
positions of a long prompt in bounded memory, and state patching that propagates.

- `prefill(model, ids)`: the state after a prompt and the logits at its last position, the prompt
  run `chunk_size` tokens at a time (never [batch, pos, vocab] logits for the whole prompt).
- `collect(model, ids, names, positions)`: the values of some hooks at some positions, chunked: memory
  grows with what is kept (positions × hooks), not with the prompt's length.
- `patch_state(model, ids, mixer, pos, fn)`: replace one mixer's (or one branch's) SSM state after
  position `pos` by `fn(state)` and continue the recurrence from it. (Patching `hook_ssm_state`
  instead changes only each position's readout y_t = C_t·h_t + D·x_t: the recurrence is not re-run,
  so later positions do not see the patch.)
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .errors import DiffMambaError
from .state import MixerState, ModelState

Tensor = torch.Tensor

# tokens per piece when a prompt is run in pieces: long prompts are bounded without asking
DEFAULT_CHUNK = 2048


def check_chunk_size(chunk_size) -> int:
    """None -> DEFAULT_CHUNK; else a positive integer, or a one-line DiffMambaError."""
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise DiffMambaError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    return chunk_size


def chunk_bounds(L: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(L, a + chunk_size)) for a in range(0, L, chunk_size)]


def normalize_positions(positions, L: int) -> list[int] | None:
    """None, an int or ints (negatives count from the end) -> indices 0..L−1 (None stays None)."""
    if positions is None:
        return None
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    elif isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        q = int(p) + L if int(p) < 0 else int(p)
        if not 0 <= q < L:
            raise DiffMambaError(f"position {p} is out of range for a sequence of {L} tokens")
        out.append(q)
    if not out:
        raise DiffMambaError("positions is empty")
    return out


@torch.no_grad()
def collect(model, input_ids: Tensor, names: Iterable[str], positions=None, chunk_size: int | None = None,
            dtype: torch.dtype | None = None, state: ModelState | None = None, return_state: bool = False,
            row_positions: Sequence[int] | None = None):
    """Run input_ids [B, L] in pieces of `chunk_size` tokens (state carried) and keep each hook of
    `names` at `positions` (all when None): {name: [B, P, ...]} in the order of `positions` (a 0-d hook
    such as hook_lambda: its value), cast to `dtype`. No logits are computed. With return_state,
    also the state after the last token.

    row_positions: instead of `positions`, one position per row -> {name: [B, 1, ...]}: the last real
    token of each row of a right-padded batch (exact for a causal model: padding after a row's last
    token cannot reach it)."""
    model.check_input_ids(input_ids)
    chunk = check_chunk_size(chunk_size)
    L = input_ids.shape[1]
    if row_positions is not None:
        return _collect_rows(model, input_ids, names, row_positions, chunk, dtype)
    pos = normalize_positions(positions, L)
    wanted = set(names)
    order = sorted(set(pos)) if pos is not None else None
    parts: dict[str, list[Tensor]] = {n: [] for n in wanted}
    bounds = {"a": 0, "b": 0}

    def grab(t, hook):
        if t.ndim == 0:
            if not parts[hook.name]:
                parts[hook.name].append(t.detach().to(dtype or t.dtype))
            return
        a, b = bounds["a"], bounds["b"]
        if order is None:
            piece = t
        else:
            local = [p - a for p in order if a <= p < b]
            if not local:
                return
            piece = t[:, local]
        parts[hook.name].append(piece.detach().to(dtype or t.dtype))

    ids = input_ids.to(model.device)
    st = state
    with model.hooks(fwd_hooks=[(lambda n: n in wanted, grab)]):
        for a, b in chunk_bounds(L, chunk):
            bounds["a"], bounds["b"] = a, b
            _, st = model(ids[:, a:b], return_type=None, state=st, return_state=True)
    out = {}
    for n, ps in parts.items():
        if not ps:
            raise DiffMambaError(f"hook {n!r} did not fire (no such hook in this model)")
        if ps[0].ndim == 0:
            out[n] = ps[0]
            continue
        full = torch.cat(ps, dim=1)  # positions in increasing order
        if pos is not None:
            index = {p: i for i, p in enumerate(order)}
            full = full[:, [index[p] for p in pos]]
        out[n] = full
    return (out, st) if return_state else out


def _collect_rows(model, input_ids: Tensor, names: Iterable[str], row_positions: Sequence[int], chunk: int,
                  dtype: torch.dtype | None):
    B, L = input_ids.shape
    rows = [int(p) + L if int(p) < 0 else int(p) for p in row_positions]
    if len(rows) != B or any(not 0 <= p < L for p in rows):
        raise DiffMambaError(f"row_positions must give one position in 0..{L - 1} per row ({B} rows), got {list(row_positions)}")
    wanted = set(names)
    out: dict[str, Tensor] = {}
    bounds = {"a": 0, "b": 0}
    row_index = torch.arange(B)

    def grab(t, hook):
        if t.ndim == 0:
            out.setdefault(hook.name, t.detach().to(dtype or t.dtype))
            return
        a, b = bounds["a"], bounds["b"]
        here = [r for r in range(B) if a <= rows[r] < b]
        if not here:
            return
        if hook.name not in out:
            out[hook.name] = t.new_zeros(B, 1, *t.shape[2:], dtype=dtype or t.dtype)
        idx = torch.tensor(here, device=t.device)
        local = torch.tensor([rows[r] - a for r in here], device=t.device)
        out[hook.name][row_index[here], 0] = t[idx, local].detach().to(dtype or t.dtype)

    ids = input_ids.to(model.device)
    st = None
    last = max(rows) + 1  # nothing after the last read position is run
    with model.hooks(fwd_hooks=[(lambda n: n in wanted, grab)]):
        for a, b in chunk_bounds(last, chunk):
            bounds["a"], bounds["b"] = a, b
            _, st = model(ids[:, a:b], return_type=None, state=st, return_state=True)
    missing = wanted - set(out)
    if missing:
        raise DiffMambaError(f"hook {sorted(missing)[0]!r} did not fire (no such hook in this model)")
    return out


@torch.no_grad()
def prefill(model, input_ids: Tensor, chunk_size: int | None = None, state: ModelState | None = None):
    """Run a prompt [B, L] in pieces (state carried) -> (logits at its last position [B, V], the state after it)."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    kept, st = collect(model, input_ids, [last], positions=[-1], chunk_size=chunk_size, state=state, return_state=True)
    return model.unembed(kept[last][:, 0]), st


@torch.no_grad()
def patch_state(model, input_ids: Tensor, mixer: str, pos: int, fn: Callable[[Tensor], Tensor],
                conv_fn: Callable[[Tensor], Tensor] | None = None, return_type: str = "logits"):
    """Replace the state of one scan unit after position `pos` and continue the recurrence from it.

    mixer: a key of the model's state (`dict(model.mixers())`: "blocks.1.mixer", a branch
    "blocks.0.mixer_2", a Diff-S6 core "blocks.0.mixer.ssm_1"); fn: the state h_pos [B, E, N] or
    [B, H, P, N] -> its replacement (same shape); conv_fn likewise for the conv state [B, C, K − 1]
    (the two cores of a Mamba-1-form Diff-S6 mixer share theirs). Returns the logits [B, L, V] of the
    patched run: positions 0..pos are the clean run's, later ones follow the patched state.
    """
    model.check_input_ids(input_ids)
    L = input_ids.shape[1]
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < L:
        raise DiffMambaError(f"pos must be a position 0..{L - 1} of input_ids, got {pos!r}")
    units = dict(model.mixers())
    if mixer not in units:
        raise DiffMambaError(f"no scan unit {mixer!r} in this model; state keys: {', '.join(list(units)[:6])}…")
    ids = input_ids.to(model.device)
    head, state = model(ids[:, : pos + 1], return_type=return_type, return_state=True)
    patched = state.clone()
    entry = patched.entries[mixer]
    new_ssm = fn(entry.ssm.clone())
    new_conv = conv_fn(entry.conv.clone()) if conv_fn is not None else entry.conv
    for what, new, old in (("state", new_ssm, entry.ssm), ("conv state", new_conv, entry.conv)):
        if not isinstance(new, Tensor) or new.shape != old.shape:
            raise DiffMambaError(f"the patch function must return a tensor of shape {tuple(old.shape)} for the {what} "
                                 f"of {mixer}, got {tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__}")
    for key, e in patched.entries.items():  # a shared conv (Diff-S6, Mamba-1 form) is patched for both cores
        if e.conv is entry.conv and key != mixer:
            patched.entries[key] = MixerState(new_conv.to(e.conv.dtype), e.ssm)
    patched.entries[mixer] = MixerState(new_conv.to(entry.conv.dtype), new_ssm.to(entry.ssm.dtype))
    if pos + 1 == L:
        return head
    tail = model(ids[:, pos + 1:], return_type=return_type, state=patched)
    return torch.cat([head, tail], dim=1)

