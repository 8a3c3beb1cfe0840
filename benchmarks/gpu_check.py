"""One-GPU check: kernel parity, train-step MFU, long-context decode speed, a shrunk paper run.

What a person with one CUDA GPU runs (through ``benchmarks/gpu_check.sh``, which installs the
kernels from carried wheels first) to learn, in under 10 minutes, whether hcomposer's GPU paths
work and how fast they are on that card:

1. **Kernel parity**: D's scan through flash-linear-attention's ``chunk_gated_delta_rule`` and
   S's through mamba_ssm's ``mamba_chunk_scan_combined`` against our PyTorch scans on the same
   random inputs (max abs difference of outputs, final states and input gradients), and the
   forward + backward time of each, side by side in this process (a kernel that is not
   installed is skipped with one line). With ``--cpu-smoke`` D is checked against fla's
   pure-PyTorch reference instead (when fla is installed), at tiny sizes.
2. **Train-step MFU** at the ``350m`` shape: ``(AF)*24`` and the DeltaNet hybrid, bf16
   autocast, AdamW, ``--train-steps`` timed steps after two warm-up steps; MFU from
   ``hcomposer.training.meter.Meter`` (3 x accounting FLOPs x tokens/s over this card's
   measured bf16 matmul peak).
3. **Decode tokens/s** at 16K and 32K context for ``(AF)*24`` against the hybrids, batch 1,
   bf16; the caches are filled with random contents as ``bench_decode.py`` does (a decode
   step's cost does not depend on them), then ``--decode-steps`` single-token steps are timed.
4. **A shrunk paper run**: ``hcomposer run --recipe paper --rehearse`` when this hcomposer has
   ``--rehearse``; otherwise one TODO line says what is missing.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

    python benchmarks/gpu_check.py --out gpu_check_results            # on a GPU
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_smoke     # tiny, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_decode import _fill as fill_attention_and_ssm
from hcomposer.io import atomic_write_text
from hcomposer.model import build_model
from hcomposer.primitives import fla_delta
from hcomposer.primitives.delta_rule import gated_delta_rule_chunked
from hcomposer.primitives.deltanet import DeltaNetCache
from hcomposer.primitives.ssd import ssd_chunked
from hcomposer.training.meter import Meter

ROOT = Path(__file__).resolve().parents[1]
GPU = dict(shape="350m", train_patterns=("(AF)*24", "(DFDFDFAF)*6"), batch=8, seq=2048,
           contexts=(16384, 32768),
           decode_patterns=("(AF)*24", "(DFDFDFAF)*6", "(SFSFSFAF)*6"),
           kernel=dict(b=2, t=2048, h=8, dk=128, dv=128, ssm_p=64, ssm_n=128))  # fmt: skip
SMOKE = dict(shape="tiny", train_patterns=("(AF)*2", "DFAF"), batch=2, seq=32,
             contexts=(64, 128), decode_patterns=("(AF)*2", "DFAF", "SFAF"),
             kernel=dict(b=1, t=40, h=2, dk=8, dv=8, ssm_p=8, ssm_n=8))  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# --- 1. kernel parity -------------------------------------------------------------------------


def _fla_reference():
    """fla's pure-PyTorch recurrent reference, loaded by file path (fla's package imports
    Triton, which a CPU machine need not have; naive.py needs torch and einops only)."""
    import importlib.util

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops/gated_delta_rule/naive.py"
    mod_spec = importlib.util.spec_from_file_location("fla_gdr_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)

    def run(q, k, v, g, beta, h0):
        return mod.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=h0, output_final_state=True
        )

    return run


def _compare(ours, theirs, xs, device) -> dict:
    """Max abs differences of outputs, final states and gradients, and fwd+bwd times."""
    gen = torch.Generator(device=device).manual_seed(1)
    res = {}
    for name, fn in (("ours", ours), ("theirs", theirs)):
        for x in xs:
            x.grad = None
        o, s = fn(*xs)
        do = torch.randn(o.shape, generator=gen, device=device, dtype=o.dtype)
        ds = torch.randn(s.shape, generator=gen, device=device, dtype=s.dtype)
        ((o * do).sum() + (s * ds).sum()).backward()
        res[name] = (o.detach().float(), s.detach().float(), [x.grad.float().clone() for x in xs])
        gen.manual_seed(1)

        def step(fn=fn):
            o, s = fn(*xs)
            (o.float().sum() + s.sum()).backward()

        res[name + "_s"] = _timed(step, device)
    (o1, s1, g1), (o2, s2, g2) = res["ours"], res["theirs"]
    return {
        "max_abs_out": (o1 - o2).abs().max().item(),
        "max_abs_state": (s1 - s2).abs().max().item(),
        "max_abs_grad": max((a - b).abs().max().item() for a, b in zip(g1, g2)),
        "ours_fwd_bwd_ms": 1e3 * res["ours_s"],
        "theirs_fwd_bwd_ms": 1e3 * res["theirs_s"],
        "ours_over_theirs": res["ours_s"] / res["theirs_s"],
    }


def _delta_inputs(k, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    b, t, h, dk, dv = k["b"], k["t"], k["h"], k["dk"], k["dv"]

    def r(*s, dt=dtype):
        return torch.randn(*s, generator=g, device=device).to(dt)

    xs = [r(b, t, h, dk), F.normalize(r(b, t, h, dk, dt=torch.float32), dim=-1).to(dtype),
          r(b, t, h, dv), F.logsigmoid(r(b, t, h, dt=torch.float32) + 2.0),
          torch.sigmoid(r(b, t, h)), 0.5 * r(b, h, dk, dv, dt=torch.float32)]  # fmt: skip
    return [x.requires_grad_() for x in xs]


def check_delta(cfg, device) -> dict:
    def ours(q, k, v, g, beta, h0):
        return gated_delta_rule_chunked(q, k, v, g, beta, 64, h0)

    if device.type == "cpu":
        ref = _fla_reference()
        if ref is None:
            return {"skipped": "flash-linear-attention (fla-core) is not installed"}
        out = _compare(ours, ref, _delta_inputs(cfg["kernel"], device, torch.float32), device)
        return {"against": "fla naive_recurrent_gated_delta_rule (fp32, CPU)", **out}
    if not fla_delta.fast_delta_available():
        return {"skipped": f"fla kernel not usable: {fla_delta.fast_delta_reason()}"}

    def fla(q, k, v, g, beta, h0):
        return fla_delta.fla_gated_delta_rule(q, k, v, g, beta, 64, h0)

    out = {"against": "fla chunk_gated_delta_rule"}
    for dtype in (torch.float32, torch.bfloat16):
        xs = _delta_inputs(cfg["kernel"], device, dtype)
        out[str(dtype).removeprefix("torch.")] = _compare(ours, fla, xs, device)
    return out


def check_ssd(cfg, device) -> dict:
    if device.type != "cuda":
        return {"skipped": "mamba_ssm runs on CUDA only"}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # not installed, or a broken Triton/CUDA build
        return {"skipped": f"mamba_ssm not usable ({type(e).__name__}: {e})"}
    k = cfg["kernel"]
    b, t, h, p, n = k["b"], k["t"], k["h"], k["ssm_p"], k["ssm_n"]
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=device)

    xs = [r(b, t, h, p), F.softplus(r(b, t, h) - 2.0), -torch.rand(h, generator=g,
          device=device) - 0.1, r(b, t, 1, n), r(b, t, 1, n), 0.3 * r(b, h, p, n)]  # fmt: skip
    xs = [x.requires_grad_() for x in xs]

    def ours(x, dt, A, B, C, h0):
        return ssd_chunked(x, dt, A, B, C, 64, h0)

    def theirs(x, dt, A, B, C, h0):
        y, s = mamba_chunk_scan_combined(
            x, dt, A, B, C, 64, initial_states=h0, return_final_states=True
        )
        return y, s.float()

    return {"against": "mamba_ssm mamba_chunk_scan_combined", **_compare(ours, theirs, xs, device)}


# --- 2. train-step MFU --------------------------------------------------------------------------


def train_mfu(cfg, pattern: str, device, steps: int) -> dict:
    if device.type == "cuda":  # each pattern's own peak, not the process's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(pattern, shape=cfg["shape"], seed=0, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    B, T = cfg["batch"], cfg["seq"]
    vocab = model.arch.shape.vocab_size
    ids = torch.randint(0, vocab, (B, T + 1), device=device)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    tps = steps * B * T / (time.perf_counter() - t0)
    meter = Meter(model.arch, T, device, precision)
    n_params = sum(p.numel() for p in model.parameters())
    return {"pattern": pattern, "params": n_params, "batch": B, "seq_len": T,
            "precision": precision, "tokens_per_s": tps, "mfu": meter.mfu(tps),
            "peak_mem_mib": meter.peak_mem_mib()}  # fmt: skip


# --- 3. decode tokens/s ------------------------------------------------------------------------


def _fill(cache_layers, L: int, gen: torch.Generator) -> None:
    for c in cache_layers:
        if isinstance(c, DeltaNetCache):
            c.conv_state.copy_(torch.randn(c.conv_state.shape, generator=gen))
            c.state.copy_(0.1 * torch.randn(c.state.shape, generator=gen))
            c.pos = L
        else:
            fill_attention_and_ssm(c, L, gen)


def decode_speed(cfg, pattern: str, L: int, device, steps: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(pattern, shape=cfg["shape"], seed=0, device=device, dtype=dtype).eval()
    cache = model.init_cache(1, L + 2 * steps + 2)
    _fill(cache.layers, L, torch.Generator().manual_seed(L))
    cache.pos = L
    tok = torch.tensor([[7]], device=device)
    with torch.no_grad():
        model(tok, cache=cache)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(tok, cache=cache)
        _sync(device)
        dt = time.perf_counter() - t0
    del model, cache
    return {"pattern": pattern, "context": L, "tokens_per_s": steps / dt, "steps": steps}


# --- 4. shrunk paper run ------------------------------------------------------------------------


def paper_rehearsal(out: Path, cpu_smoke: bool, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "hcomposer", "run", "--help"]
    helptext = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    if "--rehearse" not in helptext:
        return {"skipped": "TODO: `hcomposer run --rehearse` does not exist in this version; "
                "`run --recipe paper` can shrink only --trials and --tokens, not its 1.24B "
                "target's batch 256 x 2048 or its lm-eval task downloads"}  # fmt: skip
    if cpu_smoke:
        return {"skipped": "--cpu-smoke: `run --recipe paper --rehearse` exists, not run here"}
    run = [sys.executable, "-m", "hcomposer", "run", "--recipe", "paper", "--rehearse",
           "--out", str(out / "paper_rehearsal"), "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = None, f"timed out after {timeout} s"
    return {"command": " ".join(run[1:]), "rc": rc, "wall_s": time.perf_counter() - t0,
            "ok": rc == 0, "tail": tail}  # fmt: skip


# --- report --------------------------------------------------------------------------------


def _f(v, fmt="{:.3g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def markdown(r: dict) -> str:
    lines = [f"# GPU check, {r['date']}", "", f"Device: {r['device']}; torch {r['torch']}; "
             f"mode: {r['mode']}.", "", "## Kernel parity (ours vs the fused kernel)", "",
             "| scan | against | dtype | max abs out | max abs state | max abs grad | "
             "ours fwd+bwd ms | theirs ms | ours / theirs |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, res in r["parity"].items():
        if "skipped" in res:
            lines.append(f"| {name} | skipped: {res['skipped']} | | | | | | | |")
            continue
        rows = {k: v for k, v in res.items() if isinstance(v, dict)} or {"fp32": res}
        for dt, x in rows.items():
            lines.append(
                f"| {name} | {res['against']} | {dt} | {_f(x['max_abs_out'])} | "
                f"{_f(x['max_abs_state'])} | {_f(x['max_abs_grad'])} | "
                f"{_f(x['ours_fwd_bwd_ms'])} | {_f(x['theirs_fwd_bwd_ms'])} | "
                f"{_f(x['ours_over_theirs'])} |"
            )
    lines += ["", f"## Train step ({r['shape']} shape)", "",
              "| pattern | params | batch x seq | precision | tokens/s | MFU | peak MiB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["train"]:
        lines.append(
            f"| `{x['pattern']}` | {x['params']:,} | {x['batch']} x {x['seq_len']} | "
            f"{x['precision']} | {_f(x['tokens_per_s'], '{:.0f}')} | {_f(x['mfu'], '{:.3f}')} "
            f"| {_f(x['peak_mem_mib'], '{:.0f}')} |"
        )
    lines += ["", "## Decode, batch 1 (tokens/s)", "", "| pattern | " +
              " | ".join(f"{L} context" for L in r["contexts"]) + " |",
              "|---|" + "---|" * len(r["contexts"])]  # fmt: skip
    for pat in r["decode_patterns"]:
        cells = [_f(d["tokens_per_s"], "{:.1f}") for d in r["decode"] if d["pattern"] == pat]
        lines.append(f"| `{pat}` | " + " | ".join(cells) + " |")
    paper = r["paper"]
    lines += ["", "## Shrunk paper run", ""]
    lines.append(f"Skipped: {paper['skipped']}" if "skipped" in paper else
                 f"`{paper['command']}`: rc {paper['rc']}, {paper['wall_s']:.0f} s")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    cpu_smoke = args.cpu_smoke
    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --cpu-smoke for the tiny CPU run")
    device = torch.device("cpu" if cpu_smoke else "cuda")
    cfg = SMOKE if cpu_smoke else GPU
    name = "CPU" if cpu_smoke else torch.cuda.get_device_name(device)
    r = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
         "python": platform.python_version(), "mode": "cpu-smoke" if cpu_smoke else "gpu",
         "shape": cfg["shape"], "contexts": list(cfg["contexts"]),
         "decode_patterns": list(cfg["decode_patterns"])}  # fmt: skip
    print(f"gpu_check: {name}, mode {r['mode']}", flush=True)
    r["parity"] = {"D (gated delta rule)": check_delta(cfg, device),
                   "S (SSD)": check_ssd(cfg, device)}  # fmt: skip
    for k, v in r["parity"].items():
        print(f"  parity {k}: " + v.get("skipped", "done"), flush=True)
    steps = 2 if cpu_smoke else args.train_steps
    r["train"] = [train_mfu(cfg, p, device, steps) for p in cfg["train_patterns"]]
    print("  train step: done", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dsteps = 4 if cpu_smoke else args.decode_steps
    r["decode"] = [decode_speed(cfg, p, L, device, dsteps)
                   for L in cfg["contexts"] for p in cfg["decode_patterns"]]  # fmt: skip
    print("  decode: done", flush=True)
    r["paper"] = paper_rehearsal(Path(args.out), cpu_smoke, args.paper_timeout)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--paper-timeout", type=int, default=240, help="seconds for the paper run")
    args = ap.parse_args(argv)
    r = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu_check.json", json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    atomic_write_text(out / "gpu_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
