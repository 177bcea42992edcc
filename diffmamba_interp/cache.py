"""`MambaActivationCache`: TransformerLens's `ActivationCache` for a (Diff-)Mamba model, returned by
`HookedMamba.run_with_cache`.

TransformerLens's own methods work unchanged where the names match (`cache["resid_post", 3]`,
`cache["mixer_out", 0]`, `stack_activation`, `accumulated_resid`, `logit_attrs`, `.to()`,
`remove_batch_dim`); the ones that assume attention and MLP sublayers are replaced:

- `decompose_resid`: the residual into layer l as embed + each block's `hook_mixer_out`; a
  differential block (Diff-Mamba-1/2) split into its two branches' contributions with the subln's
  1/rms frozen (`Differential.branch_terms`: (1 − λ_init)·w ⊙ (o1·s) and (1 − λ_init)·w ⊙ (−λ·o2·s))
  and the remainder (mixer_out minus the two, rounding only). The terms sum to the residual.
- `apply_ln_to_stack`: multiply by the cached 1/rms of the norm that reads that residual
  (`norm_f.hook_scale` for the final layer, `blocks.{l}.norm.hook_scale` before block l); the gain
  is folded into `model.W_U` (TransformerLens's fold_ln), so `apply_ln_to_stack(x) @ W_U` is the
  logit. `recompute_ln=True` at the final layer normalises each component by its own rms.
- `logit_lens()`: accumulated_resid(apply_ln=True) @ W_U, the logit lens over every layer.
"""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities import Slice

from .differential import Differential
from .errors import DiffMambaError
from .schemas import BRANCH_COMPONENTS

Tensor = torch.Tensor

_NO_HEADS = ("stack_head_results", "compute_head_results", "get_neuron_results", "stack_neuron_results",
             "get_full_resid_decomposition")


class MambaActivationCache(ActivationCache):
    """The hook values of one run, keyed by hook name, with TransformerLens's analysis methods."""

    def __contains__(self, key) -> bool:
        return key in self.cache_dict

    def get(self, key, default=None):
        return self.cache_dict.get(key, default)

    def __getitem__(self, key) -> Tensor:
        """A hook name, or TransformerLens's shorthand: `cache["resid_post", 3]`, `cache["mixer_out", -1]`,
        `cache["scale"]` (TL's ln_final is our norm_f)."""
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        if isinstance(key, str):
            name = get_act_name(key)
        else:
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], self._n_layers + key[1], *key[2:])
            name = get_act_name(*key)
        if name.startswith("ln_final."):
            name = "norm_f." + name[len("ln_final."):]
        if name not in self.cache_dict:
            raise KeyError(f"{name!r} is not in this cache (it holds {len(self.cache_dict)} hooks, e.g. "
                           f"{', '.join(list(self.cache_dict)[:3])}); hook_ssm_state is cached only when names_filter "
                           f"names it")
        return self.cache_dict[name]

    @property
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _layer(self, layer) -> int:
        if layer is None or layer == -1:
            return self._n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self._n_layers:
            raise DiffMambaError(f"layer must be 0..{self._n_layers} (the input to that block; {self._n_layers} = the "
                                 f"final residual), got {layer!r}")
        return layer

    @staticmethod
    def _no_mlp(incl_mid: bool = False, mlp_input: bool = False) -> None:
        if incl_mid or mlp_input:
            raise DiffMambaError("a Mamba block has no MLP sublayer: there is no resid_mid (incl_mid / mlp_input)")

    # -- the residual stream -----------------------------------------------------------------------
    def accumulated_resid(self, layer=None, incl_mid: bool = False, apply_ln: bool = False, pos_slice=None,
                          mlp_input: bool = False, return_labels: bool = False):
        """The residual into blocks 0..layer−1 and (layer = n_layers, the default) the final one:
        [layer + 1, batch, pos, d], labels "0_pre" … "final_post"."""
        self._no_mlp(incl_mid, mlp_input)
        return super().accumulated_resid(self._layer(layer), apply_ln=apply_ln, pos_slice=pos_slice,
                                         return_labels=return_labels)

    def decompose_resid(self, layer=None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
                        pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """The residual into block `layer` (default: the final residual) as a stack [terms, batch, pos, d]
        that sums to it: "embed", then per block "{i}_mixer_out", or for a differential block
        "{i}_mixer_1", "{i}_-λ·mixer_2" and "{i}_subln_remainder" (mode "all"); mode "blocks" keeps one
        "{i}_mixer_out" per block."""
        self._no_mlp(mlp_input=mlp_input)
        if mode not in ("all", "blocks"):
            raise DiffMambaError(f"mode must be 'all' (branches of differential blocks split) or 'blocks', got {mode!r}")
        layer = self._layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        terms, labels = [], []
        if incl_embeds:
            terms.append(self["hook_embed"])
            labels.append("embed")
        for i in range(layer):
            block, out = self.model.blocks[i], self[f"blocks.{i}.hook_mixer_out"]
            if mode == "all" and isinstance(block, Differential):
                t1, t2 = self._branch_terms(i, block)
                terms += [t1, t2, out - t1 - t2]
                labels += [f"{i}_{BRANCH_COMPONENTS[0]}", f"{i}_{BRANCH_COMPONENTS[1]}", f"{i}_subln_remainder"]
            else:
                terms.append(out)
                labels.append(f"{i}_mixer_out")
        if not terms:
            raise DiffMambaError("nothing to decompose: layer 0 without the embedding")
        stack = torch.stack([pos_slice.apply(t, dim=-2) for t in terms])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _branch_terms(self, i: int, block) -> tuple[Tensor, Tensor]:
        b1, b2 = block.BRANCHES
        o1, o2 = self[f"blocks.{i}.{b1}.hook_out"], self[f"blocks.{i}.{b2}.hook_out"]
        lam, s = self[f"blocks.{i}.hook_lambda"], self[f"blocks.{i}.subln.hook_scale"]
        return block.branch_terms(o1, o2, lam.to(o1.dtype), s.to(o1.dtype))

    def apply_ln_to_stack(self, residual_stack: Tensor, layer=None, mlp_input: bool = False, pos_slice=None,
                          batch_slice=None, has_batch_dim: bool = True, recompute_ln: bool = False) -> Tensor:
        """residual_stack [terms, (batch,) pos, d] read by the norm before block `layer` (default: norm_f)
        -> each term times that norm's cached 1/rms (its gain is in W_U); recompute_ln at the final
        layer: each term divided by its own rms."""
        self._no_mlp(mlp_input=mlp_input)
        layer = self._layer(layer)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == self._n_layers:
            eps = self.model.norm_f.eps
            return residual_stack * torch.rsqrt(residual_stack.pow(2).mean(-1, keepdim=True) + eps)
        key = "norm_f.hook_scale" if layer == self._n_layers else f"blocks.{layer}.norm.hook_scale"
        scale = pos_slice.apply(self[key], dim=-2)
        if has_batch_dim and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return residual_stack * scale.to(residual_stack.dtype)

    def logit_lens(self, pos_slice=None) -> Tensor:
        """Logits of every layer's residual through norm_f and lm_head: [n_layers + 1, batch, pos, V]."""
        resid = self.accumulated_resid(apply_ln=True, pos_slice=pos_slice)
        return resid @ self.model.W_U.to(resid.dtype)


def _no_heads(name: str):
    def refuse(self, *args, **kwargs):
        raise DiffMambaError(f"{name}: a Mamba model has no attention heads or MLP neurons; use decompose_resid "
                             f"(blocks and differential branches) instead")
    refuse.__name__ = name
    return refuse


for _name in _NO_HEADS:
    setattr(MambaActivationCache, _name, _no_heads(_name))
