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
import torch.nn.functional as F

from hcomposer.architecture import Architecture
from hcomposer.evaluation.proxy_train import _param_groups, autocast, lr_at

__all__ = ["evaluate_text"]


def evaluate_text(arch: Architecture, proxy: str, *, data, config, progress: bool):
    """Run the text proxy; see the module docstring. Returns a ``ProxyResult``."""
    from hcomposer.data import get_tokenizer, prepare_dataset
    from hcomposer.evaluation.proxy import ProxyResult, _params_total, _progress
    from hcomposer.model import build_model

    t0 = time.perf_counter()
    tokenizer = get_tokenizer(config.tokenizer)
    source = None if data is None else str(Path(data))
    dataset = prepare_dataset(source, tokenizer, seed=config.seed)
    T, B = config.text_seq_len, config.text_batch_size
    steps = max(1, config.text_tokens // (T * B))
    shape = arch.shape.replace(vocab_size=tokenizer.vocab_size, max_seq_len=T)
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch.with_shape(shape), seed=config.seed * 1000)
    opt = torch.optim.AdamW(
        _param_groups([model], 0.1), lr=config.text_lr, betas=(0.9, 0.95), eps=1e-8
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    warmup = min(config.warmup_steps, steps // 4)
    failure = None
    tokens = 0
    batches = dataset.batches("train", B, T, seed=config.seed)
    with _progress(progress) as p:
        handle = p.add_task("text", total=steps, rate="") if p is not None else None
        for step in range(steps):
            x, y = next(batches)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, config.text_lr, warmup)
            with autocast(config.dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            if not torch.isfinite(loss):
                failure = f"text: non-finite training loss at step {step}"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            tokens += x.numel()
            if p is not None:
                rate = tokens / max(1e-9, time.perf_counter() - t0)
                p.update(handle, advance=1, rate=f"{rate:,.0f} tok/s")
    val_loss, val_acc = math.nan, 0.0
    if failure is None:
        val_loss, val_acc = _val_metrics(model, dataset, config)
        if not math.isfinite(val_loss):
            failure = "text: non-finite validation loss"
    # A failed model scores as an untrained one would: uniform over the vocabulary.
    chance = math.log(tokenizer.vocab_size)
    score = -val_loss if failure is None else -chance
    wall = time.perf_counter() - t0
    task = {
        "accuracy": 0.0 if failure else val_acc,
        "loss": val_loss,
        "lr": config.text_lr,
        "weight_decay": 0.1,
        "params": int(sum(p.numel() for p in params)),
        "steps": steps,
        "tokenizer": tokenizer.name,
        "corpus": dataset.manifest.get("source", source or "embedded"),
    }
    return ProxyResult(
        proxy=proxy,
        pattern=arch.pattern,
        score=score,
        tasks={"text": task},
        params_total=_params_total(arch),
        wall_seconds=wall,
        tokens_per_second=tokens / max(wall, 1e-9),
        tokens=tokens,
        seed=config.seed,
        config=config,
        failures=[failure] if failure else [],
    )


@torch.no_grad()
def _val_metrics(model, dataset, config) -> tuple[float, float]:
    """Mean next-token loss and accuracy over the fixed validation windows."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for x, y in dataset.eval_batches(
        config.text_batch_size, config.text_seq_len, config.text_eval_tokens
    ):
        with autocast(config.dtype):
            logits = model(x)
        logits = logits.float().reshape(-1, logits.shape[-1])
        loss_sum += float(F.cross_entropy(logits, y.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == y.reshape(-1)).sum())
        total += y.numel()
    model.train()
    return loss_sum / max(total, 1), correct / max(total, 1)
