"""D (Gated DeltaNet) speed: the chunked WY scan against the step-by-step recurrence.

Two tables, all implementations in this process, run in turns (``--rounds`` times, median):

- the layer (``GatedDeltaNet``), forward and forward+backward, with its scan as built
  (``gated_delta_rule_chunked``) and with the scan replaced by a Python loop of
  ``gated_delta_rule_step`` (the decoding step, one token at a time: the sequential form);
- the scan alone (q, k, v, g, beta -> o), forward+backward: ours, the step loop, and
  transformers' pure-PyTorch ``torch_chunk_gated_delta_rule`` (Qwen3-Next) when available.

Outputs are compared before timing, so the implementations are known to compute the same
function. Time is the process's CPU time by default (robust on a shared machine; with
``--threads 1`` it equals the step's time on an idle core).

    python benchmarks/bench_deltanet.py --shapes proxy,10m,50m --seq-lens 512,2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hcomposer.io import atomic_write_text
from hcomposer.primitives.delta_rule import gated_delta_rule_chunked, gated_delta_rule_step
from hcomposer.primitives.deltanet import GatedDeltaNet
from hcomposer.shapes import get_shape


def step_loop(q, k, v, g, beta, initial_state=None):
    """The recurrence as a loop of decoding steps (the sequential reference form)."""
    b, t, h, dk = q.shape
    state = initial_state
    if state is None:
        state = v.new_zeros(b, h, dk, v.shape[-1], dtype=torch.float32)
    outs = []
    for i in range(t):
        o, state = gated_delta_rule_step(state, q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i])
        outs.append(o)
    return torch.stack(outs, dim=1).to(v.dtype), state


def _layers(shape):
    ours = GatedDeltaNet(shape)
    ref = GatedDeltaNet(shape)
    ref.load_state_dict(ours.state_dict())
    ref._scan = step_loop
    return {"chunked": ours, "step": ref}


def _timer(fn, clock):
    def run() -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return run


def _measure(steps, rounds, slow_rounds) -> dict[str, float]:
    """Median seconds per call (and the fastest and slowest round, keys ``name:min``/``:max``);
    the implementations run in turns, after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for run in steps.values():
        run()
    for r in range(rounds):
        for name, run in steps.items():
            if name.startswith("step") and r >= slow_rounds:
                continue
            times[name].append(run())
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}:min": min(v) for k, v in times.items()})
    out.update({f"{k}:max": max(v) for k, v in times.items()})
    return out


def _ratio(r, ours, other) -> str:
    """Median ratio of tokens/s, with the range over rounds (worst and best pairing)."""
    # After the conversion to tokens/s a ":min" key (fastest round) holds the highest rate.
    lo = r[f"{ours}:max"] / r[f"{other}:min"]
    hi = r[f"{ours}:min"] / r[f"{other}:max"]
    mid = r[ours] / r[other]
    return f"{mid:.2f}x ({min(lo, hi):.2f}-{max(lo, hi):.2f})"


def _layer_row(shape, T, batch, rounds, slow_rounds, clock) -> dict:
    layers = _layers(shape)
    x = torch.randn(batch, T, shape.d_model, requires_grad=True)
    grad = torch.randn(batch, T, shape.d_model)
    with torch.no_grad():
        want = layers["chunked"](x)
        err = ((layers["step"](x) - want).norm() / want.norm()).item()
    if err > 1e-4:
        raise SystemExit(f"step loop disagrees with the chunked layer: relative error {err:.2e}")
    steps = {}
    for name, layer in layers.items():

        def fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        def fwd_bwd(layer=layer):
            layer(x).backward(grad)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        steps[f"{name}/fwd"] = _timer(fwd, clock)
        steps[f"{name}/fwd+bwd"] = _timer(fwd_bwd, clock)
    med = _measure(steps, rounds, slow_rounds)
    return {"shape": shape.name, "T": T, **{k: batch * T / v for k, v in med.items()}}


def _scan_row(shape, T, batch, rounds, slow_rounds, clock) -> dict:
    h, dk, dv = shape.dn_v_heads, shape.dn_head_dim, shape.dn_v_head_dim
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(batch, T, h, dk, generator=gen).requires_grad_()
    k = F.normalize(torch.randn(batch, T, h, dk, generator=gen), dim=-1).requires_grad_()
    v = torch.randn(batch, T, h, dv, generator=gen).requires_grad_()
    g = (-F.softplus(torch.randn(batch, T, h, generator=gen)) * 0.1).requires_grad_()
    beta = torch.sigmoid(torch.randn(batch, T, h, generator=gen)).requires_grad_()
    grad = torch.randn(batch, T, h, dv, generator=gen)
    leaves = (q, k, v, g, beta)
    fns = {
        "chunked": lambda: gated_delta_rule_chunked(q, k, v, g, beta, shape.dn_chunk)[0],
        "step": lambda: step_loop(q, k, v, g, beta)[0],
    }
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import (
            torch_chunk_gated_delta_rule as theirs,
        )

        fns["transformers"] = lambda: theirs(q, k, v, g, beta, chunk_size=shape.dn_chunk)[0]
    except ImportError:
        pass
    with torch.no_grad():
        want = fns["chunked"]()
        for name, fn in fns.items():
            err = ((fn() - want).norm() / want.norm()).item()
            if err > 1e-4:
                raise SystemExit(f"{name} scan disagrees with ours: relative error {err:.2e}")

    def make(fn):
        def run():
            fn().backward(grad)
            for leaf in leaves:
                leaf.grad = None

        return _timer(run, clock)

    med = _measure({k: make(f) for k, f in fns.items()}, rounds, slow_rounds)
    return {"shape": shape.name, "T": T, **{k: batch * T / v for k, v in med.items()}}


def _layer_table(rows) -> str:
    lines = [
        "| shape | T | chunked fwd tok/s | step fwd tok/s | fwd ratio (range) "
        "| chunked fwd+bwd tok/s | step fwd+bwd tok/s | fwd+bwd ratio (range) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['chunked/fwd']:,.0f} | {r['step/fwd']:,.0f} | "
            f"{_ratio(r, 'chunked/fwd', 'step/fwd')} | {r['chunked/fwd+bwd']:,.0f} | "
            f"{r['step/fwd+bwd']:,.0f} | {_ratio(r, 'chunked/fwd+bwd', 'step/fwd+bwd')} |"
        )
    return "\n".join(lines)


def _scan_table(rows) -> str:
    lines = [
        "| shape | T | chunked tok/s | step tok/s | transformers tok/s | vs step (range) | "
        "vs transformers (range) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        hf = r.get("transformers")
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['chunked']:,.0f} | {r['step']:,.0f} | "
            + (f"{hf:,.0f}" if hf else "-")
            + f" | {_ratio(r, 'chunked', 'step')} | "
            + (_ratio(r, "chunked", "transformers") if hf else "-")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="proxy,10m,50m")
    p.add_argument("--seq-lens", default="512,2048")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slow-rounds", type=int, default=2, help="rounds for the step loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--out", default=None, help="also write the results as Markdown here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    layer_rows, scan_rows = [], []
    for name in args.shapes.split(","):
        shape = get_shape(name)
        for T in (int(t) for t in args.seq_lens.split(",")):
            row = _layer_row(shape, T, args.batch_size, args.rounds, args.slow_rounds, clock)
            layer_rows.append(row)
            print(_layer_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
            row = _scan_row(shape, T, args.batch_size, args.rounds, args.slow_rounds, clock)
            scan_rows.append(row)
            print(_scan_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    shapes = [get_shape(n) for n in args.shapes.split(",")]
    sizes = "; ".join(
        f"{s.name}: d_model {s.d_model}, {s.dn_heads} q/k heads of {s.dn_head_dim}, "
        f"{s.dn_v_heads} value heads of {s.dn_v_head_dim}, chunk {s.dn_chunk}"
        for s in shapes
    )
    header = (
        f"D layer (`GatedDeltaNet`) and its scan, batch {args.batch_size}, fp32, "
        f"{args.threads} thread(s), {args.clock} time, median of {args.rounds} rounds "
        f"({args.slow_rounds} for the step loop), torch {torch.__version__}. Sizes: {sizes}."
    )
    text = header + "\n\nThe layer, tokens/s (ratio = chunked / step loop):\n\n"
    text += _layer_table(layer_rows) + "\n"
    text += "\nThe scan alone (q, k, v, g, beta -> o), forward+backward, tokens/s:\n\n"
    text += _scan_table(scan_rows) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
