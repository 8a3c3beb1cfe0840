"""W (sliding-window attention) forward+backward against A, and W's band against its mask.

All in this process, at one size (default: the `10m` shape with window 512, T 8192, batch 1):

- ``W``: ``SlidingWindowAttention`` as built, computing only the band
  (``banded_window_attention``, chunks of ``band_chunk(window)`` queries, on CPU straight
  through PyTorch's flash kernels), and ``W/<c>`` the same with chunks of c (``--chunks``);
- ``W-masked``: the same layer and weights with ``band_chunk = 0``: every score of the T x T
  square computed, the band kept by a mask (the path W took before the band);
- ``A``: ``Attention`` (global causal, SDPA's causal kernel) with the same weights.

A measure is the time of one step - the layer's forward on x [batch, T, d_model] and backward
with a fixed random cotangent, gradients cleared - so projections and rotary embeddings are
included (``--core`` also times the attention alone, q, k, v -> y). The layers run in turns,
``--rounds`` times after one warm-up each, each round starting one further along, so that load
from other processes falls on all of them; a ratio is taken within each round (A's time /
W's) and reported as the median with the lowest and highest round. The outputs of W and
W-masked are compared before timing. Time is the process's CPU time by default (with
``--threads 1``, the step's time on one core; robust on a shared machine); ``--clock wall``
uses wall time. The dtype is training's default on this machine (``resolve_dtype("auto")``:
bf16 autocast where bf16 is native, else fp32).

    python benchmarks/bench_window.py --rounds 9 --chunks 192,256 --core \
        --json benchmarks/results/window/bench_window.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from hcomposer.io import atomic_write_text
from hcomposer.primitives.attention import (
    Attention,
    SlidingWindowAttention,
    banded_window_attention,
    masked_attention,
)
from hcomposer.shapes import get_shape
from hcomposer.training.step import autocast, resolve_dtype


def _layers(shape, chunks):
    w = SlidingWindowAttention(shape)
    layers = {"W": w}
    for c in chunks:
        other = SlidingWindowAttention(shape)
        other.load_state_dict(w.state_dict())
        other.band_chunk = c
        layers[f"W/{c}"] = other
    masked = SlidingWindowAttention(shape)
    masked.load_state_dict(w.state_dict())
    masked.band_chunk = 0
    full = Attention(shape)
    full.load_state_dict(w.state_dict())
    return {**layers, "W-masked": masked, "A": full}


def _core_fns(layer: SlidingWindowAttention, x):
    """Attention alone on the layer's rotated q, k, v (leaves): band, mask, causal."""
    with torch.no_grad():
        q, k, v = (t.detach().requires_grad_() for t in layer._qkv(x, 0))
    pos = torch.arange(x.shape[1])
    w, c = layer.window, layer.band_chunk
    fns = {
        "core:W": lambda: banded_window_attention(q, k, v, w, c),
        "core:W-masked": lambda: masked_attention(q, k, v, pos, pos, w),
        "core:A": lambda: masked_attention(q, k, v, pos, pos, None),
    }
    return fns, (q, k, v)


def _stepper(fn, leaves, grad, clock, dtype, device):
    def step() -> float:
        t0 = clock()
        with autocast(device, dtype):
            y = fn()
        y.backward(grad.to(y.dtype))
        for t in leaves:
            t.grad = None
        return clock() - t0

    return step


def _check_same(layers, x, dtype, device):
    with torch.no_grad(), autocast(device, dtype):
        want = layers["W-masked"](x).float()
        for name, layer in layers.items():
            if name.startswith("W") and name != "W-masked":
                err = ((layer(x).float() - want).norm() / want.norm()).item()
                if err > (2e-2 if dtype == "bf16" else 1e-5):
                    raise SystemExit(f"{name} disagrees with W-masked: relative error {err:.2e}")


def measure(steps, rounds) -> dict[str, list[float]]:
    """Seconds per step of each, per round, after one warm-up each. The steps run in turns,
    each round starting one further along the list, so none always follows the same one."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(steps[name]())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)  # fmt: skip
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """num's time over den's, round by round: median, min, max."""
    per = [a / b for a, b in zip(times[num], times[den])]
    return {"median": statistics.median(per), "min": min(per), "max": max(per)}


def summary(doc: dict) -> dict[str, dict[str, float]]:
    """The ratios a results file supports: A / W, W-masked / W (layer and, if timed, core)."""
    t = doc["seconds"]
    out = {"A/W": ratios(t, "A", "W"), "W-masked/W": ratios(t, "W-masked", "W")}
    for c in doc["chunks"]:
        out[f"A/W/{c}"] = ratios(t, "A", f"W/{c}")
    if "core:W" in t:
        out["core A/W"] = ratios(t, "core:A", "core:W")
        out["core W-masked/W"] = ratios(t, "core:W-masked", "core:W")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="10m", help="preset whose attention sizes are used")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--chunks", default="", help="extra chunk sizes for W, comma-separated")
    p.add_argument("--core", action="store_true", help="also time the attention alone")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--json", default=None, help="write the raw times and ratios here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    shape = get_shape(args.shape).replace(window=args.window)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    layers = _layers(shape, chunks)
    x = torch.randn(args.batch_size, args.seq_len, shape.d_model, requires_grad=True)
    grad = torch.randn(args.batch_size, args.seq_len, shape.d_model)
    _check_same(layers, x, dtype, device)
    steps = {}
    for name, layer in layers.items():
        leaves = [x, *layer.parameters()]
        steps[name] = _stepper(lambda layer=layer: layer(x), leaves, grad, clock, dtype, device)
    if args.core:
        fns, leaves = _core_fns(layers["W"], x)
        g = torch.randn_like(leaves[0])
        steps.update({k: _stepper(f, leaves, g, clock, dtype, device) for k, f in fns.items()})
    times = measure(steps, args.rounds)
    doc = {
        "question": "W (banded) forward+backward against A and against W's masked path",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/bench_window.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "shape": shape.name,
        "d_model": shape.d_model,
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "window": args.window,
        "band_chunk": layers["W"].band_chunk,
        "chunks": chunks,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "threads": args.threads,
        "clock": args.clock,
        "rounds": args.rounds,
        "seconds": times,
    }
    doc["ratios"] = summary(doc)
    for k, r in doc["ratios"].items():
        print(f"{k}: {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]")
    if args.json:
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
