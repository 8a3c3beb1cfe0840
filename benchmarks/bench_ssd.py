"""S (Mamba-2) layer forward+backward tokens/s: ours vs the sequential reference vs transformers.

Three implementations of one Mamba-2 mixer at the same size, all in this process:

- ``hcomposer``: ``Mamba2`` with the chunked SSD scan (``ssd_chunked``);
- ``exact``: the same layer with the scan forced to its exact form (``form="exact"``: a decay
  matrix per head and chunk), the form that ``hcomposer`` takes where the decays are too strong
  for the factored one;
- ``reference``: the same layer with its scan replaced by ``ssd_reference`` (a Python loop over
  time steps) - the slow form the tests hold the chunked scan to;
- ``transformers``: ``transformers``' ``Mamba2Mixer`` (its PyTorch ``torch_forward`` path: no
  ``mamba_ssm`` kernels here), configured with the same d_model, state, head dim, expand, groups,
  conv and chunk size, our weights copied in. The outputs are compared before timing, so the
  three are known to compute the same function.

With ``--deltanet``, a second table times ``D`` the same way: ``GatedDeltaNet`` at the same
shape against its own no-scan bound (the scan replaced by o = beta * v), in turns, after the S
tables (so S's weights and results are the same with or without it); its measure is D's tokens/s
over the bound's, round by round (median, lowest and highest round).

The measure of S against its no-scan bound (``_no_scan_layer``) is S's tokens/s over the
bound's, taken round by round (the bound's time over S's in the same round) and reported as
the median with the lowest and highest round; ``--json`` writes every round's seconds (keys
``S:T<len>:<layer>`` and ``D:T<len>:<layer>``).

Each step is forward, backward with a fixed random cotangent, gradients cleared. The
implementations run in turns (``--rounds`` times) so that load from other processes spreads
over all of them; the median is reported. ``--bf16`` runs the layers' forward under bf16
autocast, as training does on CPU (the scans compute in fp32 either way). Time is the
process's CPU time by default (robust on a shared machine; with ``--threads 1`` it equals the
step's time on an idle core); ``--clock wall`` uses wall time.

    python benchmarks/bench_ssd.py --shape 50m --seq-lens 1024,2048,4096 --out results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from hcomposer.io import atomic_write_text
from hcomposer.primitives.deltanet import GatedDeltaNet
from hcomposer.primitives.mamba2 import Mamba2
from hcomposer.primitives.ssd import ssd_chunked, ssd_reference
from hcomposer.shapes import get_shape


def _hf_mixer(ours: Mamba2, chunk: int):
    """transformers' Mamba2Mixer with ``ours``' sizes and weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    s = ours.shape
    cfg = Mamba2Config(
        hidden_size=s.d_model,
        num_heads=ours.n_heads,
        head_dim=ours.head_dim,
        state_size=ours.d_state,
        expand=s.ssm_expand,
        n_groups=ours.n_groups,
        conv_kernel=ours.d_conv,
        chunk_size=chunk,
        layer_norm_epsilon=s.norm_eps,
        use_bias=False,
        use_conv_bias=True,
        num_hidden_layers=1,
    )
    hf = Mamba2Mixer(cfg, layer_idx=0)
    with torch.no_grad():
        for name in ("in_proj", "conv1d", "out_proj"):
            getattr(hf, name).load_state_dict(getattr(ours, name).state_dict())
        hf.dt_bias.copy_(ours.dt_bias)
        hf.A_log.copy_(ours.A_log)
        hf.D.copy_(ours.D)
        hf.norm.weight.copy_(ours.norm.weight)
    return hf.train()


def _reference_layer(ours: Mamba2) -> Mamba2:
    ref = Mamba2(ours.shape)
    ref.load_state_dict(ours.state_dict())

    def scan(x, dt, A, B, C, initial_state):
        return ssd_reference(x, dt, A, B, C, initial_state)

    ref._scan = scan
    return ref


def _exact_layer(ours: Mamba2) -> Mamba2:
    """The same layer with the scan forced to its exact form (a decay matrix per head)."""
    exact = Mamba2(ours.shape)
    exact.load_state_dict(ours.state_dict())
    exact._scan = lambda x, dt, A, B, C, initial_state: ssd_chunked(
        x, dt, A, B, C, ours.chunk_size, initial_state, form="exact"
    )
    return exact


def _no_scan_layer(ours: Mamba2) -> Mamba2:
    """The layer with its scan replaced by y = dt * x (no mixing over time): everything the three
    implementations share (projections, conv, norm). Its speed bounds any ratio to the
    reference: a scan that cost nothing would leave exactly this."""
    bound = Mamba2(ours.shape)
    bound.load_state_dict(ours.state_dict())
    bound._scan = lambda x, dt, A, B, C, initial_state: (x * dt[..., None], None)
    return bound


def _deltanet_no_scan(ours: GatedDeltaNet) -> GatedDeltaNet:
    """D with its scan replaced by o = beta * v (no mixing over time): the projections, conv,
    decay, gates and norm that remain; like S's bound, q and k then get no gradient."""
    bound = GatedDeltaNet(ours.shape)
    bound.load_state_dict(ours.state_dict())
    bound._scan = lambda q, k, v, g, beta, initial_state: (v * beta[..., None], None)
    return bound


def _deltanet_rows(shape, seq_lens, batch, rounds, clock, raw, bf16) -> list[dict]:
    """D and its no-scan bound per T: tokens/s (median) and D / bound per round."""
    rows = []
    for T in seq_lens:
        ours = GatedDeltaNet(shape)
        layers = {"D": ours, "bound": _deltanet_no_scan(ours)}
        x = torch.randn(batch, T, shape.d_model, requires_grad=True)
        grad = torch.randn(batch, T, shape.d_model)
        steps = {k: _stepper(v, x, grad, clock, bf16) for k, v in layers.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for step in steps.values():
            step()
        for _ in range(rounds):
            for k, step in steps.items():
                times[k].append(step())
        raw.update({f"D:T{T}:{k}": v for k, v in times.items()})
        # D's speed over the bound's = the bound's time over D's, in the same round.
        per = [b / d for d, b in zip(times["D"], times["bound"])]
        row = {"T": T, "chunk": shape.dn_chunk, "fraction": statistics.median(per)}
        row.update({"min": min(per), "max": max(per)})
        row.update({k: batch * T / statistics.median(v) for k, v in times.items()})
        rows.append(row)
        print(_deltanet_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def _deltanet_table(rows) -> str:
    lines = [
        "| T | chunk | D tok/s | no-scan bound tok/s | D / bound (median [min-max]) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['chunk']} | {r['D']:,.0f} | {r['bound']:,.0f} | "
            f"{r['fraction']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |"
        )
    return "\n".join(lines)


def _stepper(layer, x, grad, clock, bf16=False):
    def step() -> float:
        t0 = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.float().backward(grad)
        layer.zero_grad(set_to_none=True)
        return clock() - t0

    return step


def _scan_steppers(shape, T, batch, chunks, with_reference, clock):
    """Scan alone (x, dt, A, B, C -> y): ours per chunk size, transformers' per chunk size."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    H, P, G, N = shape.ssm_heads, shape.ssm_head_dim, shape.ssm_groups, shape.ssm_state
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(batch, T, H, P, generator=gen).requires_grad_()
    dt = (torch.rand(batch, T, H, generator=gen) * 0.1 + 1e-3).requires_grad_()
    A = (-torch.rand(H, generator=gen) * 2).requires_grad_()
    B = torch.randn(batch, T, G, N, generator=gen).requires_grad_()
    C = torch.randn(batch, T, G, N, generator=gen).requires_grad_()
    grad = torch.randn(batch, T, H, P, generator=gen)
    leaves = (x, dt, A, B, C)

    def make(fn):
        def step() -> float:
            t0 = clock()
            y = fn()
            y.backward(grad)
            for v in leaves:
                v.grad = None
            return clock() - t0

        return step

    steps = {}
    for c in chunks:
        steps[f"ours/{c}"] = make(lambda c=c: ssd_chunked(x, dt, A, B, C, c)[0])
        steps[f"hf/{c}"] = make(lambda c=c: mamba2_chunk_scan(x, dt, A, B, C, chunk_size=c))
    if with_reference:
        steps["reference"] = make(lambda: ssd_reference(x, dt, A, B, C)[0])
    want = ssd_chunked(x, dt, A, B, C, chunks[0])[0]
    got = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=chunks[0])
    if ((got - want).norm() / want.norm()).item() > 1e-4:
        raise SystemExit("transformers' mamba2_chunk_scan disagrees with ssd_chunked")
    return steps


def _measure(steps, rounds, ref_rounds, raw=None) -> dict[str, float]:
    """Median seconds per step; the implementations run in turns, after one warm-up each.
    With ``raw`` (a dict), every round's seconds are added to it under each step's name."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()
    for r in range(rounds):
        for k, step in steps.items():
            if k == "reference" and r >= ref_rounds:
                continue
            times[k].append(step())
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def _check_same_function(ours, others, d_model):
    x = torch.randn(1, 200, d_model)
    want = ours(x)
    for name, layer in others.items():
        err = ((layer(x) - want).norm() / want.norm()).item()
        if err > 1e-4:
            raise SystemExit(f"{name} disagrees with hcomposer's Mamba2: relative error {err:.2e}")


def _table(rows) -> str:
    lines = [
        "| T | chunk | hcomposer tok/s | transformers tok/s | reference tok/s | "
        "vs transformers | vs reference | no-scan bound tok/s | bound / reference | "
        "exact form tok/s | hcomposer / bound (median [min-max]) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = r["reference"]
        lines.append(
            f"| {r['T']} | {r['chunk']} | {r['ours']:,.0f} | {r['hf']:,.0f} | "
            + (f"{ref:,.0f}" if ref else "-")
            + f" | {r['ours'] / r['hf']:.2f}x | "
            + (f"{r['ours'] / ref:.1f}x" if ref else "-")
            + f" | {r['bound']:,.0f} | "
            + (f"{r['bound'] / ref:.1f}x" if ref else "-")
            + f" | {r['exact']:,.0f} | {r['fraction']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |"
        )
    return "\n".join(lines)


def _scan_table(rows, chunks) -> str:
    cols = [f"ours/{c}" for c in chunks] + [f"hf/{c}" for c in chunks]
    head = "| T | " + " | ".join(cols) + " | reference | best ours / best hf | ours/"
    head += f"{chunks[0]} / reference |"
    lines = [head, "|---:" * (len(cols) + 4) + "|"]
    for r in rows:
        best_ours = max(r[f"ours/{c}"] for c in chunks)
        best_hf = max(r[f"hf/{c}"] for c in chunks)
        ref = r.get("reference")
        cells = [f"{r[c]:,.0f}" for c in cols]
        ratio = f"{r[f'ours/{chunks[0]}'] / ref:.1f}x" if ref else "-"
        refc = f"{ref:,.0f}" if ref else "-"
        lines.append(
            f"| {r['T']} | " + " | ".join(cells) + f" | {refc} | {best_ours / best_hf:.2f}x | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="50m", help="preset whose S sizes are used (default 50m)")
    p.add_argument("--seq-lens", default="1024,2048,4096")
    p.add_argument(
        "--chunks",
        default="",
        help="chunk sizes, comma-separated (default: the shape's); the layers use the first, "
        "the scan table all of them",
    )
    p.add_argument("--no-scan", dest="scan", action="store_false", help="skip the scan table")
    p.add_argument("--deltanet", action="store_true", help="also time D against its no-scan bound")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--bf16", action="store_true", help="layers under bf16 autocast (training's default)"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ref-rounds", type=int, default=2, help="rounds for the slow reference")
    p.add_argument("--ref-max-len", type=int, default=4096, help="skip the reference above this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--out", default=None, help="also write the results as Markdown here")
    p.add_argument("--json", default=None, help="also write every round's seconds here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = get_shape(args.shape)
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [shape.ssm_chunk]
    d = shape.d_model
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows, scan_rows = [], []
    raw: dict[str, list[float]] = {}
    for T in (int(t) for t in args.seq_lens.split(",")):
        run_ref = args.ref_max_len >= T
        ours = Mamba2(shape.replace(ssm_chunk=chunks[0]))
        layers = {"ours": ours, "hf": _hf_mixer(ours, chunks[0])}
        if run_ref:
            layers["reference"] = _reference_layer(ours)
        _check_same_function(ours, {k: v for k, v in layers.items() if k != "ours"}, d)
        layers["exact"] = _exact_layer(ours)
        layers["bound"] = _no_scan_layer(ours)
        x = torch.randn(args.batch_size, T, d, requires_grad=True)
        grad = torch.randn(args.batch_size, T, d)
        steps = {k: _stepper(v, x, grad, clock, args.bf16) for k, v in layers.items()}
        times: dict[str, list[float]] = {}
        med = _measure(steps, args.rounds, args.ref_rounds, times)
        raw.update({f"S:T{T}:{k}": v for k, v in times.items()})
        tok = args.batch_size * T
        row = {"T": T, "chunk": chunks[0], "reference": None}
        row.update({k: tok / v for k, v in med.items()})
        # S's speed over the bound's = the bound's time over S's, in the same round.
        per = [b / o for o, b in zip(times["ours"], times["bound"])]
        row.update({"fraction": statistics.median(per), "min": min(per), "max": max(per)})
        rows.append(row)
        print(_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.scan:
            med = _measure(
                _scan_steppers(shape, T, args.batch_size, chunks, run_ref, clock),
                args.rounds,
                args.ref_rounds,
            )
            srow = {"T": T, **{k: tok / v for k, v in med.items()}}
            scan_rows.append(srow)
            print(srow, file=sys.stderr, flush=True)

    dtype = "bf16 autocast" if args.bf16 else "fp32"
    header = (
        f"S layer (`Mamba2`) forward+backward, shape `{shape.name}` (d_model {d}, "
        f"{shape.ssm_heads} heads of {shape.ssm_head_dim}, state {shape.ssm_state}, expand "
        f"{shape.ssm_expand}, groups {shape.ssm_groups}, conv {shape.ssm_conv}), batch "
        f"{args.batch_size}, {dtype}, {args.threads} thread(s), {args.clock} time, median of "
        f"{args.rounds} rounds ({args.ref_rounds} for the reference), torch {torch.__version__}."
    )
    text = header + "\n\n" + _table(rows) + "\n"
    if scan_rows:
        text += "\nThe scan alone (x, dt, A, B, C -> y, forward+backward), tokens/s:\n\n"
        text += _scan_table(scan_rows, chunks) + "\n"
    if args.deltanet:
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
        d_rows = _deltanet_rows(
            shape, seq_lens, args.batch_size, args.rounds, clock, raw, args.bf16
        )
        text += (
            f"\nD layer (`GatedDeltaNet`) forward+backward, the same shape ({shape.dn_heads} "
            f"q/k heads of {shape.dn_head_dim}, {shape.dn_v_heads} value heads of "
            f"{shape.dn_v_head_dim}), against its no-scan bound, {args.rounds} rounds:\n\n"
        )
        text += _deltanet_table(d_rows) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if args.json:
        meta = {"shape": shape.name, "chunk": chunks[0], "batch": args.batch_size}
        meta.update({"threads": args.threads, "clock": args.clock, "rounds": args.rounds})
        meta.update({"bf16_autocast": args.bf16, "torch": torch.__version__})
        atomic_write_text(args.json, json.dumps({"config": meta, "seconds": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
