"""The small trainer behind the shipped models: Mamba-2 vs Diff-Mamba-2 on bAbI qa1–qa5, on CPU.

Each training example is one BABILong-0k prompt (`data.training_stream`), and the loss is the
cross-entropy of the answer token at the last prompt position (answer-only loss: the quantity the
SNR analysis reads, and the fastest signal for a small model). Prompts are right-padded into
length-bucketed batches; a causal model never sees the padding to the right of its last token.
"""

from __future__ import annotations

import json
import math
import random
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
from .model import HookedMamba, load_model


@dataclass
class TrainConfig:
    """Everything that determines a training run (written into the model card)."""

    arch: str = "mamba2"
    d_model: int = 64
    n_layers: int = 4
    d_state: int = 16
    head_dim: int = 16
    chunk_size: int = 32  # SSD chunk: 32 is fastest for these sizes on CPU (results do not depend on it)
    diff_layers: str = "alternate"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    max_len: int = 256  # prompts longer than this (some qa3 stories) are skipped
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    init: str | None = None  # continue from this checkpoint's weights (a new schedule of `steps`)

    def model_config(self, vocab_size: int) -> MambaConfig:
        arch_spec(self.arch)  # a one-line error for an unknown arch
        return MambaConfig(
            arch=self.arch, d_model=self.d_model, n_layers=self.n_layers, vocab_size=vocab_size,
            d_state=self.d_state, head_dim=self.head_dim, chunk_size=self.chunk_size, diff_layers=self.diff_layers,
        )


@dataclass
class TrainResult:
    config: TrainConfig
    n_params: int
    n_examples: int
    wall_s: float
    final_loss: float
    accuracy: pd.DataFrame = field(repr=False)  # task, n, accuracy
    earlier: list = field(default_factory=list)  # training.json of the stages this run continued


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


def batches(examples, batch_size: int, rng: random.Random, pad_id: int):
    """Endless length-bucketed batches: shuffle, sort within pools of 50 batches, shuffle batches."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        pool = 50 * batch_size
        chunks = []
        for s in range(0, len(order), pool):
            part = sorted(order[s:s + pool], key=lambda i: len(examples[i][0]))
            chunks += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        rng.shuffle(chunks)
        for idx in chunks:
            yield collate([examples[i] for i in idx], pad_id)


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [batch, pos] (right-padded), last [batch] (index of each last prompt token), answers [batch]."""
    L = max(len(p) for p, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    for row, (p, _) in enumerate(examples):
        ids[row, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p, _ in examples])
    answers = torch.tensor([a for _, a in examples])
    return ids, last, answers


def answer_logits(model: HookedMamba, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last prompt token: [batch, vocab]."""
    logits = model(ids)
    return logits[torch.arange(ids.shape[0]), last]


def train(cfg: TrainConfig, tokenizer, progress: bool = True, eval_n: int | None = None) -> tuple[HookedMamba, TrainResult]:
    """Train one model from scratch; returns it (eval mode) and the run's numbers."""
    from .data import training_stream

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = HookedMamba(cfg.model_config(len(tokenizer)))
    if cfg.init:
        start_from = load_model(cfg.init)
        if replace(start_from.cfg, extra={}) != replace(model.cfg, extra={}):
            raise DiffMambaError(f"--init {cfg.init}: its config differs from the requested model ({start_from.cfg.arch}, d_model {start_from.cfg.d_model})")
        model.load_state_dict(start_from.state_dict())
    model.tokenizer = tokenizer
    pairs = [pair for task in cfg.tasks for pair in training_stream(tasks=(task,))]
    examples = encode_examples(tokenizer, pairs, cfg.max_len)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    stream = batches(examples, cfg.batch_size, rng, tokenizer.pad_token_id)
    model.train()
    start = time.time()
    ema = None
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.arch}", disable=not progress)
    for _ in bar:
        ids, last, answers = next(stream)
        loss = F.cross_entropy(answer_logits(model, ids, last), answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    wall = time.time() - start
    model.eval()
    acc = evaluate(model, tokenizer, cfg.tasks, n=eval_n, progress=progress)
    n_params = sum(p.numel() for p in model.parameters())
    earlier = []
    if cfg.init and (Path(cfg.init) / "training.json").exists():
        before = json.loads((Path(cfg.init) / "training.json").read_text())
        earlier = before.pop("earlier", []) + [before]
    return model, TrainResult(cfg, n_params, len(examples), wall, float(ema or float("nan")), acc, earlier)


@torch.no_grad()
def evaluate(model: HookedMamba, tokenizer, tasks=TASKS, split: str = "test", n: int | None = None,
             batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """Answer accuracy (argmax at the last prompt token == first answer token) per task, on the
    first n test questions of each task (all when n is None)."""
    from .data import babilong

    rows = []
    for task in tasks:
        prompts = babilong(task, "0k", split=split, n=n)
        examples = encode_examples(tokenizer, [(p.prompt, p.answer) for p in prompts], max_len=10**9)
        examples.sort(key=lambda e: len(e[0]))
        correct = 0
        for s in tqdm(range(0, len(examples), batch_size), desc=f"eval {task}", disable=not progress, leave=False):
            ids, last, answers = collate(examples[s:s + batch_size], tokenizer.pad_token_id)
            correct += int((answer_logits(model, ids, last).argmax(-1) == answers).sum())
        rows.append({"task": task, "n": len(examples), "accuracy": correct / len(examples)})
    return pd.DataFrame(rows)


def model_card(result: TrainResult, command: str) -> str:
    cfg = result.config
    table = "\n".join(f"| {r.task} | {r.n} | {r.accuracy:.3f} |" for r in result.accuracy.itertuples())
    stages = "".join(
        f"- earlier stage {k + 1}: `{e.get('command', '?')}` — {e['steps']} steps, lr {e['lr']}, {e['wall_s'] / 60:.1f} min, "
        f"qa1 accuracy then {next((a['accuracy'] for a in e['accuracy'] if a['task'] == 'qa1'), float('nan')):.3f}\n"
        for k, e in enumerate(result.earlier)
    )
    return f"""# {cfg.arch}-babi

A small {cfg.arch} language model trained by `diffmamba-interp train` on the bAbI tasks
{", ".join(cfg.tasks)} (BABILong 0k prompts, answer-only loss), shipped with diffmamba-interp so every
command has a real default. Word-level tokenizer over the bAbI vocabulary. bAbI data: CC BY 3.0
(Facebook AI Research; see `diffmamba_interp/data/babi/LICENSE.txt`).

{stages}- command: `{command}`
- seed: {cfg.seed}; steps: {cfg.steps}{f" (continuing from {cfg.init})" if cfg.init else ""}; batch size: {cfg.batch_size}; lr: {cfg.lr} (warm-up {cfg.warmup}, cosine)
- training examples: {result.n_examples} (prompts up to {cfg.max_len} tokens)
- parameters: {result.n_params:,}; d_model {cfg.d_model}, {cfg.n_layers} layers, d_state {cfg.d_state}, head_dim {cfg.head_dim}{", differential layers: " + cfg.diff_layers if cfg.arch.startswith("diff") else ""}
- wall time: {result.wall_s / 60:.1f} min on CPU ({torch.get_num_threads()} threads)
- final training loss (EMA): {result.final_loss:.3f}

Answer accuracy on the bAbI test split (argmax at the last prompt token):

| task | n | accuracy |
|---|---|---|
{table}

Chance is about 1/6 for qa1–qa3 (locations), lower for qa4/qa5.
"""


def save_run(model: HookedMamba, result: TrainResult, out: str | Path, command: str) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    (out / "README.md").write_text(model_card(result, command))
    summary = {**asdict(result.config), "command": command, "earlier": result.earlier, "n_params": result.n_params, "n_examples": result.n_examples,
               "wall_s": round(result.wall_s, 1), "final_loss": result.final_loss,
               "accuracy": result.accuracy.to_dict(orient="records")}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def train_tuned_lens(model: HookedMamba, out: str | Path, steps: int = 300, seed: int = 0, progress: bool = True):
    """Train the tuned lens on bAbI training stories (prompt + answer texts) and save it next to the
    checkpoint (tuned_lens.safetensors / tuned_lens.json); appends its held-out KL to the model card."""
    from .analysis.lens import LogitLens
    from .analysis.lens_training import train_tuned_lens
    from .data import training_stream

    texts = [f"{p} {a}" for p, a in training_stream(shuffle=True, seed=seed)]
    held_out, train_texts = texts[:64], texts[64:]
    lens = train_tuned_lens(model, train_texts, steps=steps, seed=seed, optimizer="adam", progress=progress,
                            tokenizer=model.tokenizer)
    lens.save(out)
    ids = [model.to_tokens(t) for t in held_out]
    kl = lambda ln: torch.stack([ln.kl_to_final(model, i) for i in ids]).mean(0)  # noqa: E731
    tuned, logit = kl(lens), kl(LogitLens(model))
    card = Path(out) / "README.md"
    if card.exists():
        rows = "\n".join(f"| {k} | {a:.3f} | {b:.3f} |" for k, (a, b) in enumerate(zip(logit.tolist(), tuned.tolist())))
        card.write_text(card.read_text() + f"""
Tuned lens (`tuned_lens.safetensors`): {steps} steps on bAbI training stories, seed {seed}. Mean
KL(final ‖ lens) per layer on 64 held-out stories (layer 0 = embeddings):

| layer | logit lens | tuned lens |
|---|---|---|
{rows}
""")
    return lens
