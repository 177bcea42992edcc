"""The TransformerLens token conveniences of `HookedMamba` (a mixin): texts to token ids and back,
right padding with lengths, and the unembedding / embedding matrices.

- `to_tokens(texts, return_lengths=False)`: [batch, pos], right-padded when the texts differ in
  length (pad id: the tokenizer's pad token, else 0); with `return_lengths`, also each row's real
  length. A causal model read at each row's own positions is exact on a right-padded batch, and every
  analysis that takes a batch accepts `lengths=`.
- `to_string`, `to_str_tokens`, `to_single_token`.
- `W_U` [d, V] is the unembedding with norm_f's gain folded in (TransformerLens's `fold_ln=True`):
  `norm_f(x) @ lm_head.T == (x · 1/rms(x)) @ W_U`. `W_E` [V, d] is the embedding.
  `tokens_to_residual_directions(t)` is `W_U[:, t]` moved last ([d] or [..., d]), so a residual
  vector scaled by norm_f's 1/rms (`ActivationCache.apply_ln_to_stack`) dotted with it is its logit.
"""

from __future__ import annotations

import torch

from .errors import DiffMambaError

Tensor = torch.Tensor


class TokenMethods:
    """Mixed into `HookedMamba`; needs `self.tokenizer`, `self.device`, `self.embed`, `self.norm_f`, `self.lm_head`."""

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise DiffMambaError("this model has no tokenizer; pass token ids or load a checkpoint that has one")
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        """The id right padding uses: the tokenizer's pad token, else 0 (never read by a causal model)."""
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        return int(pad) if pad is not None else 0

    def to_tokens(self, text: str | list[str], return_lengths: bool = False):
        """Tokenize with the checkpoint's tokenizer (no special tokens) -> ids [batch, pos], right-padded
        with `pad_token_id` when the texts differ in length; with return_lengths, (ids, lengths [batch]).
        Words outside the vocabulary give one `UnknownTokenWarning` with their count (`analysis.inputs.warn_unknown`)."""
        tok = self._need_tokenizer()
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise DiffMambaError(f"to_tokens takes a text or a non-empty list of texts, got {type(text).__name__}")
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        empty = next((i for i, row in enumerate(ids) if not row), None)
        if empty is not None:
            raise DiffMambaError(f"text {empty} ({texts[empty][:40]!r}) produces no tokens")
        from .analysis.inputs import warn_unknown

        warn_unknown(texts, ids, tok)  # one warning when the texts hold words outside the vocabulary
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.long, device=self.device)
        L = int(lengths.max())
        out = torch.full((len(ids), L), self.pad_token_id, dtype=torch.long)
        for r, row in enumerate(ids):
            out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        out = out.to(self.device)
        return (out, lengths) if return_lengths else out

    def to_string(self, tokens) -> str | list[str]:
        """Token ids [pos] -> one text; [batch, pos] -> a list of texts (decoded as they are, padding included)."""
        tok = self._need_tokenizer()
        t = torch.as_tensor(tokens)
        if t.ndim == 0:
            t = t[None]
        if t.ndim == 1:
            return tok.decode(t.tolist())
        if t.ndim == 2:
            return [tok.decode(row) for row in t.tolist()]
        raise DiffMambaError(f"to_string takes token ids [pos] or [batch, pos], got shape {tuple(t.shape)}")

    def to_str_tokens(self, text_or_ids) -> list[str]:
        """A text or token ids [pos] (or [1, pos]) -> the list of its tokens as strings, each decoded
        as TransformerLens does (" kitchen", not the byte-level "Ġkitchen")."""
        tok = self._need_tokenizer()
        ids = self.to_tokens(text_or_ids)[0] if isinstance(text_or_ids, str) else torch.as_tensor(text_or_ids).flatten()
        return tok.batch_decode([[i] for i in ids.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (encoded as given, TransformerLens's rule);
        a one-line DiffMambaError if it is several tokens or the unknown token."""
        tok = self._need_tokenizer()
        if not isinstance(string, str):
            raise DiffMambaError(f"to_single_token takes a string, got {type(string).__name__}")
        ids = tok.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            raise DiffMambaError(f"{string!r} is {len(ids)} tokens, not one: {tok.convert_ids_to_tokens(ids)[:8]}")
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and ids[0] == unk and string.strip() != (tok.unk_token or ""):
            raise DiffMambaError(f"{string!r} is not in the tokenizer's vocabulary (it encodes to the unknown token)")
        return int(ids[0])

    # -- matrices --------------------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """The embedding [V, d]."""
        return self.embed.weight

    @property
    def W_U(self) -> Tensor:
        """The unembedding [d, V] with norm_f's gain folded in (as TransformerLens's fold_ln)."""
        return self.norm_f.weight[:, None] * self.lm_head.weight.T

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        """Token ids (an int, a string that is one token, or a tensor of ids) -> their unembedding
        directions `W_U[:, t]`: [d] for one token, [..., d] for a tensor of ids."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        t = torch.as_tensor(tokens, device=self.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise DiffMambaError(f"tokens must be token ids, got dtype {t.dtype}")
        V = self.lm_head.weight.shape[0]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
            raise DiffMambaError(f"token id {int(t.max()) if int(t.max()) >= V else int(t.min())} is out of range for vocab size {V}")
        return self.W_U.T[t]
