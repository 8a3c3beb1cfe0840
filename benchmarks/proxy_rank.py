r"""Proxy-to-scale rank correlation (the check the Composer paper's reviewers asked for).

Scores a pool of 6-sublayer patterns with a proxy, keeps k spread across the score
range, trains each (stacked to --layers sublayers, at a wider shape) on the embedded
text corpus, and reports Spearman's rho between proxy score and validation loss.

CPU-sized run recorded in docs/history/results-log.md (section eval_export):

    python benchmarks/proxy_rank.py --out /tmp/proxy_rank --k 6 --proxy text \
        --proxy-shape tiny --text-tokens 32768 --text-seq-len 64 --text-batch-size 8 \
        --tokens 65536 --seq-len 64 --batch-size 8 --lr 3e-3 --layers 12 --shape tiny \
        --d-model 96 \
        --patterns "AFAFAF;SFSFSF;WFWFWF;AFSFSF;[A|S]F[A|S]F[A|S]F;SSSFFF;FFFFFF;AWSAWS"

Full-size (GPU) example:

    python benchmarks/proxy_rank.py --out runs/proxy_rank --k 8 --proxy mad \
        --tokens 20000000 --layers 24 --shape 50m
"""

from __future__ import annotations

import argparse
import json
import sys

# Spread over what the pattern language offers: pure attention, pure Mamba-2, sliding
# window, inter- and intra-layer hybrids, and two deliberately weak ones (no mixer, no
# FFN) so that the pool covers the proxy's range.
POOL = [
    "AFAFAF",
    "SFSFSF",
    "WFWFWF",
    "AFSFSF",
    "SFAFSF",
    "[A|S]F[A|S]F[A|S]F",
    "WFSFAF",
    "AFWFWF",
    "SSSFFF",
    "AAAFFF",
    "FFFFFF",
    "AWSAWS",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--proxy", default="mad")
    p.add_argument("--proxy-steps", type=int, default=120)
    p.add_argument("--proxy-lrs", default="1e-3,4e-3")
    p.add_argument("--proxy-shape", default="proxy", help="shape the proxy trains at")
    p.add_argument("--text-tokens", type=int, default=262_144, help="text proxy budget")
    p.add_argument("--text-seq-len", type=int, default=128)
    p.add_argument("--text-batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=500_000, help="training tokens at scale")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", type=int, default=12, help="sublayers at scale (stack)")
    p.add_argument("--shape", default="proxy", help="base shape at scale")
    p.add_argument("--d-model", type=int, default=0, help="override the scale shape's d_model")
    p.add_argument("--patterns", default="", help="comma-separated pool (default: built in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32")
    args = p.parse_args(argv)

    from hcomposer.proxies.proxy_config import ProxyConfig
    from hcomposer.proxies.rank_correlation import RankStudy, run_proxy_rank
    from hcomposer.shapes import resolve_shape
    from hcomposer.training.trainer import TrainConfig

    pool = [s for s in args.patterns.split(";") if s] if args.patterns else POOL
    shape = resolve_shape(args.shape)
    if args.d_model:
        shape = shape.replace(name=f"{shape.name}-d{args.d_model}", d_model=args.d_model,
                              ffn_dim=3 * args.d_model, head_dim=0)  # fmt: skip
    pcfg = ProxyConfig(
        steps=args.proxy_steps, lrs=tuple(float(v) for v in args.proxy_lrs.split(",")),
        text_tokens=args.text_tokens, text_seq_len=args.text_seq_len,
        text_batch_size=args.text_batch_size, text_eval_tokens=8192, dtype=args.dtype,
    )  # fmt: skip
    tcfg = TrainConfig(
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        min_lr=args.lr / 10, dtype=args.dtype, eval_every=10_000_000, seed=args.seed,
        eval_tokens=8192, log_every=50, checkpoint_every=10_000_000,
    )  # fmt: skip
    study = RankStudy(
        proxy=args.proxy, proxy_shape=args.proxy_shape, proxy_config=pcfg, scale_shape=shape,
        scale_layers=args.layers, train_config=tcfg, seed=args.seed,
    )  # fmt: skip
    res = run_proxy_rank(
        pool, args.out, study, k=args.k, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    print(json.dumps(res["correlation"], indent=2))  # None for a worker with < 3 patterns
    return 0


if __name__ == "__main__":
    sys.exit(main())
