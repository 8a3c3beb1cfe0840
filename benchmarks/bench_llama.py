"""Training step of a plain transformer pattern against transformers' LlamaForCausalLM.

Both models get the same configuration and the same weights; one step is forward, the same fp32
cross-entropy, backward and an AdamW step. Repetitions alternate between the two models inside
one process, so machine noise hits both alike; the table reports median tokens/s and the ratio
ours / transformers (above 1: ours is faster).

    python benchmarks/bench_llama.py --shape 10m --seq-len 256 512 --out results.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from hcomposer import build_model
from hcomposer.export import llama_config_kwargs, to_llama_state_dict
from hcomposer.shapes import resolve_shape

__all__ = ["main"]


def _step_fn(model, logits_of, opt, tokens, targets, autocast):
    def step():
        with autocast():
            logits = logits_of(model, tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
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


def bench(shape, n_pairs, seq_len, batch, dtype, reps, steps, seed=0) -> dict:
    """Median tokens/s of ours and transformers for one configuration."""
    ours, ref = _models(shape, n_pairs, seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if dtype == "bf16":

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    runs = {
        "ours": _step_fn(
            ours, lambda m, t: m(t), torch.optim.AdamW(ours.parameters()), x, y, autocast
        ),
        "transformers": _step_fn(
            ref,
            lambda m, t: m(input_ids=t).logits,
            torch.optim.AdamW(ref.parameters()),
            x,
            y,
            autocast,
        ),
    }
    # Same weights, same data: the first losses agree (a check that we time the same model).
    losses = {name: step() for name, step in runs.items()}
    if abs(losses["ours"] - losses["transformers"]) > 2e-2:
        raise RuntimeError(f"models disagree before timing: {losses}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(reps):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / steps)
    tok = batch * seq_len
    out = {name: tok / statistics.median(t) for name, t in times.items()}
    # Paired: each repetition's ratio compares two runs a few seconds apart, so slow drifts in
    # machine load cancel; the median of those ratios is the headline number.
    out["ratio_per_rep"] = [b / a for a, b in zip(times["ours"], times["transformers"])]
    out["ratio"] = statistics.median(out["ratio_per_rep"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="10m")
    p.add_argument("--vocab", type=int, default=8192, help="override the shape's vocab (0: keep)")
    p.add_argument("--pairs", type=int, default=None, help="(AF)*pairs; default n_layers/2")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=1, help="training steps per timed repetition")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write a markdown table here")
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
            r = bench(shape, pairs, T, args.batch, dtype, args.reps, args.steps)
            rows.append((dtype, T, r))
            spread = f"{min(r['ratio_per_rep']):.2f}-{max(r['ratio_per_rep']):.2f}"
            print(
                f"{dtype:5s} T={T:5d}  ours {r['ours']:9.0f} tok/s  transformers "
                f"{r['transformers']:9.0f} tok/s  ratio {r['ratio']:.3f} (reps {spread})",
                flush=True,
            )
    lines = [
        f"Training step (fwd+bwd+AdamW), `(AF)*{pairs}` on `{shape.name}` "
        f"(d_model {shape.d_model}, vocab {shape.vocab_size}), batch {args.batch}, "
        f"{torch.get_num_threads()} threads, median of {args.reps} interleaved repetitions "
        f"x {args.steps} steps.",
        "",
        "| dtype | T | ours tok/s | transformers tok/s | ratio (median) | per-rep range |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, T, r in rows:
        lines.append(
            f"| {dtype} | {T} | {r['ours']:.0f} | {r['transformers']:.0f} | {r['ratio']:.3f} | "
            f"{min(r['ratio_per_rep']):.2f}-{max(r['ratio_per_rep']):.2f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
