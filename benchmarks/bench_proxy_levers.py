"""Two cost levers for the MAD proxy, measured side by side in one process (2026-12-02).

The proxy trains small models (the ``proxy`` shape, width 64) one after another. Two ways to
make that cheaper were proposed and are measured here against the eager fp32 step the proxy
uses:

* ``torch.compile`` of the model: a faster step, after a one-off compile. It pays only when
  ``compile seconds / seconds saved per step`` (the payback, in steps) is well under the
  steps one model trains (200-600 per task, about 1,850 in a six-task evaluation), and a
  proxy evaluation builds a fresh model per task and restart.
* ``torch.func`` stacking: ``K`` models of the same pattern (the learning-rate grid, or
  several initialisations) trained as one batched model with ``stack_module_state`` and
  ``vmap``, against ``K`` steps of one model. It pays only if one step of a small model is
  dominated by per-op overhead; the batch sweep (8, 32, 96 sequences) says whether it is.
* bf16 autocast, for the record (the proxy runs fp32 on the CPU).

Each step is a full training step (forward, cross-entropy over every position, backward,
AdamW) on random tokens of the fuzzy-recall shape (vocabulary 16, sequence 32), one torch
thread, timed in process CPU seconds after one warm-up step; compile time is wall seconds
(inductor compiles in worker processes). The proxy scores only the target positions; the
levers' ratios do not depend on that.

    python benchmarks/bench_proxy_levers.py --patterns AFAFAF,SFSFSF \\
        --out benchmarks/results/calibration/levers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from hcomposer.architecture import Architecture
from hcomposer.io import atomic_write_text
from hcomposer.model import build_model

VOCAB, SEQ = 16, 32


def _logits(out):
    return out if torch.is_tensor(out) else out[0]


def _model(pattern: str, seed: int):
    arch = Architecture.parse(pattern, "proxy")
    arch = arch.with_shape(arch.shape.replace(vocab_size=VOCAB, max_seq_len=SEQ))
    return build_model(arch, seed=seed)


def _batch(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return x, y


def step_seconds(pattern: str, batch: int, steps: int, mode: str = "eager") -> dict:
    """CPU seconds per training step of one model (after a first, untimed step)."""
    model = _model(pattern, 0)
    x, y = _batch(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    fwd = model
    ctx = nullcontext()
    if mode == "compile":
        fwd = torch.compile(model)
    elif mode == "bf16":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    first_wall = 0.0
    for i in range(steps + 1):
        if i == 1:
            cpu0 = time.process_time()
        w0 = time.perf_counter()
        with ctx:
            logits = _logits(fwd(x))
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 0:
            first_wall = time.perf_counter() - w0
    per = (time.process_time() - cpu0) / steps
    return {"s_per_step": per, "first_step_wall_s": first_wall}


def stacked_step_seconds(pattern: str, batch: int, steps: int, k: int) -> dict:
    """CPU seconds per training step of ``k`` stacked models (``vmap`` over their weights)."""
    from torch.func import functional_call, stack_module_state

    models = [_model(pattern, s) for s in range(k)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])

    def one(p, b, xx):
        return _logits(functional_call(base, (p, b), (xx,)))

    run = torch.vmap(one, in_dims=(0, 0, None))
    leaves = list(params.values())
    for t in leaves:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(leaves, lr=1e-3, foreach=True)
    x, y = _batch(batch)
    yk = y.unsqueeze(0).expand(k, -1, -1).reshape(-1)
    for i in range(steps + 1):
        if i == 1:
            cpu0 = time.process_time()
        logits = run(params, buffers, x)  # [k, batch, seq, vocab]
        # The sum of the k models' mean losses: each model gets its own gradient.
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), yk) * k
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"s_per_step": (time.process_time() - cpu0) / steps}


def measure(pattern: str, *, batch: int, steps: int, k: int) -> dict:
    torch.manual_seed(0)
    row: dict = {"pattern": pattern, "batch": batch, "steps": steps, "k": k}
    for b in (8, batch, 3 * batch):
        row[f"eager_b{b}"] = step_seconds(pattern, b, steps)["s_per_step"]
    row["bf16"] = step_seconds(pattern, batch, steps, "bf16")["s_per_step"]
    torch._dynamo.reset()
    comp = step_seconds(pattern, batch, 2 * steps, "compile")
    row["compile"] = comp["s_per_step"]
    row["compile_first_step_wall_s"] = comp["first_step_wall_s"]
    row["stacked"] = stacked_step_seconds(pattern, batch, steps, k)["s_per_step"]
    eager = row[f"eager_b{batch}"]
    saved = eager - row["compile"]
    row["compile_speedup"] = eager / row["compile"]
    row["compile_payback_steps"] = (
        row["compile_first_step_wall_s"] / saved if saved > 0 else float("inf")
    )
    row["stacked_speedup"] = k * eager / row["stacked"]
    row["bf16_speedup"] = eager / row["bf16"]
    # The share of a batch-8 step that is fixed overhead, taking the batch-(3 x batch) step's
    # time per sequence as pure compute: 0 when compute-bound, at most 1 - 8 / (3 x batch)
    # when the step costs the same whatever the batch.
    row["overhead_share_b8"] = 1 - (row[f"eager_b{3 * batch}"] / (3 * batch) * 8) / row["eager_b8"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="AFAFAF,SFSFSF")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--k", type=int, default=3, help="models stacked into one")
    p.add_argument("--out", type=Path, default=Path("levers.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    for pattern in args.patterns.split(","):
        key = f"{pattern}|b{args.batch}|k{args.k}|s{args.steps}"
        if key not in state["rows"]:
            state["rows"][key] = measure(pattern, batch=args.batch, steps=args.steps, k=args.k)
            state["torch"] = torch.__version__
            atomic_write_text(args.out, json.dumps(state, indent=1))
    b = args.batch
    print(
        f"| pattern | eager ms/step (b{b}) | compile | compile speed-up | compile s | payback "
        f"steps | {args.k} stacked vs {args.k} eager | bf16 | overhead share at b8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in state["rows"].values():
        if row["batch"] != b or row["k"] != args.k:
            continue
        print(
            f"| `{row['pattern']}` | {1e3 * row[f'eager_b{b}']:.1f} | {1e3 * row['compile']:.1f} "
            f"| {row['compile_speedup']:.2f}x | {row['compile_first_step_wall_s']:.1f} "
            f"| {row['compile_payback_steps']:.0f} | {row['stacked_speedup']:.2f}x "
            f"| {row['bf16_speedup']:.2f}x | {row['overhead_share_b8']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
