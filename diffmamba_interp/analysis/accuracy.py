"""Accuracy by context length: the Diff-Mamba paper's main retrieval result (BABILong qa1–qa5 at
0k, 1k, 2k, 4k, ... tokens, per model, and the ratio between two models).

Each prompt is scored two ways:

- **argmax**: the model's top token at the last prompt position is the answer's first token (the
  first token of ``" " + answer``, as every analysis here reads the target): rank 1 at the final
  layer, the same rule as `jobs.SnrRun.accuracy_table`.
- **generate**, as upstream does: greedy decoding from the prompt (the argmax at each step, as
  transformers' ``generate(do_sample=False, num_beams=1)``), the new tokens decoded with
  ``skip_special_tokens=True`` and stripped, then scored by `compare_answers`, a copy of
  ``compare_answers(target, output, question, task_labels)`` in ``babilong/metrics.py`` of the
  BABILong benchmark (github.com/booydar/babilong; the same file is
  ``retrieval/babilong/babilong/metrics.py`` in github.com/NadavSc/Diff-Mamba, whose ``plot.py``
  scores the paper's heat-maps with it): the output is lower-cased and cut at its first ``.`` (the
  first sentence; also at ``<context>`` and ``<example>``); of the task's labels
  (`TASK_LABELS`, upstream's; for a task outside it, the prompt's candidates and answer) those
  found in that sentence, less those named in the question, must be exactly the target (every
  sub-target of a comma list such as qa8's ``apple,football``). Upstream's other rule,
  ``compare_answers(target, output)`` of ``babilong/babilong_utils.py`` (the target anywhere in the
  first sentence), is `target_in_first_sentence`, used when there are no labels at all.

  Upstream generates 20 new tokens (``run_model_on_babilong.py``, ``max_new_tokens: 20``) and reads
  only the first sentence; here decoding stops early once every row of a batch has ended its first
  sentence (a ``.``), produced the eos token, or reached a newline after some text (the one
  difference: upstream reads past such a newline up to the first ``.``), and after
  `MAX_NEW_TOKENS` (20) tokens in any case.

Batches are right-padded with each row's real length: the prompt runs in pieces of ``chunk_size``
tokens with the state carried (`recurrent.collect`; memory bounded at any length), cut also at each
row's own end, where that row's logits and recurrent state are taken (`prefill_rows`); decoding
then steps every row from its own state (`model.step`), so batched decoding is exact, token for
token the same as one prompt at a time. Under torchrun the prompts are sharded across the ranks
(dealt by length, so each rank gets its share of every length) and the rows gathered on every rank.

Results (`accuracy_by_length`): one row per example (`EXAMPLE_COLUMNS`) and one per model × task ×
length (`TABLE_COLUMNS`: n, accuracy_argmax and accuracy_generate with 95% Wilson intervals), and the
ratio of two models' accuracies per task × length (`accuracy_ratio`: b / a, the paper's comparison
figure).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..distributed import gather_rows, is_main, shard
from ..errors import DiffMambaError
from ..recurrent import check_chunk_size, collect
from ..state import MixerState, ModelState
from .inputs import encode_prompts, first_token, padded_batches

__all__ = ["TASK_LABELS", "MAX_NEW_TOKENS", "SCORERS", "EXAMPLE_COLUMNS", "TABLE_COLUMNS", "RATIO_COLUMNS",
           "AccuracyResult", "accuracy_by_length", "score_examples", "accuracy_table", "accuracy_ratio",
           "compare_answers", "preprocess_output", "target_in_first_sentence", "generation_correct",
           "prefill_rows", "greedy_rows", "expand_task_lists"]

# upstream's labels per task (babilong/metrics.py TASK_LABELS)
TASK_LABELS = {
    "qa1": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa2": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa3": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa4": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"],
    "qa6": ["no", "yes"],
    "qa7": ["none", "one", "three", "two"],
    "qa8": ["apple", "football", "milk", "nothing"],
    "qa9": ["no", "yes"],
    "qa10": ["maybe", "no", "yes"],
    "qa11": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa12": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa13": ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"],
    "qa14": ["bedroom", "cinema", "kitchen", "office", "park", "school"],
    "qa15": ["cat", "mouse", "sheep", "wolf"],
    "qa16": ["gray", "green", "white", "yellow"],
    "qa17": ["no", "yes"],
    "qa18": ["no", "yes"],
    "qa19": ["e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"],
    "qa20": ["bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"],
}
MAX_NEW_TOKENS = 20  # upstream's generate_kwargs
SCORERS = ("argmax", "generate")
EXAMPLE_COLUMNS = ("model", "example", "task", "length", "story", "answer", "n_tokens", "target_id", "argmax_id",
                   "correct_argmax", "output", "correct_generate")
TABLE_COLUMNS = ("model", "task", "length", "n", "accuracy_argmax", "argmax_ci_low", "argmax_ci_high",
                 "accuracy_generate", "generate_ci_low", "generate_ci_high")
RATIO_COLUMNS = ("model_a", "model_b", "task", "length", "accuracy_a", "accuracy_b", "ratio")


# -- upstream's scoring ---------------------------------------------------------------------------
def preprocess_output(output: str) -> str:
    """Upstream's `preprocess_output` (babilong/metrics.py), unchanged: lower-case, keep the first
    sentence, drop anything from ``<context>`` / ``<example>`` on. (Its last cut, at ``'Question'``,
    comes after lower-casing and so never matches; kept as upstream has it.)"""
    output = output.lower()
    output = output.split(".")[0]  # take only the first sentence from output
    output = output.split("<context>")[0]  # filter responses when the model tries to generate examples
    output = output.split("<example>")[0]
    output = output.split("Question")[0]
    return output


def compare_answers(target: str, output: str, question: str, task_labels: Sequence[str]) -> bool:
    """Upstream's `compare_answers` (babilong/metrics.py), unchanged: the labels named in the first
    sentence of `output`, less those named in `question`, are exactly the target (or, for a target
    that is a comma list longer than 3 characters, exactly its sub-targets). Case-insensitive;
    labels are matched as substrings, as upstream does."""
    output = preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}  # mentions in questions are never targets
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:  # several sub-targets (qa8)
        subtargets = target.split(",")
        return all(t in in_output for t in subtargets) and len(in_output) == len(subtargets)
    return target in in_output and len(in_output) == 1


def target_in_first_sentence(target: str, output: str) -> bool:
    """Upstream's simpler `compare_answers(target, output)` (babilong/babilong_utils.py): the target
    (case-insensitive) anywhere in the output's first sentence (before ``<context>`` / ``<example>``)."""
    output = output.lower().split(".")[0].split("<context>")[0].split("<example>")[0]
    return target.lower() in output


def _question(prompt) -> str:
    meta = getattr(prompt, "meta", None) or {}
    if isinstance(meta, dict) and isinstance(meta.get("question"), str):
        return meta["question"]
    text = getattr(prompt, "prompt", prompt)
    if not isinstance(text, str) or "Question:" not in text:
        return ""
    return text.rsplit("Question:", 1)[1].split("Answer:")[0].strip()


def task_labels(prompt) -> list[str] | None:
    """The labels `compare_answers` reads for a prompt: upstream's `TASK_LABELS` of its task, else its
    candidates and answer, else None (then `target_in_first_sentence` scores it)."""
    task = str(getattr(prompt, "task", ""))
    if task in TASK_LABELS:
        return TASK_LABELS[task]
    candidates = list(getattr(prompt, "candidates", ()) or ())
    return [*candidates, prompt.answer] if candidates else None


def generation_correct(prompt, output: str) -> bool:
    """Whether a generated `output` answers `prompt` (a `Prompt`: .answer, .task, .candidates,
    .meta["question"]), by upstream's rule (module docstring)."""
    labels = task_labels(prompt)
    if labels is None:
        return target_in_first_sentence(prompt.answer, output)
    return compare_answers(prompt.answer, output, _question(prompt), labels)


# -- batched prefill and greedy decoding, exact on right-padded batches -------------------------------
def _merge_rows(parts: list[tuple[list[int], ModelState]], batch: int) -> ModelState:
    """States of disjoint row groups -> one state of `batch` rows in row order (shared convs stay shared)."""
    rows = [r for idx, _ in parts for r in idx]
    order = torch.empty(batch, dtype=torch.long)
    order[torch.tensor(rows)] = torch.arange(len(rows))
    keys = list(parts[0][1].entries)
    conv: dict[tuple, torch.Tensor] = {}
    out = {}
    for k in keys:
        tag = tuple(id(st.entries[k].conv) for _, st in parts)
        if tag not in conv:
            conv[tag] = torch.cat([st.entries[k].conv for _, st in parts])[order.to(parts[0][1].entries[k].conv.device)]
        ssm = torch.cat([st.entries[k].ssm for _, st in parts])
        out[k] = MixerState(conv[tag], ssm[order.to(ssm.device)])
    return ModelState(out, max(st.seen for _, st in parts))


@torch.no_grad()
def prefill_rows(model, input_ids: torch.Tensor, lengths: Sequence[int], chunk_size: int | None = None,
                 return_state: bool = True):
    """A right-padded batch [B, L] with each row's real length -> (logits at each row's last real token
    [B, V], the state after each row's last real token, or None without `return_state`). The prompt
    runs in pieces of `chunk_size` tokens (state carried), also cut at each row's end."""
    model.check_input_ids(input_ids)
    B, L = input_ids.shape
    lengths = [int(k) for k in lengths]
    if len(lengths) != B or any(not 1 <= k <= L for k in lengths):
        raise DiffMambaError(f"lengths must give one length in 1..{L} per row ({B} rows), got {lengths}")
    chunk = check_chunk_size(chunk_size)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if not return_state:
        kept = collect(model, input_ids, [last], chunk_size=chunk, row_positions=[k - 1 for k in lengths])
        return model.unembed(kept[last][:, 0]), None
    ids = input_ids.to(model.device)
    logits: torch.Tensor | None = None
    parts: list[tuple[list[int], ModelState]] = []
    st, start = None, 0
    for end in sorted(set(lengths)):
        kept, st = collect(model, ids[:, start:end], [last], positions=[-1], chunk_size=chunk, state=st,
                           return_state=True)
        rows = [r for r in range(B) if lengths[r] == end]
        out = model.unembed(kept[last][rows, 0])
        if logits is None:
            logits = out.new_empty(B, out.shape[-1])
        logits[rows] = out
        parts.append((rows, st.select(rows)))
        start = end
    return logits, _merge_rows(parts, B)


def _ended(text: str) -> bool:
    """The first sentence is over: a '.', or a newline after some text."""
    return "." in text or "\n" in text.strip()


@torch.no_grad()
def greedy_rows(model, input_ids: torch.Tensor, lengths: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS,
                chunk_size: int | None = None, tokenizer=None) -> tuple[torch.Tensor, list[list[int]]]:
    """Greedy decoding of a right-padded batch, each row from its own last real token -> (the argmax at
    each row's last prompt position [B], the new token ids of each row). Stops when every row has
    ended its first sentence or produced eos (with a tokenizer), or after `max_new_tokens`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DiffMambaError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    logits, state = prefill_rows(model, input_ids, lengths, chunk_size, return_state=max_new_tokens > 1)
    first = logits.argmax(-1)
    B = len(first)
    new: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return first, new
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    done = [False] * B
    token = first
    for step in range(max_new_tokens):
        for r, t in enumerate(token.tolist()):
            if done[r]:
                continue
            new[r].append(t)
            if (eos is not None and t == eos) or (tokenizer is not None and
                                                  _ended(tokenizer.decode(new[r], skip_special_tokens=True))):
                done[r] = True
        if all(done) or step + 1 == max_new_tokens:
            break
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    return first, new


# -- scoring prompts ----------------------------------------------------------------------------------
def _length(prompt):
    meta = getattr(prompt, "meta", None) or {}
    value = meta.get("length") if isinstance(meta, dict) else None
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def score_examples(model, prompts, *, label: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = MAX_NEW_TOKENS, chunk_size: int | None = None,
                   progress: bool = True, warned: set | None = None) -> pd.DataFrame:
    """One row per prompt (`EXAMPLE_COLUMNS`): argmax and generation scores of one model.

    prompts: `Prompt`s (.prompt, .answer, .task, .candidates, .meta with "length" and "story").
    Every answer and candidate is checked against the tokenizer before any forward pass (a word that
    encodes to the unknown token is a one-line DiffMambaError naming it), and prompts with unknown
    tokens give one warning with the count (not repeated when already in `warned`, a set of messages
    given). max_new_tokens=0: argmax only (output "" and correct_generate NaN)."""
    prompts = list(prompts)
    if not prompts:
        raise DiffMambaError("no prompts to score")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DiffMambaError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
        raise DiffMambaError("score_examples takes Prompt objects (with .prompt and .answer), e.g. from data.load_data")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise DiffMambaError("this model has no tokenizer; accuracy needs text prompts and answers")
    words: dict[str, tuple[int, int, str]] = {}
    for p in prompts:  # the guard, before any forward pass: every distinct answer and candidate
        if p.answer not in words:
            words[p.answer] = first_token(p.answer, tok)
        for c in getattr(p, "candidates", ()) or ():
            if c not in words:
                words[c] = first_token(c, tok, what="candidate")
    seqs = encode_prompts([p.prompt for p in prompts], tok, seen=warned)
    V = model.cfg.vocab_size
    bad = next((a for a in words if not 0 <= words[a][0] < V), None)
    if bad is not None:
        raise DiffMambaError(f"{bad!r} is token {words[bad][0]}, out of range for the model's vocab size {V}")

    n = len(prompts)
    argmax = np.empty(n, dtype=np.int64)
    outputs = [""] * n
    mine = shard(n, [len(s) for s in seqs])  # under torchrun: this rank's prompts, long and short alike
    bar = tqdm(total=len(mine), desc=f"accuracy{f' {label}' if label else ''}", file=sys.stderr,
               disable=not progress or not is_main())
    for local, ids, last in padded_batches([seqs[i] for i in mine], batch_size, pad_id=model.pad_token_id):
        idx = [mine[j] for j in local]
        first, new = greedy_rows(model, ids.to(model.device), [k + 1 for k in last], max_new_tokens, chunk_size, tok)
        argmax[idx] = first.cpu().numpy()
        for i, gen in zip(idx, new):
            outputs[i] = tok.decode(gen, skip_special_tokens=True).strip() if gen else ""
        bar.update(len(idx))
    bar.close()
    gather_rows(mine, argmax, outputs)  # every rank: all rows
    target = np.array([words[p.answer][0] for p in prompts], dtype=np.int64)
    generated = [generation_correct(p, o) for p, o in zip(prompts, outputs)] if max_new_tokens > 0 else [np.nan] * n
    meta = [getattr(p, "meta", None) or {} for p in prompts]
    return pd.DataFrame({
        "model": label if label is not None else (getattr(model, "label", None) or model.cfg.arch),
        "example": np.arange(n),
        "task": [str(getattr(p, "task", "")) for p in prompts],
        "length": pd.array([_length(p) for p in prompts], dtype="Int64"),
        "story": [m.get("story", f"example:{i}") if isinstance(m, dict) else f"example:{i}" for i, m in enumerate(meta)],
        "answer": [p.answer for p in prompts],
        "n_tokens": [len(s) for s in seqs],
        "target_id": target,
        "argmax_id": argmax,
        "correct_argmax": argmax == target,
        "output": outputs,
        "correct_generate": pd.array(generated, dtype="boolean"),
    }, columns=list(EXAMPLE_COLUMNS))


def _natural(text) -> tuple:
    """A sort key that puts "qa2" before "qa10"."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", str(text)))


def accuracy_table(per_example: pd.DataFrame) -> pd.DataFrame:
    """Per model × task × length (`TABLE_COLUMNS`): n, and for each scorer the accuracy with its 95%
    Wilson interval at the story-clustered effective size (`stats.proportion_interval`, as the report's
    task accuracy); NaN for generation when it was not run. Models in order of appearance, tasks in
    natural order (qa2 before qa10), lengths ascending."""
    from .stats import proportion_interval

    missing = [c for c in ("model", "task", "length", "correct_argmax", "correct_generate") if c not in per_example]
    if missing:
        raise DiffMambaError(f"per-example accuracy table is missing column(s) {', '.join(missing)}")
    models = list(dict.fromkeys(per_example["model"]))
    rows = []
    for (model, task, length), g in per_example.groupby(["model", "task", "length"], sort=False, dropna=False):
        row = {"model": model, "task": task, "length": length, "n": len(g)}
        for scorer in SCORERS:
            col = g[f"correct_{scorer}"].astype("Float64")
            ok = col.dropna()
            if len(ok) == 0:
                row.update({f"accuracy_{scorer}": np.nan, f"{scorer}_ci_low": np.nan, f"{scorer}_ci_high": np.nan})
                continue
            stories = g.loc[ok.index, "story"].to_numpy() if "story" in g else None
            low, high, _ = proportion_interval(ok.to_numpy(dtype=bool), stories)
            row.update({f"accuracy_{scorer}": float(ok.mean()), f"{scorer}_ci_low": low, f"{scorer}_ci_high": high})
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    out["length"] = pd.array(out["length"], dtype="Int64")
    order = {m: i for i, m in enumerate(models)}
    out = out.assign(_m=out["model"].map(order), _t=out["task"].map(_natural),
                     _l=out["length"].astype("Float64").fillna(np.inf))
    return out.sort_values(["_m", "_t", "_l"], kind="stable").drop(columns=["_m", "_t", "_l"]).reset_index(drop=True)


def accuracy_ratio(table: pd.DataFrame, model_a: str, model_b: str, scorer: str = "generate") -> pd.DataFrame:
    """The paper's comparison: per task × length, accuracy of `model_b` / accuracy of `model_a`
    (`RATIO_COLUMNS`; above 1: b does better). NaN where a's accuracy is 0 (or either is missing)."""
    if scorer not in SCORERS:
        raise DiffMambaError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")
    col = f"accuracy_{scorer}"
    for m in (model_a, model_b):
        if m not in set(table["model"]):
            raise DiffMambaError(f"model {m!r} is not in the accuracy table (has {', '.join(map(str, dict.fromkeys(table['model'])))})")
    a = table[table["model"] == model_a][["task", "length", col]].rename(columns={col: "accuracy_a"})
    b = table[table["model"] == model_b][["task", "length", col]].rename(columns={col: "accuracy_b"})
    both = a.merge(b, on=["task", "length"], how="inner", sort=False)
    acc_a, acc_b = both["accuracy_a"].to_numpy(dtype=float), both["accuracy_b"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(acc_a > 0, acc_b / np.where(acc_a > 0, acc_a, 1.0), np.nan)
    both["ratio"] = ratio
    both.insert(0, "model_b", model_b)
    both.insert(0, "model_a", model_a)
    return both[list(RATIO_COLUMNS)].reset_index(drop=True)


@dataclass
class AccuracyResult:
    """per_example (`EXAMPLE_COLUMNS`), table (`TABLE_COLUMNS`) and the models' labels in order."""

    per_example: pd.DataFrame = field(repr=False)
    table: pd.DataFrame
    labels: list

    def ratio(self, model_a: str | None = None, model_b: str | None = None, scorer: str = "generate") -> pd.DataFrame:
        """`accuracy_ratio` of model_b over model_a (default: the second model over the first)."""
        if len(self.labels) < 2 and (model_a is None or model_b is None):
            raise DiffMambaError("a ratio needs two models")
        return accuracy_ratio(self.table, model_a or self.labels[0], model_b or self.labels[1], scorer)


def _check_words(models, prompts) -> None:
    """Every distinct answer and candidate against every model's tokenizer (`inputs.first_token`: a
    one-line DiffMambaError naming a word that encodes to the unknown token), before any forward pass."""
    if not all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
        raise DiffMambaError("accuracy takes Prompt objects (with .prompt and .answer), e.g. from data.load_data")
    answers = dict.fromkeys(p.answer for p in prompts)
    others = dict.fromkeys(c for p in prompts for c in (getattr(p, "candidates", ()) or ()) if c not in answers)
    words = [(a, "answer") for a in answers] + [(c, "candidate") for c in others]
    for m in models:
        tok = getattr(m, "tokenizer", None)
        if tok is None:
            raise DiffMambaError("a model has no tokenizer; accuracy needs text prompts and answers")
        for word, what in words:
            first_token(word, tok, what=what)


def accuracy_by_length(models, prompts, *, labels: Sequence[str] | None = None, batch_size: int = 8,
                       max_new_tokens: int = MAX_NEW_TOKENS, chunk_size: int | None = None,
                       progress: bool = True) -> AccuracyResult:
    """Accuracy of each model on `prompts` (e.g. ``data.load_data("babilong:qa1:0k,1k,2k,4k", n=100)``)
    by task and context length, scored by argmax at the last prompt position and by greedy
    generation with upstream's rule (module docstring).

    models: one HookedMamba or a list; labels: their names (default `model.label`, else the arch).
    Every model's answers and candidates are checked against its tokenizer before any model runs.
    Returns an `AccuracyResult` (.table, .per_example, .ratio(a, b))."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    prompts = list(prompts)
    if not models or not prompts:
        raise DiffMambaError("accuracy_by_length needs at least one model and one prompt")
    if labels is None:
        labels = [getattr(m, "label", None) or m.cfg.arch for m in models]
    labels = [str(x) for x in labels]
    if len(labels) != len(models):
        raise DiffMambaError(f"{len(models)} models but {len(labels)} labels")
    if len(set(labels)) != len(labels):
        labels = [f"{lab} ({i})" for i, lab in enumerate(labels)]
    _check_words(models, prompts)  # every model's tokenizer guard before the first model runs
    warned: set = set()  # models with one tokenizer: one warning for prompts with unknown tokens, not one each
    frames = [score_examples(m, prompts, label=lab, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             chunk_size=chunk_size, progress=progress, warned=warned) for m, lab in zip(models, labels)]
    per = pd.concat(frames, ignore_index=True)
    return AccuracyResult(per, accuracy_table(per), labels)


def expand_task_lists(spec: str) -> list[str]:
    """``babilong:qa1,qa2:0k,1k`` -> ``["babilong:qa1:0k,1k", "babilong:qa2:0k,1k"]`` (likewise
    ``babi:qa1,qa2``); any other spec is returned as it is, in a list."""
    scheme, sep, rest = str(spec).strip().partition(":")
    if scheme not in ("babi", "babilong") or not sep:
        return [str(spec)]
    task, _, tail = rest.partition(":")
    tasks = [t.strip() for t in task.split(",")]
    if len(tasks) == 1:
        return [str(spec)]
    if not all(tasks):
        raise DiffMambaError(f"bad data spec {spec!r}: an empty task in the list {task!r}")
    return [f"{scheme}:{t}" + (f":{tail}" if tail else "") for t in tasks]
