"""Long-context decoding against the memory roofline: reference, PyTorch and kernel paths.

A decoded token reads every weight and the whole cache once, so its time is at least

    (bf16 weights + KV bytes at context L + recurrent state) / read bandwidth,

with the read bandwidth measured in this process as the sum of a large fp32 tensor
(``--bw-mib``). For each pattern, context and implementation (``reference``: the general paths
under ``reference_decoding()``, what hcomposer ran before; ``fast``: the single-token paths)
this records decode tokens/s, the roofline tokens/s, their ratio (the roofline fraction) and the
hybrid / baseline speed ratio. Implementations: ``reference`` (the general paths under
``reference_decoding()``), ``torch`` (the single-token PyTorch paths, C kernels off with
``kernels_disabled()``; the KV cache then keeps positions contiguous) and ``kernel`` (the
default: the fused bf16 C kernels of ``hcomposer.primitives.cpu_kernels``).

Everything is measured interleaved (``hcomposer.evaluation.interleave``): each round runs the
bandwidth probe and ``--steps`` decode steps of every model, in alternating order, on the CPU
time clock; fractions and ratios are computed per round (same round, same load) and reported
as median [min-max] over ``--rounds`` rounds.

The caches are filled directly (random keys and values, random SSM state, position set to L)
instead of by a prefill: a decode step's cost does not depend on the cache's contents, and a
bf16 prefill of 16K tokens takes minutes on a small CPU. That cached decoding computes the
full forward's outputs is what ``tests/test_model.py`` and ``tests/test_decode_fast.py`` check.

    nice -n 10 python benchmarks/bench_decode.py --contexts 1024,4096,8192,16384 --out r.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hcomposer.accounting import count_costs
from hcomposer.evaluation.interleave import measure_interleaved, spread
from hcomposer.io import atomic_write_text
from hcomposer.model import build_model
from hcomposer.primitives import cpu_kernels
from hcomposer.primitives.attention import KVCache
from hcomposer.primitives.decoding import reference_decoding
from hcomposer.primitives.mamba2 import Mamba2Cache

IMPLS = ("reference", "torch", "kernel")


def _impl(name: str):
    """The decode paths of one implementation: ``reference`` the general paths, ``torch`` the
    single-token PyTorch paths with the C kernels off, ``kernel`` the default (C kernels)."""
    if name == "reference":
        return reference_decoding(True)
    return cpu_kernels.kernels_disabled(name == "torch")


TOKEN = torch.tensor([[7]])


def _fill(obj, L: int, g: torch.Generator) -> None:
    """Random cache contents as if L tokens had been seen (sizes and layouts kept)."""
    if isinstance(obj, list):
        for o in obj:
            _fill(o, L, g)
    elif isinstance(obj, KVCache):
        for t in (obj.k, obj.v):
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        obj.pos = L
    elif isinstance(obj, Mamba2Cache):
        obj.conv_state.copy_(torch.randn(obj.conv_state.shape, generator=g))
        obj.ssm_state.copy_(0.1 * torch.randn(obj.ssm_state.shape, generator=g))
        obj.pos = L
    elif obj is not None:
        raise TypeError(f"bench_decode: no filler for {type(obj).__name__}")


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    dtype = torch.bfloat16
    probe = torch.ones(args.bw_mib * 2**20 // 4, dtype=torch.float32)
    results = {"contexts": {}, "threads": args.threads, "shape": args.shape,
               "kernels": cpu_kernels.status()}  # fmt: skip
    for L in contexts:
        fns, info = {"bandwidth": lambda: probe.sum()}, {}
        budget = L + args.steps * (args.rounds + 2) + 1
        for pattern in args.patterns:
            model = build_model(pattern, shape=args.shape, seed=0, dtype=dtype).eval()
            costs = count_costs(model.arch, dtype_bytes=2)
            nbytes = _weight_bytes(model) + costs.kv_bytes_per_token * L + costs.state_bytes
            kv = costs.kv_bytes_per_token * L
            info[pattern] = dict(bytes=nbytes, weights=_weight_bytes(model), kv=kv,
                                 state=costs.state_bytes)  # fmt: skip
            for impl in IMPLS:
                with _impl(impl):
                    cache = model.init_cache(1, budget)
                _fill(cache.layers, L, torch.Generator().manual_seed(L))
                cache.pos = L

                def step(m=model, c=cache, impl=impl, tok=TOKEN):
                    with torch.no_grad(), _impl(impl):
                        for _ in range(args.steps):
                            m(tok, cache=c)

                fns[f"{pattern}/{impl}"] = step
        t0 = time.perf_counter()
        res = measure_interleaved(fns, repeats=args.rounds, warmup=1)
        bw = [probe.numel() * 4 / t for t in res.times["bandwidth"]]
        point = {"bandwidth_GBps": spread([b / 1e9 for b in bw]).to_dict(), "models": {},
                 "wall_s": time.perf_counter() - t0}  # fmt: skip
        for pattern in args.patterns:
            for impl in IMPLS:
                key = f"{pattern}/{impl}"
                tps = [args.steps / t for t in res.times[key]]
                roof = [b / info[pattern]["bytes"] for b in bw]
                point["models"][key] = {
                    **info[pattern],
                    "tokens_per_s": spread(tps).to_dict(),
                    "roofline_tokens_per_s": spread(roof).to_dict(),
                    "fraction": spread([t / r for t, r in zip(tps, roof)]).to_dict(),
                }
        base, hyb = args.patterns[0], args.patterns[-1]
        for impl in IMPLS:
            # time(base) / time(hybrid) per round = the hybrid's speed-up, paired.
            point[f"hybrid_over_baseline/{impl}"] = res.ratio(
                f"{base}/{impl}", f"{hyb}/{impl}"
            ).to_dict()
        for pattern in args.patterns:
            for impl in IMPLS[1:]:
                point[f"{impl}_over_reference/{pattern}"] = res.ratio(
                    f"{pattern}/reference", f"{pattern}/{impl}"
                ).to_dict()
        results["contexts"][str(L)] = point
        print(_markdown_context(L, point, args.patterns), flush=True)
    return results


def breakdown(args) -> dict:
    """Where a kernel decode step's time goes at context ``args.breakdown``: the read speed of
    the output head's GEMV and of one attention layer's cache (kernel and PyTorch), each as a
    fraction of the probe's, and a whole step at context 16 (weights only), interleaved."""
    import torch.nn.functional as F

    from hcomposer.primitives.attention import decode_attention

    torch.set_num_threads(args.threads)
    L = args.breakdown
    probe = torch.ones(args.bw_mib * 2**20 // 4, dtype=torch.float32)
    model = build_model(args.patterns[0], shape=args.shape, seed=0, dtype=torch.bfloat16).eval()
    head = model.lm_head.weight
    x = torch.randn(1, head.shape[1]).to(torch.bfloat16)
    attn = next(b.mixer for b in model.layers if hasattr(b.mixer, "n_kv_heads"))
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    g = torch.Generator().manual_seed(0)
    n = max(2, -(-64 * 2**20 // (2 * Hkv * L * hd * 2)))  # > 64 MiB of caches: not in L3
    std = [tuple(torch.randn(1, Hkv, L, hd, generator=g).to(torch.bfloat16) for _ in "kv")
           for _ in range(n)]  # fmt: skip
    pos = [tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in kv) for kv in std]
    q = torch.randn(1, H, 1, hd).to(torch.bfloat16)
    with cpu_kernels.kernels_disabled(False):
        cache = model.init_cache(1, 16 + args.steps * (args.rounds + 2) + 1)
    _fill(cache.layers, 16, g)
    cache.pos = 16

    def step():
        for _ in range(args.steps):
            model(TOKEN, cache=cache)

    fns = {
        "bandwidth": lambda: probe.sum(),
        "head/kernel": lambda: cpu_kernels.linear(x, head),
        "head/torch": lambda: F.linear(x, head),
        "attention/kernel": lambda: [cpu_kernels.attn_decode(q, k, v) for k, v in std],
        "attention/torch": lambda: [decode_attention(q, k, v) for k, v in pos],
        "step@16": step,
    }
    with torch.no_grad():
        res = measure_interleaved(fns, repeats=args.rounds, warmup=1)
    bw = [probe.numel() * 4 / t for t in res.times["bandwidth"]]
    nbytes = {"head": head.numel() * 2, "attention": n * 2 * Hkv * L * hd * 2}
    out = {"context": L, "bandwidth_GBps": spread([b / 1e9 for b in bw]).to_dict()}
    for key in ("head/kernel", "head/torch", "attention/kernel", "attention/torch"):
        speeds = [nbytes[key.split("/")[0]] / t for t in res.times[key]]
        out[key] = {"GBps": spread([v / 1e9 for v in speeds]).to_dict(),
                    "fraction": spread([v / b for v, b in zip(speeds, bw)]).to_dict()}  # fmt: skip
    weights = _weight_bytes(model)
    step_s = [t / args.steps for t in res.times["step@16"]]
    at_probe = [weights / b for b in bw]
    frac = [p / t for t, p in zip(step_s, at_probe)]
    out["step@16"] = {"ms": spread([t * 1e3 for t in step_s]).to_dict(),
                      "weights_at_probe_ms": spread([t * 1e3 for t in at_probe]).to_dict(),
                      "fraction": spread(frac).to_dict()}  # fmt: skip
    return out


def _breakdown_markdown(b: dict, pattern: str) -> str:
    lines = [f"Breakdown (`{pattern}`): read bandwidth {_s(b['bandwidth_GBps'])} GB/s", "",
             "| piece | GB/s | fraction of the probe |", "|---|---|---|"]  # fmt: skip
    for key in ("head/kernel", "head/torch", "attention/kernel", "attention/torch"):
        where = f"one layer's cache at context {b['context']}" if "attention" in key else "GEMV"
        lines.append(f"| {key} ({where}) | {_s(b[key]['GBps'])} | "
                     f"{_s(b[key]['fraction'], '{:.0%}')} |")  # fmt: skip
    st = b["step@16"]
    lines.append(f"| whole step at context 16: {_s(st['ms'], '{:.2f}')} ms, weights at probe "
                 f"speed {_s(st['weights_at_probe_ms'], '{:.2f}')} ms | | "
                 f"{_s(st['fraction'], '{:.0%}')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _s(d: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}–{fmt.format(d['max'])}]"


def _markdown_context(L: int, p: dict, patterns) -> str:
    lines = [
        f"Context {L}: read bandwidth {_s(p['bandwidth_GBps'])} GB/s",
        "",
        "| model | impl | MB read/token | tok/s | roofline tok/s | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in p["models"].items():
        pattern, impl = key.rsplit("/", 1)
        lines.append(
            f"| `{pattern}` | {impl} | {m['bytes'] / 1e6:.1f} | {_s(m['tokens_per_s'])} | "
            f"{_s(m['roofline_tokens_per_s'])} | {_s(m['fraction'], '{:.0%}')} |"
        )
    lines.append("")
    for impl in IMPLS:
        lines.append(
            f"- hybrid / baseline ({impl}): {_s(p[f'hybrid_over_baseline/{impl}'], '{:.2f}')}"
        )
    for pattern in patterns:
        for impl in IMPLS[1:]:
            r = p[f"{impl}_over_reference/{pattern}"]
            lines.append(f"- {impl} / reference `{pattern}`: {_s(r, '{:.2f}')}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="10m")
    ap.add_argument("--patterns", nargs="+", default=["(AF)*6", "(AFSFSF)*2"],
                    help="the first is the baseline, the last the hybrid")  # fmt: skip
    ap.add_argument("--contexts", default="1024,4096,8192,16384")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per model per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bw-mib", type=int, default=256, help="size of the bandwidth probe")
    ap.add_argument("--out", default=None, help="write the Markdown tables here")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--breakdown", type=int, default=0, metavar="L",
                    help="also time the head GEMV, one attention layer at context L and a "
                         "weights-only step, as fractions of the probe")  # fmt: skip
    args = ap.parse_args(argv)
    res = run(args) if args.contexts else {"contexts": {}}
    md = "\n".join(_markdown_context(int(L), p, args.patterns) for L, p in res["contexts"].items())
    if args.breakdown:
        res["breakdown"] = breakdown(args)
        md += "\n" + _breakdown_markdown(res["breakdown"], args.patterns[0])
        print(_breakdown_markdown(res["breakdown"], args.patterns[0]), flush=True)
    if args.out:
        atomic_write_text(args.out, md)
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
