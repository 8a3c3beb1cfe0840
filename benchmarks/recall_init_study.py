"""Why attention did not learn MAD recall at the proxy shape: initial scale, width, learning rate.

Trains one model on MAD in-context recall (the default difficulty: vocabulary 16, sequences of
32) with AdamW at a constant learning rate, batch 32, and prints the validation accuracy every
50 steps (stopping once it passes 0.97) and the process CPU seconds (one torch thread).

``--model ours`` builds ``PATTERN`` at ``--shape`` with ``init_std`` and other shape fields
set from the command line; ``--model plain`` is a reference written directly in PyTorch: a
pre-LayerNorm transformer with learned absolute positions, ``nn.MultiheadAttention``, a GELU
MLP and PyTorch's default initialisation (width 64, 4 heads, 3 blocks), which is what a
researcher would first try. On 2026-12-01 the reference solved the task in 300-400 steps while
our ``AFAFAF`` at ``init_std`` 0.02 stayed on the 0.21 plateau for 1,500; with ``init_std``
0.1-0.15 ours solved it in 150-300 (``docs/proxies.md``).

    python benchmarks/recall_init_study.py --model plain --steps 800
    python benchmarks/recall_init_study.py --pattern AFAFAF --shape tiny --init-std 0.02
    python benchmarks/recall_init_study.py --pattern AFAFAF --shape proxy --init-std 0.15 \\
        --set d_model=64 --task noisy_in_context_recall
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.data.mad import IGNORE, default_task_config, generate_task
from hcomposer.model import build_model


class _PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, seq_len: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.register_buffer("mask", torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.att(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class PlainTransformer(nn.Module):
    """The reference: learned positions, LayerNorm, PyTorch's default init, untied head."""

    def __init__(self, vocab: int, seq_len: int, d: int = 64, heads: int = 4, blocks: int = 3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(_PlainBlock(d, heads, seq_len) for _ in range(blocks))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for b in self.blocks:
            h = b(h)
        return self.out(self.norm(h))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["ours", "plain"], default="ours")
    p.add_argument("--pattern", default="AFAFAF")
    p.add_argument("--shape", default="proxy")
    p.add_argument("--init-std", type=float, default=None, help="default: the shape's")
    p.add_argument("--set", action="append", default=[], help="shape field=value (repeatable)")
    p.add_argument("--task", default="in_context_recall")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = generate_task(default_task_config(args.task), args.seed)
    x, y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_targets)
    xv, yv = (torch.from_numpy(a) for a in data.val_split())
    seq_len, vocab = x.shape[1], data.config.vocab_size
    changes = dict(item.split("=", 1) for item in args.set)
    changes = {k: _value(v) for k, v in changes.items()}
    if args.init_std is not None:
        changes["init_std"] = args.init_std
    if args.model == "plain":
        torch.manual_seed(args.seed)
        model: nn.Module = PlainTransformer(vocab, seq_len)
    else:
        arch = Architecture.parse(args.pattern, args.shape)
        shape = arch.shape.replace(vocab_size=vocab, max_seq_len=seq_len, **changes)
        model = build_model(arch.with_shape(shape), seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0)
    gen = torch.Generator().manual_seed(args.seed)
    cpu0, curve = time.process_time(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        logits = model(x[idx])
        loss = F.cross_entropy(logits.reshape(-1, vocab), y[idx].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                pred = model(xv).argmax(-1)
            mask = yv != IGNORE
            acc = (pred[mask] == yv[mask]).float().mean().item()
            curve.append((step + 1, round(acc, 3)))
            if acc > 0.97:
                break
    label = "plain" if args.model == "plain" else f"{args.pattern}@{args.shape} {changes}"
    print(
        json.dumps(
            {
                "model": label,
                "task": args.task,
                "lr": args.lr,
                "seed": args.seed,
                "cpu_s": round(time.process_time() - cpu0, 1),
                "curve": curve,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
