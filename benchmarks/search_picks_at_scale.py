"""The top 3 of two tables (af6q, af6f) at scale: mean loss of each proxy's picks.

Pre-registered in benchmarks/results/search_af6f/prereg.md. Reads the scale losses of the
proxy-to-scale study and of its picks folder (same settings), writes
benchmarks/results/search_af6f/result.json. Nothing is trained:

    python benchmarks/search_picks_at_scale.py
"""

import statistics

from hcomposer.io import atomic_write_json
from hcomposer.proxies.rank_correlation import study_scale_losses
from hcomposer.search.tabular import load_table

loss = study_scale_losses(
    "benchmarks/results/proxy_rank_cpu", "benchmarks/results/proxy_rank_cpu_picks"
)
tables = {
    "af6q (recall, copying, memorisation)": load_table("af6q"),
    "af6f (fuzzy recall alone)": load_table("benchmarks/results/search_af6f/af6f.json"),
}
af = sorted((p for p in loss if set(p) <= {"A", "F"} and len(p) == 6), key=lambda p: loss[p])
out = {"scale_loss": {p: loss[p] for p in af}, "tops": {}}
for name, t in tables.items():
    top = [p for p, _ in t.ranked[:3]]  # ties: by pattern, as the table ranks
    m = statistics.fmean(loss[p] for p in top)
    out["tops"][name] = {
        "patterns": top,
        "losses": [loss[p] for p in top],
        "mean": m,
        "best": min(loss[p] for p in top),
        "ranks_at_scale": [af.index(p) + 1 for p in top],
    }
    print(name, [(p, round(loss[p], 4), af.index(p) + 1) for p in top], f"mean {m:.4f}")
a, b = (out["tops"][k]["mean"] for k in tables)
out["difference_fuzzy_minus_quick"] = b - a
print("af6f - af6q mean loss: %+.4f (rule: claim only beyond 0.03)" % (b - a))
print(len(af), "A/F patterns at scale; best:", [(p, round(loss[p], 4)) for p in af[:5]])
atomic_write_json("benchmarks/results/search_af6f/result.json", out)
