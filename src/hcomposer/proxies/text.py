"""The text proxy: validation loss after a fixed token budget on a small corpus.

Trains a fresh model on ``config.text_tokens`` tokens of the corpus (the embedded
one by default, tokenised with ``config.tokenizer``) at one learning rate with the
warmup-cosine schedule, then measures the mean next-token loss on the first
``config.text_eval_tokens`` tokens of the validation split. Score: minus that loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from hcomposer.architecture import Architecture
from hcomposer.data import get_tokenizer, prepare_dataset
from hcomposer.format import progress_bar
from hcomposer.model import build_model
from hcomposer.proxies.task import proxy_lr
from hcomposer.training.step import evaluate, make_optimizer, set_lr, train_step

__all__ = ["evaluate_text"]


def _train(model, opt, dataset, config, steps: int, device, progress: bool):
    """``steps`` steps on the training split: ``(tokens, failure or None)``."""
    t0 = time.perf_counter()
    T, B = config.text_seq_len, config.text_batch_size
    warmup = min(config.warmup_steps, steps // 4)
    tokens = 0
    batches = dataset.batches("train", B, T, seed=config.seed)
    with progress_bar(progress, field="rate") as p:
        handle = p.add_task("text", total=steps, rate="")
        for step in range(steps):
            x, y = next(batches)
            set_lr(opt, proxy_lr(step, steps, config.text_lr, warmup))
            loss, _ = train_step(
                model.loss, [(x.to(device), y.to(device))], opt, device=device,
                dtype=config.dtype, grad_clip=config.grad_clip,
            )  # fmt: skip
            if not math.isfinite(loss):
                return tokens, f"text: non-finite training loss at step {step}"
            tokens += x.numel()
            rate = tokens / max(1e-9, time.perf_counter() - t0)
            p.update(handle, advance=1, rate=f"{rate:,.0f} tok/s")
    return tokens, None


def evaluate_text(
    arch: Architecture, *, data, config, progress: bool, device: torch.device
) -> tuple[float, dict, int, list[str]]:
    """Run the text proxy (see the module docstring): ``(score, task record, tokens, failures)``."""
    tokenizer = get_tokenizer(config.tokenizer)
    source = None if data is None else str(Path(data))
    dataset = prepare_dataset(source, tokenizer, seed=config.seed)
    T, B = config.text_seq_len, config.text_batch_size
    steps = max(1, config.text_tokens // (T * B))
    shape = arch.shape.replace(vocab_size=tokenizer.vocab_size, max_seq_len=T)
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch.with_shape(shape), seed=config.seed * 1000).to(device)
    opt = make_optimizer(model, lr=config.text_lr, weight_decay=0.1, device=device)
    tokens, failure = _train(model, opt, dataset, config, steps, device, progress)
    val_loss, val_acc = math.nan, 0.0
    if failure is None:
        val = evaluate(
            lambda x, y: (model(x), y),
            dataset.eval_batches(B, T, config.text_eval_tokens),
            device=device,
            dtype=config.dtype,
            modules=[model],
        )
        val_loss, val_acc = (val.loss, val.accuracy) if val.count else (0.0, 0.0)
        if not math.isfinite(val_loss):
            failure = "text: non-finite validation loss"
    # A failed model scores as an untrained one would: uniform over the vocabulary.
    chance = math.log(tokenizer.vocab_size)
    score = -val_loss if failure is None else -chance
    task = {
        "accuracy": 0.0 if failure else val_acc,
        "loss": val_loss,
        "lr": config.text_lr,
        "weight_decay": 0.1,
        "params": int(sum(p.numel() for p in model.parameters())),
        "steps": steps,
        "tokenizer": tokenizer.name,
        "corpus": dataset.manifest.get("source", source or "embedded"),
    }
    return score, task, tokens, [failure] if failure else []
