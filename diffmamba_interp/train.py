"""The small trainer behind the shipped models: Mamba-2 vs Diff-Mamba-2 on bAbI qa1–qa5, on CPU.

Each training example is one BABILong prompt built on the fly (`PromptStream`) from a bAbI training
question (en-10k where shipped) with public-domain book filler: the first `curriculum` share of the
steps reads 0k prompts only, after which a `filler_share` of the batches get filler up to a length
drawn from `lengths` (BABILong's budget: length − 300 tokens for facts and filler). Each batch has
one length, so right-padding costs little; a causal model never sees the padding to the right of a
row's last token.

Loss (`loss`): ``"answer"``: the cross-entropy of the answer token at each row's last prompt position
(the quantity the SNR analysis reads; only those rows are unembedded); ``"lm"``: that plus
`lm_weight` × the mean next-token cross-entropy over every prompt token (the book filler included,
so the model also models general text, which is what its tuned lens is fitted on).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .archs import arch_spec
from .config import MambaConfig
from .data.tokenizer import TASKS
from .errors import DiffMambaError
from .files import check_writable, path_problem, write_atomic
from .model import HookedMamba, ModelShapes, load_model


LOSSES = ("answer", "lm")
ANSWER_END = "."  # the end token after each answer with `answer_end` (one token of the subword tokenizer)
LONG_EVAL = 1024  # filler length (tokens) of qa1 in the final evaluation, the curve and the "qa1 @ 1k" target


@dataclass
class TrainConfig:
    """Everything that determines a training run (written into the model card)."""

    arch: str = "mamba2"
    d_model: int = 64
    n_layers: int = 4
    d_state: int = 16
    head_dim: int = 16
    d_conv: int = 4  # causal conv width K (the mamba-ssm / causal-conv1d kernels take 2-4; wider runs in PyTorch)
    chunk_size: int = 32  # SSD chunk: 32 is fastest for these sizes on CPU (results do not depend on it)
    diff_layers: str = "alternate"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    max_len: int = 2048  # prompts longer than this are left out of their batch
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    init: str | None = None  # continue from this checkpoint's weights (a new schedule of `steps`)
    lengths: tuple[int, ...] = (512, 1024)  # BABILong lengths (tokens) of the filler batches
    filler_share: float = 0.3  # share of the batches with filler, once the curriculum is over
    curriculum: float = 0.3  # share of the steps (from the start) that read 0k prompts only
    loss: str = "answer"  # "answer" or "lm" (answer + lm_weight x next-token loss over the prompt)
    lm_weight: float = 0.1
    batch_tokens: int = 4096  # a batch holds at most batch_size rows and about batch_tokens tokens (at least 4 rows)
    task_curriculum: float = 0.3  # share of the steps (from the start) that read the first task (qa1) only
    first_task_share: float = 0.4  # after that, the share of rows from the first task (the others: equal shares)
    story_share: float = 0.7  # share of the 0k batches that are whole stories with every question answered
    vocab_size: int = 3072  # the subword tokenizer's size (`data.subword`)
    every_person: bool = False  # qa1: also ask where each person moved so far is (`data.every_person`)
    answer_end: bool = False  # each answer is followed by "." and the "." is scored too (where an answer ends)

    def check(self) -> None:
        """Raise a one-line DiffMambaError for the first option out of range (before any training)."""
        if not isinstance(self.arch, str):
            raise DiffMambaError(f"arch must be an architecture name, got {self.arch!r}")
        arch_spec(self.arch)  # a one-line error for an unknown arch
        for name, low in (("steps", 1), ("batch_size", 1), ("d_model", 1), ("n_layers", 1), ("d_state", 1),
                          ("head_dim", 1), ("d_conv", 1), ("chunk_size", 1), ("warmup", 1), ("max_len", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DiffMambaError(f"{_option(name)} must be a whole number >= {low}, got {value!r}")
        if self.seed >= 2**32:
            raise DiffMambaError(f"{_option('seed')} must be below 2**32, got {self.seed}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "lr" and value == 0):
                raise DiffMambaError(f"{_option(name)} must be a {'positive' if name == 'lr' else 'non-negative'} "
                                     f"finite number, got {value!r}")
        for name in ("filler_share", "curriculum", "lm_weight", "story_share", "task_curriculum", "first_task_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise DiffMambaError(f"{_option(name)} must be a number from 0 to 1, got {value!r}")
        for name in ("every_person", "answer_end"):
            if not isinstance(getattr(self, name), bool):
                raise DiffMambaError(f"{_option(name)} must be true or false, got {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise DiffMambaError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.lengths or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= self.max_len
                                       for n in self.lengths):
            raise DiffMambaError(f"--lengths must be token lengths from 1 to --max-len {self.max_len}, got {self.lengths!r}")
        tasks = (self.tasks,) if isinstance(self.tasks, str) else self.tasks
        if not tasks or not all(t in TASKS for t in tasks):
            raise DiffMambaError(f"--tasks must be a non-empty selection of {', '.join(TASKS)}, got {self.tasks!r}")

    def model_config(self, vocab_size: int) -> MambaConfig:
        self.check()
        return MambaConfig(
            arch=self.arch, d_model=self.d_model, n_layers=self.n_layers, vocab_size=vocab_size,
            d_state=self.d_state, head_dim=self.head_dim, d_conv=self.d_conv, chunk_size=self.chunk_size, diff_layers=self.diff_layers,
        )


def _option(name: str) -> str:
    """A TrainConfig field as the `train` command spells it (--batch-size)."""
    return "--" + name.replace("_", "-")


def check_options(cfg: TrainConfig, tokenizer, eval_n: int | None = None, lens_steps: int = 0) -> MambaConfig:
    """Every training option checked before any training (or any file written): the TrainConfig, the
    model it builds (sizes valid for the architecture and small enough for this machine's memory),
    --eval-n (at most the test questions of each task), --lens-steps (>= 0) and --init (a checkpoint of
    the same config). Returns the model config."""
    from .data import babi
    from .loading.checkpoint import check_size

    cfg.check()
    if isinstance(lens_steps, bool) or not isinstance(lens_steps, int) or lens_steps < 0:
        raise DiffMambaError(f"--lens-steps must be a whole number >= 0 (0: no tuned lens), got {lens_steps!r}")
    if eval_n is not None:
        if isinstance(eval_n, bool) or not isinstance(eval_n, int) or eval_n < 1:
            raise DiffMambaError(f"--eval-n must be a positive whole number, got {eval_n!r}")
        available = min(len(babi(task, "test")) for task in cfg.tasks)
        if eval_n > available:
            raise DiffMambaError(f"--eval-n {eval_n} is more than the {available} test questions of each task")
    model_cfg = cfg.model_config(len(tokenizer))
    where = f"--d-model {cfg.d_model} --n-layers {cfg.n_layers}"
    check_size(ModelShapes(model_cfg, where=where).n_params, torch.float32, where)
    if cfg.init:
        start_from = load_model(cfg.init)  # a one-line error for a missing or bad checkpoint
        if replace(start_from.cfg, extra={}) != replace(model_cfg, extra={}):
            raise DiffMambaError(f"--init {cfg.init}: its config differs from the requested model ({start_from.cfg.arch}, "
                                 f"d_model {start_from.cfg.d_model})")
    return model_cfg


@dataclass
class TrainResult:
    config: TrainConfig
    n_params: int
    n_examples: int
    wall_s: float
    final_loss: float
    accuracy: pd.DataFrame = field(repr=False)  # task, n, accuracy
    earlier: list = field(default_factory=list)  # training.json of the stages this run continued
    curve: list = field(default_factory=list)  # learning curve: {step, minutes, loss, "qa1@0": accuracy, ...}


def encode_examples(tokenizer, pairs, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt, answer) -> (prompt ids, answer token id); drops prompts longer than max_len."""
    prompts = [p for p, _ in pairs]
    answers = [" " + a for _, a in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    out = []
    for p, a, (_, answer) in zip(p_ids, a_ids, pairs):
        if len(a) != 1:
            raise DiffMambaError(f"answer {answer!r} is {len(a)} tokens; training needs one-token answers")
        if len(p) <= max_len:
            out.append((p, a[0]))
    return out


class PromptStream:
    """Endless training batches built on the fly (see the module docstring).

    ``batch(step)`` -> (ids [batch, pos] right-padded, targets [batch, pos]: the answer token id at
    each position whose next token is an answer, -100 elsewhere; length). Three kinds of batch:

    * BABILong 0k prompts, one question each (the answer at the last prompt token);
    * whole stories (a `story_share` of the 0k batches): each question of a bAbI story in its own
      BABILong block, the blocks in story order, each followed by its answer::

          <context> \n{facts before q1}\n</context>\n\nQuestion: {q1} Answer: {a1}\n<context> \n{facts
          between q1 and q2}\n</context>\n\nQuestion: {q2} Answer: {a2}\n...

      so one row answers every question of its story (five per qa1 story) from facts spread over
      the earlier blocks: five times the supervision of a prompt for half the tokens;
    * BABILong prompts with book filler, one question each, after the curriculum.

    With `answer_end` every answer is followed by an end token "." that is a target too (at the
    answer's position), so the model learns where an answer ends: greedy generation then stops after
    the answer, as upstream's scoring (the first sentence of the output) expects.

    Each row draws a task (`task_weights`: the first task alone for the first `task_curriculum` of the
    steps, then `first_task_share` of the rows for it), then a question (story) of it; `POOL` × `batch_size` items are
    drawn at a time per kind and sorted by size, and cut into batches of at most `batch_size` rows and
    about `batch_tokens` tokens, so that a batch pads little and costs about the same (a qa3 story is
    ten times a qa1 story: its batches have fewer rows).

    `stage` (the number of earlier stages a run continues, `--init`) changes the draw and the filler, so
    a continued run reads new batches, not the first stage's again; stage 0 is the from-scratch stream.
    """

    POOL = 16
    STORY = -1  # the `length` of a story batch

    def __init__(self, cfg: TrainConfig, tokenizer, stage: int = 0):
        from .data import babi
        from .data.every_person import ask_every_person

        self.cfg, self.tokenizer, self.stage = cfg, tokenizer, stage
        self.samples = {task: babi(task, "train") for task in cfg.tasks}
        if cfg.every_person:
            self.samples = {task: ask_every_person(samples) for task, samples in self.samples.items()}
        self.questions = [(task, i) for task, samples in self.samples.items() for i in range(len(samples))]
        self.size = {q: sum(len(f) + 1 for f in self.samples[q[0]][q[1]].facts) for q in self.questions}  # characters
        stories: dict[tuple[str, int], list[int]] = {}
        for task, i in self.questions:
            stories.setdefault((task, self.samples[task][i].story_id), []).append(i)
        self.stories = list(stories.items())  # ((task, story id), question indices in order)
        self.story_size = {key: self.size[(key[0], qs[-1])] + 100 * len(qs) for key, qs in self.stories}  # characters
        self.task_questions = {task: [q for q in self.questions if q[0] == task] for task in self.samples}
        self.task_stories = {task: [s for s in self.stories if s[0][0] == task] for task in self.samples}
        self.rng = random.Random(f"train:{cfg.seed}" + (f":stage{stage}" if stage else ""))
        self.queues: dict[tuple, list[list]] = {}  # (length, task weights) -> batches to come
        self.token_counts: dict[str, int] = {}  # book sentences are counted once
        self.end = tokenizer(ANSWER_END, add_special_tokens=False)["input_ids"] if cfg.answer_end else []  # [id] or []
        if len(self.end) > 1:
            raise DiffMambaError(f"--answer-end needs {ANSWER_END!r} to be one token; this tokenizer makes {len(self.end)}")

    def length(self, step: int) -> int:
        """The kind of batch at `step`: a BABILong length (0: no filler) or `STORY`."""
        cfg = self.cfg
        if step >= cfg.curriculum * cfg.steps and self.rng.random() < cfg.filler_share:
            return self.rng.choice(cfg.lengths)
        return self.STORY if self.rng.random() < cfg.story_share else 0

    def tokens(self, item, length: int) -> int:
        """A rough token count of a question (story) at `length`, for batching (about 4 characters a token)."""
        if length > 0:  # filler fills up to `length` (a qa3 story longer than that makes a bigger batch)
            return length
        if length == self.STORY:
            return self.story_size[item[0]] // 4
        return self.size[item] // 4 + 30

    def task_weights(self, step: int) -> list[float]:
        """Sampling weights of `cfg.tasks` at `step`: the first task alone during the task curriculum,
        then `first_task_share` for it and equal shares of the rest."""
        cfg, n = self.cfg, len(self.cfg.tasks)
        if step < cfg.task_curriculum * cfg.steps or n == 1:
            return [1.0] + [0.0] * (n - 1)
        return [cfg.first_task_share] + [(1 - cfg.first_task_share) / (n - 1)] * (n - 1)

    def draw(self, length: int, step: int = 0) -> list:
        """The next batch of questions ((task, index)) or stories ((task, story id), indices): a task
        drawn by `task_weights` (not by its number of questions: qa3 has a tenth of qa1's, qa4 a story
        per question), then an item of it. A batch holds at most `batch_size` rows and about
        `batch_tokens` tokens (at least 4 rows)."""
        weights = self.task_weights(step)
        queue = self.queues.setdefault((length, tuple(weights)), [])
        if not queue:
            cfg = self.cfg
            items = self.task_stories if length == self.STORY else self.task_questions
            tasks = list(items)
            drawn = self.rng.choices(tasks, weights=weights, k=self.POOL * cfg.batch_size)
            pool = sorted((self.rng.choice(items[t]) for t in drawn), key=lambda item: self.tokens(item, length))
            batch: list = []
            for item in pool:
                if batch and (len(batch) == cfg.batch_size or
                              (len(batch) >= 4 and (len(batch) + 1) * self.tokens(item, length) > cfg.batch_tokens)):
                    queue.append(batch)
                    batch = []
                batch.append(item)
            queue.append(batch)
            self.rng.shuffle(queue)
        return queue.pop()

    def story_ids(self, task: str, indices: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """One story's token ids and its (position, answer id) pairs (the layout in the class docstring)."""
        from .data import format_prompt

        ids: list[int] = []
        answers: list[tuple[int, int]] = []
        seen = 0
        for i in indices:
            s = self.samples[task][i]
            block = ("\n" if ids else "") + format_prompt(s.facts[seen:], s.question)
            ids += self.tokenizer(block, add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]
            answers.append((len(ids) - 1, answer[0]))
            ids += answer
            ids, answers = self.ended(ids, answers)
            seen = len(s.facts)
        return ids, answers

    def ended(self, ids: list[int], answers: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """ids ending with an answer token -> with the end token after it and scored (`answer_end`), or as they are."""
        if not self.end:
            return ids, answers
        return ids + self.end, answers + [(len(ids) - 1, self.end[0])]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        from .data import babilong

        cfg = self.cfg
        length = self.length(step)
        if length == self.STORY:
            rows = [self.story_ids(task, indices) for (task, _), indices in self.draw(length, step)]
            rows = [r for r in rows if len(r[0]) <= cfg.max_len]
        else:
            by_task: dict[str, list[int]] = {}
            for task, index in self.draw(length, step):
                by_task.setdefault(task, []).append(index)
            seed = cfg.seed * 1_000_003 + self.stage * 100_003 + step  # the filler draw of this batch
            prompts = [p for task, indices in by_task.items()
                       for p in babilong(task, length, split="train", seed=seed, indices=indices, samples=self.samples[task],
                                         tokenizer=self.tokenizer if length else None, token_counts=self.token_counts)]
            rows = [self.ended(p + [a], [(len(p) - 1, a)]) if self.end else (p, [(len(p) - 1, a)]) for p, a in
                    encode_examples(self.tokenizer, [(p.prompt, p.answer) for p in prompts], cfg.max_len)]
        L = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), L), self.tokenizer.pad_token_id, dtype=torch.long)
        targets = torch.full((len(rows), L), -100, dtype=torch.long)
        for r, (row_ids, answers) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            for pos, answer in answers:
                targets[r, pos] = answer
        return ids, targets, max(length, 0) if length != self.STORY else -1


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [batch, pos] (right-padded), last [batch] (index of each last prompt token), answers [batch]."""
    L = max(len(p) for p, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    for row, (p, _) in enumerate(examples):
        ids[row, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p, _ in examples])
    answers = torch.tensor([a for _, a in examples])
    return ids, last, answers


def final_resid(model: HookedMamba, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block, [batch, pos, d_model] (no unembedding)."""
    kept = {}

    def keep(resid, hook):  # [batch, pos, d_model]
        kept["resid"] = resid

    model.run_with_hooks(ids.to(model.device), return_type=None,
                         fwd_hooks=[(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", keep)])
    return kept["resid"]


def answer_logits(model: HookedMamba, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last prompt token: [batch, vocab] (only those rows are unembedded)."""
    resid = final_resid(model, ids)
    return model.unembed(resid[torch.arange(ids.shape[0], device=resid.device), last.to(resid.device)])


def training_loss(model: HookedMamba, cfg: TrainConfig, ids: torch.Tensor, targets: torch.Tensor,
                  pad_id: int) -> torch.Tensor:
    """The loss `cfg.loss` names (module docstring) for one batch: the mean cross-entropy of the
    answers (`targets` != -100: the answer token id at the position before it), plus, for "lm",
    `lm_weight` x the mean next-token cross-entropy over every non-padding token."""
    resid = final_resid(model, ids)
    targets = targets.to(resid.device)
    at = targets != -100
    loss = F.cross_entropy(model.unembed(resid[at]), targets[at])
    if cfg.loss == "lm":
        logits = model.unembed(resid[:, :-1])
        following = ids[:, 1:].to(resid.device)
        following = following.masked_fill(following == pad_id, -100)  # padding is not a target
        loss = loss + cfg.lm_weight * F.cross_entropy(logits.flatten(0, 1), following.flatten(), ignore_index=-100)
    return loss


def train(cfg: TrainConfig, tokenizer, progress: bool = True, eval_n: int | None = None,
          eval_every: int = 0, curve_lengths=(0, LONG_EVAL)) -> tuple[HookedMamba, TrainResult]:
    """Train one model (from scratch, or from `cfg.init`); returns it (eval mode) and the run's numbers.

    With `eval_every` > 0 the learning curve (qa accuracy on 200 test questions per task at 0k, and
    qa1 at 1k) is measured every that many steps and kept in the result."""
    model_cfg = check_options(cfg, tokenizer, eval_n=eval_n)
    torch.manual_seed(cfg.seed)
    model = HookedMamba(model_cfg)
    if cfg.init:
        model.load_state_dict(load_model(cfg.init).state_dict())
    model.tokenizer = tokenizer
    earlier = []
    if cfg.init and (Path(cfg.init) / "training.json").exists():
        before = json.loads((Path(cfg.init) / "training.json").read_text())
        earlier = before.pop("earlier", []) + [before]
    stream = PromptStream(cfg, tokenizer, stage=len(earlier))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    model.train()
    start = time.time()
    ema = None
    curve = []
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.arch}", disable=not progress)
    for step in bar:
        ids, targets, length = stream.batch(step)
        loss = training_loss(model, cfg, ids, targets, tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", length="story" if length < 0 else length)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            acc = evaluate(model, tokenizer, cfg.tasks, n=200, lengths=curve_lengths, progress=False)
            model.train()
            point = {"step": step + 1, "minutes": round((time.time() - start) / 60, 2), "loss": round(ema, 4),
                     **{f"{r.task}@{r.length}": round(r.accuracy, 3) for r in acc.itertuples()}}
            curve.append(point)
            if progress:
                tqdm.write(json.dumps(point))
    wall = time.time() - start
    model.eval()
    acc = evaluate(model, tokenizer, cfg.tasks, n=eval_n, progress=progress, lengths=(0, LONG_EVAL))
    n_params = sum(p.numel() for p in model.parameters())
    return model, TrainResult(cfg, n_params, len(stream.questions), wall, float(ema or float("nan")), acc, earlier, curve)


@torch.no_grad()
def evaluate(model: HookedMamba, tokenizer, tasks=TASKS, split: str = "test", n: int | None = None,
             batch_size: int = 32, progress: bool = True, lengths=(0,)) -> pd.DataFrame:
    """Answer accuracy (argmax at the last prompt token == first answer token) per task at each
    BABILong length (book filler; 0 = none), on the first n test questions of each task (all when
    None). Lengths above 0 read qa1 only (the long-context target). -> task, length, n, accuracy."""
    from .data import babilong

    rows = []
    for length in lengths:
        for task in (tasks if length == 0 else [t for t in tasks if t == "qa1"]):
            prompts = babilong(task, length, split=split, n=n, tokenizer=tokenizer if length else None)
            examples = encode_examples(tokenizer, [(p.prompt, p.answer) for p in prompts], max_len=10**9)
            examples.sort(key=lambda e: len(e[0]))
            correct = 0
            for s in tqdm(range(0, len(examples), batch_size), desc=f"eval {task}@{length}", disable=not progress, leave=False):
                ids, last, answers = collate(examples[s:s + batch_size], tokenizer.pad_token_id)
                correct += int((answer_logits(model, ids, last).argmax(-1).cpu() == answers.cpu()).sum())  # any device
            rows.append({"task": task, "length": length, "n": len(examples), "accuracy": correct / len(examples)})
    return pd.DataFrame(rows)


def _number(value) -> bool:
    """Whether a value read from a stage's training.json is a number (not missing, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _share(value) -> str:
    """A share as a card writes it (40%); '?' where a stage's training.json lacks it."""
    return f"{value:.0%}" if _number(value) else "?"


def _minutes(wall_s) -> str:
    """A wall time in seconds as a card writes it (25.9 min); '? min' where it is missing."""
    return f"{wall_s / 60:.1f} min" if _number(wall_s) else "? min"


def _then(share, before: str, after: str) -> str:
    """"the first 30% of the steps {before}, then {after}", or "from the first step, {after}" for a share of 0."""
    if share == 0:
        return f"from the first step, {after}"
    return f"the first {_share(share)} of the steps {before}, then {after}"


def stage_recipe(stage: dict, explain: bool = True) -> str:
    """One training stage's data recipe in a card's words: the 0k curriculum and the filler, the whole
    stories (what they are, with `explain`), the task curriculum. `stage`: its config as a dict
    (`asdict(TrainConfig)`, or a training.json as in `TrainResult.earlier`); a missing key reads '?'."""
    tasks = stage.get("tasks") or ["?"]
    first = tasks[0]
    lengths = ", ".join(map(str, stage.get("lengths") or ["?"]))
    filler = f"{_share(stage.get('filler_share'))} of the batches with public-domain book filler up to {lengths} tokens"
    stories = f"{_share(stage.get('story_share'))} of the 0k batches are whole stories" + (
        " (each question in its own BABILong block, every answer scored; `train.PromptStream`)" if explain else "")
    rows = (f"{_share(stage.get('first_task_share'))} of the rows are {first} and the other tasks share the rest equally"
            if len(tasks) > 1 else f"every row is {first}")
    end = [f'each answer followed by "{ANSWER_END}", which is scored too (`--answer-end`)'] if stage.get("answer_end") else []
    return "; ".join([_then(stage.get("curriculum"), "at 0k", filler), stories,
                      _then(stage.get("task_curriculum"), f"read {first} only", rows), *end])


def stage_line(k: int, stage: dict) -> str:
    """A card's bullet for training stage k (from 1) of several: steps, lr, the checkpoint it continued
    from, wall time, `stage_recipe` (stories explained in stage 1) and command; a missing key reads '?'."""
    init = f", continuing from {stage['init']}" if stage.get("init") else ""
    return (f"- stage {k}: {stage.get('steps', '?')} steps, lr {stage.get('lr', '?')}{init}, {_minutes(stage.get('wall_s'))}: "
            f"{stage_recipe(stage, explain=k == 1)}; command `{stage.get('command', '?')}`\n")


def model_card(result: TrainResult, command: str) -> str:
    """The model card (README.md) of a run. A run that continued earlier stages (`result.earlier`, each a
    training.json) gives each stage's recipe, command and wall time in order, this run last."""
    cfg = result.config
    table = "\n".join(f"| {r.task} | {'0k' if r.length == 0 else f'{r.length} tokens'} | {r.n} | {r.accuracy:.3f} |"
                      for r in result.accuracy.itertuples())
    stages = [*result.earlier, {**asdict(cfg), "command": command, "wall_s": result.wall_s}]
    threads = torch.get_num_threads()
    on_cpu = f"on CPU ({threads} thread{'s' if threads != 1 else ''})"
    if len(stages) == 1:
        recipe, runs, wall = f": {stage_recipe(stages[0])}", f"- command: `{command}`\n", f"{_minutes(result.wall_s)} {on_cpu}"
        optimizer = (f"steps: {cfg.steps}{f' (continuing from {cfg.init})' if cfg.init else ''}; lr: {cfg.lr} "
                     f"(warm-up {cfg.warmup}, cosine)")
    else:
        walls = [s.get("wall_s") for s in stages]
        total = sum(walls) if all(map(_number, walls)) else None
        recipe = f", in {len(stages)} stages (each one's recipe below)"
        runs = "".join(stage_line(k, s) for k, s in enumerate(stages, 1))
        wall = f"{_minutes(total)} in all: " + ", ".join(f"stage {k} {_minutes(w)}" for k, w in enumerate(walls, 1)) + f" {on_cpu}"
        steps = [st.get("steps") for st in stages]
        optimizer = (f"steps: {sum(steps) if all(map(_number, steps)) else '?'} in all "
                     f"({' + '.join(str(n if _number(n) else '?') for n in steps)}); lr: each stage's above "
                     f"(warm-up {cfg.warmup}, cosine, restarted at each stage)")
    curve = ""
    if result.curve:
        keys = [k for k in result.curve[0] if "@" in k]
        head = "| step | minutes | loss | " + " | ".join(keys) + " |"
        rule = "|" + "---|" * (3 + len(keys))
        lines = [f"| {p['step']} | {p['minutes']} | {p['loss']} | " + " | ".join(f"{p[k]:.3f}" for k in keys) + " |"
                 for p in result.curve]
        curve = ("\nLearning curve (accuracy on the first 200 test questions per task; `qa1@1024`: qa1 with "
                 "1k-token book filler):\n\n" + "\n".join([head, rule, *lines]) + "\n")
    return f"""# {cfg.arch}-babi (seed {cfg.seed})

A small {cfg.arch} language model trained by `diffmamba-interp train` on the bAbI tasks
{", ".join(cfg.tasks)} in BABILong form{recipe};{" qa1 also asks, at each of its questions, where every person moved so far is (`data/every_person.py`: the last-mentioned place stops paying);" if cfg.every_person else ""} shipped with diffmamba-interp so every command has a real default. Loss: {cfg.loss}{f" (answer + {cfg.lm_weight} x next-token)" if cfg.loss == "lm" else " (answer token only)"}{f'; with `--answer-end` also the "{ANSWER_END}" after each answer' if any(st.get("answer_end") for st in stages) else ""}.
Byte-level BPE tokenizer of {cfg.vocab_size} entries trained on bAbI and the books (`data/subword.py`).
bAbI data: CC BY 3.0 (Facebook AI Research; see `diffmamba_interp/data/babi/LICENSE.txt`); books:
Project Gutenberg, public domain in the USA (`diffmamba_interp/data/filler/`).

{runs}- seed: {cfg.seed}; {optimizer}; batch size: {cfg.batch_size}; AdamW (0.9, 0.95), weight decay {cfg.weight_decay}, clipping 1.0
- training questions: {result.n_examples} (bAbI en-10k train where shipped, en for qa3)
- parameters: {result.n_params:,}; d_model {cfg.d_model}, {cfg.n_layers} layers, d_state {cfg.d_state}, head_dim {cfg.head_dim}, d_conv {cfg.d_conv}{", differential layers: " + cfg.diff_layers if cfg.arch.startswith("diff") else ""}
- wall time: {wall}
- final training loss (EMA): {result.final_loss:.3f}

Answer accuracy on the bAbI test split (argmax at the last prompt token; filler: the shipped books):

| task | length | n | accuracy |
|---|---|---|---|
{table}

Chance is about 1/6 for qa1–qa3 (locations), lower for qa4/qa5.
{targets_line(result.accuracy)}{curve}"""


TARGETS = {"qa1": 0.95, "mean": 0.80, "qa1 @ 1k": 0.80}  # the shipped models' targets (README, Shipped models)


def target_values(accuracy: pd.DataFrame) -> dict[str, float] | None:
    """A run's value of each of `TARGETS`: qa1 and the mean of qa1–qa5 at 0k, qa1 with `LONG_EVAL` tokens
    of filler (from its accuracy table: task, length, accuracy). None when it did not measure all of them."""
    acc = {(r.task, r.length): r.accuracy for r in accuracy.itertuples()}
    if not all((t, 0) in acc for t in TASKS) or ("qa1", LONG_EVAL) not in acc:
        return None
    return {"qa1": acc[("qa1", 0)], "mean": sum(acc[(t, 0)] for t in TASKS) / len(TASKS), "qa1 @ 1k": acc[("qa1", LONG_EVAL)]}


def targets_line(accuracy: pd.DataFrame) -> str:
    """A card line with each target of the shipped models and whether this run reached it
    (`target_values`). Empty when the run did not measure all of them."""
    got = target_values(accuracy)
    if got is None:
        return ""
    parts = ", ".join(f"{k} {got[k]:.3f} (target {v:.2f}: {'reached' if got[k] >= v else 'not reached'})"
                      for k, v in TARGETS.items())
    return (f"\nTargets of the shipped models: {parts}. What this recipe took and what would reach them: the "
            "README's *Shipped models* section.\n")


def save_run(model: HookedMamba, result: TrainResult, out: str | Path, command: str) -> Path:
    """Write the model (save_pretrained), its card (README.md) and training.json into `out`."""
    out = Path(out)
    model.save_pretrained(out)
    write_atomic(out / "README.md", model_card(result, command))
    summary = {**asdict(result.config), "command": command, "earlier": result.earlier, "n_params": result.n_params, "n_examples": result.n_examples,
               "wall_s": round(result.wall_s, 1), "final_loss": result.final_loss,
               "accuracy": result.accuracy.to_dict(orient="records"), "curve": result.curve}
    write_atomic(out / "training.json", json.dumps(summary, indent=2) + "\n")
    return out


# what belongs to a model in a checkpoint directory: removed before another model is written there
MODEL_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "pytorch_model-*.bin", "README.md", "training.json", "tuned_lens.safetensors",
    "tuned_lens.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja",
)


def model_files(directory: Path) -> list[Path]:
    """The files of `directory` that belong to a saved model (`MODEL_FILES`)."""
    return sorted({p for pattern in MODEL_FILES for p in directory.glob(pattern) if os.path.lexists(p)})


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """Refuse (one-line DiffMambaError) an output directory that is a file, cannot be written, or is
    not empty when force is False: a model is never overwritten without asking."""
    out = Path(out).expanduser()
    if os.path.lexists(out):
        problem = path_problem(out, "dir")
        if problem:
            raise DiffMambaError(f"--out {out}: {problem}")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not force:
            shown = ", ".join(entries[:4]) + (f", … ({len(entries)} entries)" if len(entries) > 4 else "")
            raise DiffMambaError(f"--out {out}: the directory is not empty ({shown}); pass --force to replace the "
                                 "model in it (its weights, config, card, training.json, tuned lens and tokenizer "
                                 "files are removed first)")
    check_writable(out / "config.json" if os.path.lexists(out) else out, "--out")
    return out


def write_run(model: HookedMamba, result: TrainResult, out: str | Path, command: str, lens_steps: int = 0,
              seed: int = 0, progress: bool = True) -> Path:
    """Save the run (model, card, training.json and, with lens_steps > 0, a trained tuned lens) into a
    staging directory beside `out`, then replace the model in `out` with it: the files of an earlier
    model there (`MODEL_FILES`: weights, card, training.json, tuned_lens.*, tokenizer) are removed
    first, so no stale tuned lens is left next to new weights; other files are kept. A failure before
    the swap leaves `out` untouched."""
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as e:
        raise DiffMambaError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    try:
        save_run(model, result, staging, command)
        if lens_steps:
            train_tuned_lens(model, staging, steps=lens_steps, seed=seed, progress=progress)
        out.mkdir(exist_ok=True)
        for old in model_files(out):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        for new in sorted(staging.iterdir()):
            os.replace(new, out / new.name)
    except OSError as e:
        raise DiffMambaError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def train_tuned_lens(model: HookedMamba, out: str | Path, steps: int = 250, seed: int = 0, progress: bool = True):
    """Fit the tuned lens as `lens-train` does (Belrose et al.'s recipe on the shipped public-domain
    books), save it next to the checkpoint (tuned_lens.safetensors / tuned_lens.json) and append its
    held-out KL against the logit lens (all positions of held-out book text; answer positions of 100
    bAbI qa1 test prompts) to the model card."""
    from .analysis.lens_training import fit_lens
    from .data import babilong

    lens = fit_lens(model, steps=steps, seed=seed, eval_prompts=babilong("qa1", 0, n=100), progress=progress)
    lens.save(out)
    card = Path(out) / "README.md"
    if card.exists():
        rows = "\n".join(f"| {r['layer']} | {r['paper_layer'] if r['paper_layer'] is not None else '—'} | "
                         f"{r['kl_logit_all']:.3f} | {r['kl_tuned_all']:.3f} | {r['kl_logit_answer']:.3f} | "
                         f"{r['kl_tuned_answer']:.3f} |" for r in lens.evaluation)
        write_atomic(card, card.read_text() + f"""
## Tuned lens

`tuned_lens.safetensors`: {steps} steps of Belrose et al.'s recipe (SGD Nesterov, weight decay 1e-3,
linear decay, clipping 1.0) on the shipped public-domain books (general text), seed {seed}; the same
as `diffmamba-interp lens-train --ckpt DIR --steps {steps}`. Mean KL(final ‖ lens) in nats per layer
(layer 0 = embeddings; paper layer = the paper's Figure 6 index): on held-out book text at every
position, and at the answer position of 100 bAbI qa1 test prompts:

| layer | paper layer | logit lens, text | tuned lens, text | logit lens, answer | tuned lens, answer |
|---|---|---|---|---|---|
{rows}
""")
    return lens
