"""Training step of a plain transformer pattern against transformers' LlamaForCausalLM, and
against the bound of its own matmuls timed alone.

Both models get the same configuration and the same weights; one step is forward (under bf16
autocast or in fp32), the mean cross-entropy in fp32 as each library trains with it (ours:
``hcomposer.model.lm_loss``, the trainer's; transformers: ``F.cross_entropy`` on an fp32 copy
of the logits, as its causal-LM loss does), backward, and a step of the fused AdamW
(``transformers``' Trainer default, ``adamw_torch_fused``, and hcomposer's on CPU). Every
repetition times, one after another in one process and in an order that alternates:

- ``ours``: a step of ``(AF)*n`` built by hcomposer (eager);
- ``transformers``: a step of ``LlamaForCausalLM`` loaded with the same weights (eager);
- ``ours-compiled`` (with ``--compile``): ours under ``torch.compile``; its compile time is the
  first step's wall time minus an eager step's, recorded once;
- ``matmul``: every matrix product the step's linear layers do, timed alone: for each
  ``nn.Linear`` call of one forward (the output head included), at its rows x in -> out and in
  the compute dtype, the forward product and the two backward ones (input and weight
  gradients), on tensors made beforehand;
- ``attention``: each attention layer's fused kernel alone (causal SDPA, forward and backward,
  the layer's q/k/v shapes and dtype).

Measures, per repetition (``seconds``: CPU time of this process per step, ``time.process_time``,
which a machine busy with other work inflates far less than wall time when torch runs one
thread; ``wall``: wall time per step, kept beside it):

- speed ratio = transformers' time / ours (above 1: ours is faster);
- bound fraction = (matmul + attention) / ours: the share of our step spent in the matmuls and
  attention kernels it cannot do without; 1 would be a step with no other cost;
- matmul fraction = matmul / ours (the linear layers' products alone).

The figures are the median over repetitions with the lowest and highest. ``--json`` writes the
raw per-repetition times.

    python benchmarks/bench_llama.py --pairs 4 --batch 1 --threads 1 --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer import build_model
from hcomposer.export import llama_config_kwargs, to_llama_state_dict
from hcomposer.io import atomic_write_text
from hcomposer.model import lm_loss
from hcomposer.primitives.attention import Attention
from hcomposer.shapes import resolve_shape

__all__ = ["main", "bench"]


def hf_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss on already shifted targets: an fp32 copy, then CE."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _step_fn(model, logits_of, tokens, targets, autocast, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step():
        with autocast():
            logits = logits_of(model, tokens)
        loss = loss_fn(logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _models(shape, n_pairs: int, seed: int):
    import transformers

    ours = build_model(f"(AF)*{n_pairs}", shape=shape, seed=seed)
    # The export's own mapping: the benchmark also exercises what `hcomposer export` writes.
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(ours.arch)))
    sd = {k: v.detach().clone() for k, v in to_llama_state_dict(ours).items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    if unexpected or (set(missing) - {"lm_head.weight"}):
        raise RuntimeError(f"weight mapping failed: {missing} {unexpected}")
    if shape.tie_embeddings:
        ref.tie_weights()
    return ours, ref


def _linear_calls(model: nn.Module, tokens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every nn.Linear call in one forward of ``model``."""
    calls = []

    def hook(mod, args, out):
        calls.append((args[0].numel() // args[0].shape[-1], mod.in_features, mod.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return calls


def _bound_fns(model, tokens: torch.Tensor, dtype: torch.dtype):
    """Two callables: the step's linear-layer matmuls alone, and its attention kernels alone."""
    g = torch.Generator().manual_seed(0)

    def rnd(*size, grad=False):
        return torch.randn(*size, generator=g).to(dtype).requires_grad_(grad)

    mats = [(rnd(r, i), rnd(o, i), rnd(r, o)) for r, i, o in _linear_calls(model, tokens)]
    B, T = tokens.shape
    attn = []
    for m in model.modules():
        if isinstance(m, Attention):
            hd = m.head_dim
            qkv = (rnd(B, m.n_heads, T, hd, grad=True), rnd(B, m.n_kv_heads, T, hd, grad=True))
            attn.append((qkv[0], qkv[1], rnd(B, m.n_kv_heads, T, hd, grad=True)))
    gy = rnd(B, attn[0][0].shape[1], T, attn[0][0].shape[-1]) if attn else None

    def matmuls():
        for x, w, dy in mats:
            torch.mm(x, w.t())  # forward
            torch.mm(dy, w)  # input gradient
            torch.mm(dy.t(), x)  # weight gradient

    def attention():
        for q, k, v in attn:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
            )
            torch.autograd.grad(y, (q, k, v), gy)

    return matmuls, attention


def _timed(fn) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def bench(shape, n_pairs, seq_len, batch, dtype, reps, *, compile_=False, seed=0) -> dict:
    """Per-repetition CPU and wall seconds of each measure for one configuration."""
    ours, ref = _models(shape, n_pairs, seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    )
    runs = {
        "ours": _step_fn(ours, lambda m, t: m(t), x, y, autocast, lm_loss),
        "transformers": _step_fn(ref, lambda m, t: m(input_ids=t).logits, x, y, autocast, hf_loss),
    }
    matmuls, attention = _bound_fns(ours, x, torch.bfloat16 if dtype == "bf16" else torch.float32)
    # Same weights, same data: the first losses agree (a check that we time the same model).
    losses = {name: step() for name, step in runs.items()}
    if abs(losses["ours"] - losses["transformers"]) > 2e-2:
        raise RuntimeError(f"models disagree before timing: {losses}")
    out: dict = {"dtype": dtype, "seq_len": seq_len, "losses": losses}
    if compile_:
        twin = build_model(f"(AF)*{n_pairs}", shape=shape, seed=seed)
        net = torch.compile(twin)
        runs["ours-compiled"] = _step_fn(twin, lambda m, t: net(t), x, y, autocast, lm_loss)
        first = _timed(runs["ours-compiled"])[1]
        out["compile_wall_s"] = first - _timed(runs["ours"])[1]
    runs |= {"matmul": matmuls, "attention": attention}
    for step in runs.values():  # warm every path once more
        step()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(reps):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            c, w = _timed(runs[name])
            seconds[name].append(c)
            wall[name].append(w)
    return out | {"seconds": seconds, "wall": wall}


def figures(row: dict, key: str = "seconds") -> dict[str, tuple[float, float, float]]:
    """(median, lowest, highest) over repetitions of each ratio the docstring defines."""
    t = row[key]

    def per_rep(values):
        return (statistics.median(values), min(values), max(values))

    ours = t["ours"]
    out = {
        "speed": per_rep([b / a for a, b in zip(ours, t["transformers"], strict=True)]),
        "bound": per_rep(
            [(m + a) / s for s, m, a in zip(ours, t["matmul"], t["attention"], strict=True)]
        ),
        "matmul": per_rep([m / s for s, m in zip(ours, t["matmul"], strict=True)]),
    }
    if "ours-compiled" in t:
        tc = t["ours-compiled"]
        out["compiled_speed"] = per_rep([b / a for a, b in zip(tc, t["transformers"], strict=True)])
        out["compiled_bound"] = per_rep(
            [(m + a) / s for s, m, a in zip(tc, t["matmul"], t["attention"], strict=True)]
        )
    return out


def _fmt(f: tuple[float, float, float]) -> str:
    return f"{f[0]:.2f} [{f[1]:.2f}-{f[2]:.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="10m")
    p.add_argument("--vocab", type=int, default=8192, help="override the shape's vocab (0: keep)")
    p.add_argument("--pairs", type=int, default=None, help="(AF)*pairs; default n_layers/2")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the raw times here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = resolve_shape(args.shape)
    if args.vocab:
        shape = shape.replace(vocab_size=args.vocab)
    pairs = args.pairs or max(1, shape.n_layers // 2)
    rows = []
    for dtype in args.dtype:
        for T in args.seq_len:
            r = bench(shape, pairs, T, args.batch, dtype, args.reps, compile_=args.compile)
            rows.append(r)
            f = figures(r)
            extra = ""
            if "compiled_speed" in f:
                extra = (
                    f"  compiled: speed {_fmt(f['compiled_speed'])}, bound "
                    f"{_fmt(f['compiled_bound'])}, compile {r['compile_wall_s']:.0f} s"
                )
            print(
                f"{dtype:5s} T={T:5d}  ours {statistics.median(r['seconds']['ours']):.4f} "
                f"CPU-s  speed {_fmt(f['speed'])}  bound {_fmt(f['bound'])}  matmul "
                f"{_fmt(f['matmul'])}{extra}",
                flush=True,
            )
    if args.json:
        doc = {
            "what": f"(AF)*{pairs} training step against LlamaForCausalLM and its matmul bound",
            "shape": shape.name,
            "d_model": shape.d_model,
            "vocab": shape.vocab_size,
            "pairs": pairs,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "reps": args.reps,
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
