"""The ruler study's reports, computed from its files alone (no training): the ruler's
reliability and the trivial rankers (``summarise``), the proxies' scores (``run_proxies``
computes them, resumably), the zoo table on the development and held-out patterns
(``write_zoo``), and a third seed where the first two disagree most (``add_seed``).
``benchmarks/ruler_v3.py`` runs the study; ``hcomposer proxy-rank --out FOLDER`` on a ruler
study folder prints these from its files."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from hcomposer.errors import UserError
from hcomposer.format import markdown_table
from hcomposer.io import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.proxies.ruler import (
    Ruler,
    RulerConfig,
    family,
    rate_rule_check,
    reliability,
    ruler_losses,
)
from hcomposer.proxies.zoo import (
    fit_ridge,
    judge,
    plot_zoo,
    rho_against,
    structure,
    trivial_scores,
    zoo_markdown,
)
from hcomposer.runs import RulerDir
from hcomposer.stats import spearman, spearman_ci

__all__ = ["PROXY_RUNS", "summarise", "summary_markdown", "run_proxies", "zoo_scores",
           "write_zoo", "complete_losses", "wide_spread", "add_seed", "run_byte_check",
           "byte_check"]  # fmt: skip


def _rank_against(scores: dict[str, float], losses: dict[str, float]) -> dict | None:
    rho = rho_against(scores, losses)
    n = len(set(scores) & set(losses))
    return None if rho is None else {"spearman": rho[0], "ci": [rho[1], rho[2]], "n": n}


def summarise(out: Path, split: dict, cfg: RulerConfig) -> dict:
    losses = ruler_losses(out)
    params = read_json(RulerDir(out).plan)["non_embedding_active_params"]
    recs = list(read_jsonl(RulerDir(out).runs))
    chosen = {
        r["pattern"]: r["lr"]
        for r in recs
        if r["role"] == "final" and r["seed"] == 0 and r["flag"] is None
    }
    res: dict = {"config": cfg.to_dict(), "reliability": {}, "trivial": {}}
    for name, pats in (
        ("all", split["dev"] + split["heldout"]),
        ("dev", split["dev"]),
        ("heldout", split["heldout"]),
    ):
        sub = {p: losses[p] for p in pats if p in losses}
        rel = reliability(sub)
        res["reliability"][name] = {k: v for k, v in rel.items() if k != "spread"}
        mean = {p: v["mean"] for p, v in sub.items()}
        res["trivial"][name] = {
            r: _rank_against(sc, mean) for r, sc in trivial_scores(list(mean), params).items()
        }
        afwe = {p: m for p, m in mean.items() if family(p) == "afwe"}
        res["trivial"][name + " (A/F/W/E only)"] = {
            r: _rank_against(sc, afwe) for r, sc in trivial_scores(list(afwe), params).items()
        }
    res["rate_rule"] = rate_rule_check(out, split["check"], cfg)
    res["byte_check"] = byte_check(out)
    res["patterns"] = [
        {
            "pattern": p,
            "set": "heldout" if p in split["heldout"] else "dev",
            "lr": chosen.get(p),
            "seeds": losses[p]["seeds"],
            "mean": losses[p]["mean"],
        }
        for p in sorted(losses, key=lambda q: losses[q]["mean"])
    ]
    res["flagged"] = [
        {k: r[k] for k in ("pattern", "lr", "tokens", "seed", "role", "flag")}
        for r in recs
        if r["flag"]
    ]
    res["runs"] = len(recs)
    return res


def _fmt_rho(v: dict | None) -> str:
    return (
        "-"
        if v is None
        else f"{v['spearman']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] (n {v['n']})"
    )


def summary_markdown(res: dict) -> str:
    """result.md: reliability, trivial rankers, the rate rule, per-pattern losses, flags."""
    head = f"Ruler v3: {res['runs']} runs logged; {len(res['patterns'])} patterns with a test loss."
    lines = [head, "", *_reliability_md(res), *_trivial_md(res), *_rate_rule_md(res),
             *_byte_check_md(res.get("byte_check"))]  # fmt: skip
    rows = [[f"`{p['pattern']}`", p["set"], p["lr"],
             ", ".join(f"{v:.4f}" for v in p["seeds"].values()), f"{p['mean']:.4f}"]
            for p in res["patterns"]]  # fmt: skip
    lines += ["## Patterns (test loss, mean of seeds)", "",
              markdown_table(["pattern", "set", "rate", "seeds", "mean"], rows), ""]  # fmt: skip
    if res["flagged"]:
        flags = "; ".join(
            f"`{f['pattern']}` lr {f['lr']} seed {f['seed']} ({f['role']}): {f['flag']}"
            for f in res["flagged"]
        )
        lines += [f"Flagged runs (kept in runs.jsonl, never averaged in): {flags}", ""]
    return "\n".join(lines)


def _reliability_md(res: dict) -> list[str]:
    rows = []
    for name, r in res["reliability"].items():
        if r.get("seed_spearman") is None:
            rows.append([name, r["n"], "-", "-", "-"])
            continue
        lo, hi = r["seed_spearman_ci"]
        rows.append([name, r["n"], f"{r['seed_spearman']:.3f} [{lo:.2f}, {hi:.2f}]",
                     f"{r['spearman_brown']:.3f}", f"{r['spread_median']:.4f}"])  # fmt: skip
    header = ["patterns", "n", "seed-to-seed Spearman", "Spearman-Brown (2 seeds)",
              "median seed spread (nats)"]  # fmt: skip
    title = "## The ruler's reliability (seed 0 against seed 1, test loss)"
    return [title, "", markdown_table(header, rows), ""]


def _trivial_md(res: dict) -> list[str]:
    names = list(next(iter(res["trivial"].values())))
    rows = [[k, *(_fmt_rho(v[n]) for n in names)] for k, v in res["trivial"].items()]
    title = "## Trivial rankers against the ruler (Spearman, 95% bootstrap interval)"
    return [title, "", markdown_table(["patterns", *names], rows), ""]


def _rate_rule_md(res: dict) -> list[str]:
    if not res["rate_rule"]:
        return []
    rows = [[f"`{r['pattern']}`", r["cheap_lr"], r["grid_lr"], f"{r['test_cost']:+.4f}"]
            for r in res["rate_rule"]]  # fmt: skip
    header = ["pattern", "cheap pick", "full-grid pick", "test cost (nats)"]
    title = "## The cheap rate rule against the full grid (seed 0, full budget)"
    return [title, "", markdown_table(header, rows), ""]


# The zoo's proxies computed per pattern: (kind, seeds). mad6: the six-task MAD proxy with
# today's defaults (ProxyConfig()), whose per-task accuracies and losses also give "fuzzy
# recall alone", "MAD by task loss" and the fitted combination's inputs; text/K: a run of 1/K
# of the ruler's tokens on its training text at the base rate, scored on validation; madlab:
# MAD with MAD-lab's protocol, per task the best point of its learning-rate x weight-decay
# grid on the validation split (six times mad6's runs, so one seed, after the rest).
PROXY_RUNS = (("mad6", (0, 1, 2)), ("text/32", (0, 1)), ("text/8", (0, 1)), ("madlab", (0,)))
MADLAB = ProxyConfig(lrs=(1e-4, 5e-4, 1e-3), weight_decays=(0.0, 0.1))
_LAST = ("madlab",)


def _schedule() -> list[tuple[int, list[str]]]:
    """(seed, kinds) phases: every cheap kind's seed 0 over all patterns, then seed 1, ...;
    the dear kinds last."""
    seeds = sorted({s for _, ss in PROXY_RUNS for s in ss})
    cheap = [(s, [k for k, ss in PROXY_RUNS if s in ss and k not in _LAST]) for s in seeds]
    dear = [(s, [k]) for k, ss in PROXY_RUNS if k in _LAST for s in ss]
    return [ph for ph in cheap + dear if ph[1]]


def _mad_record(pattern: str, seed: int, config: ProxyConfig) -> dict:
    """The MAD result without its per-run grid, each task with the seconds its runs took
    (so a subset of tasks can be costed: :func:`task_cpu`)."""
    cpu0 = time.process_time()
    res = evaluate_proxy(pattern, "mad", seed=seed, config=config, device="cpu")
    tasks = {t: {**{k: v for k, v in r.items() if k != "grid"},
                 "seconds": sum(g["seconds"] for g in r["grid"])}
             for t, r in res.to_dict()["tasks"].items()}  # fmt: skip
    return {"score": res.score, "tasks": tasks, "cpu_seconds": time.process_time() - cpu0}


def task_cpu(rec: dict, task: str) -> float:
    """One task's share of a MAD record's CPU seconds (by its runs' seconds); records made
    before tasks were timed count the whole evaluation (an upper bound)."""
    secs = {t: v.get("seconds") for t, v in rec["tasks"].items()}
    if any(v is None for v in secs.values()) or not sum(secs.values()):
        return rec["cpu_seconds"]
    return rec["cpu_seconds"] * secs[task] / sum(secs.values())


def run_proxies(out: Path, patterns: list[str], cfg: RulerConfig, shard, work) -> None:
    """Seed-major (every pattern's first seed before any second), so a partial log covers
    every pattern; pattern k goes to worker k % n."""

    log = RulerDir(out).proxy_scores
    done = {(r["pattern"], r["kind"], r["seed"]) for r in read_jsonl(log)}
    ruler = Ruler(out, cfg, work, log=lambda m: None)
    mine = [p for k, p in enumerate(patterns) if k % shard[1] == shard[0]]
    for seed, kinds in _schedule():
        for p in mine:
            for kind in kinds:
                if (p, kind, seed) in done:
                    continue
                if kind in ("mad6", "madlab"):
                    rec = _mad_record(p, seed, ProxyConfig() if kind == "mad6" else MADLAB)
                else:
                    k = int(kind.split("/")[1])
                    steps = max(10, cfg.tokens // k // cfg.step_tokens)
                    rec = ruler.text_proxy(p, steps * cfg.step_tokens, seed)
                append_jsonl(log, {"pattern": p, "kind": kind, "seed": seed, **rec})
                print(f"{kind} {p} seed {seed}: {rec.get('score', rec.get('val_loss'))}",
                      flush=True)  # fmt: skip


_KIND_NAME = {"mad6": "MAD six tasks (accuracy)", "text/32": "text, 1/32 of the ruler's tokens"}


def zoo_scores(out: Path, split: dict, cfg: RulerConfig) -> tuple[dict, dict, dict]:
    """(ranker -> pattern -> score, ranker -> median CPU-s, design notes): proxies from
    proxy_scores.jsonl (mean over seeds) and the design choices made on the dev set."""

    recs = list(read_jsonl(RulerDir(out).proxy_scores))
    by: dict[tuple[str, str], list[dict]] = {}
    for r in recs:
        by.setdefault((r["kind"], r["pattern"]), []).append(r)
    scores: dict[str, dict[str, float]] = {}
    cpu: dict[str, float] = {}

    def add(name, kind, value, cost=lambda r: r["cpu_seconds"]):
        vals = {p: statistics.fmean(value(r) for r in rs) for (k, p), rs in by.items() if k == kind}
        if vals:
            scores[name] = vals
            cpu[name] = statistics.median(cost(r) for (k, _), rs in by.items()
                                          if k == kind for r in rs)  # fmt: skip

    fuzzy = "fuzzy_in_context_recall"
    add(_KIND_NAME["mad6"], "mad6", lambda r: r["score"])
    add("fuzzy recall alone", "mad6", lambda r: r["tasks"][fuzzy]["accuracy"],
        cost=lambda r: task_cpu(r, fuzzy))  # fmt: skip
    add(_KIND_NAME["text/32"], "text/32", lambda r: -r["val_loss"])
    add("text, 1/8 of the ruler's tokens", "text/8", lambda r: -r["val_loss"])
    add("MAD, MAD-lab protocol (lr x wd grid per task)", "madlab", lambda r: r["score"])
    notes: dict = {}
    losses = complete_losses(out, cfg)
    dev = [p for p in split["dev"] if p in losses and ("mad6", p) in by]
    if len(dev) >= 5:
        tasks = _loss_tasks(by, dev, losses)
        notes["MAD by task loss: tasks kept (chosen on dev)"] = tasks
        if tasks:
            add("MAD by task loss", "mad6",
                lambda r: -statistics.fmean(r["tasks"][t]["loss"] for t in tasks))  # fmt: skip
    _add_fitted(by, scores, cpu, notes, losses, dev=[p for p in split["dev"] if p in losses],
                params=read_json(RulerDir(out).plan)["non_embedding_active_params"])  # fmt: skip
    return scores, cpu, notes


def _mean_feature(rs: list[dict], value: Callable[[dict], float | None]) -> float | None:
    vals = [value(r) for r in rs]
    return None if any(v is None for v in vals) else statistics.fmean(vals)


def _add_fitted(by, scores, cpu, notes, losses, *, dev, params) -> None:
    """Two combinations fitted on the dev patterns (ridge, :func:`fit_ridge`), each of one
    proxy run's measures plus the pattern's structure: the six MAD task losses, and the
    1/32 text run's loss. Their CPU-s is that of the run they need."""
    inputs = {
        "mad6": lambda r: {t: v.get("loss") for t, v in r["tasks"].items()},
        "text/32": lambda r: {"text loss": r["val_loss"]},
    }
    names = {"mad6": "fitted on dev: MAD task losses + structure",
             "text/32": "fitted on dev: text 1/32 + structure"}  # fmt: skip
    for kind, measure in inputs.items():
        feats: dict[str, dict[str, float]] = {}
        for (k, p), rs in by.items():
            if k != kind or p not in params:
                continue
            keys = measure(rs[0])
            vals = {m: _mean_feature(rs, lambda r, m=m, f=measure: f(r)[m]) for m in keys}
            if all(v is not None for v in vals.values()):
                feats[p] = {**vals, **structure(p, params[p])}
        fitted, info = fit_ridge(feats, losses, dev)
        notes[names[kind]] = info
        if fitted:
            scores[names[kind]] = fitted
            cpu[names[kind]] = cpu.get(_KIND_NAME[kind])


def _loss_tasks(by: dict, dev: list[str], losses: dict[str, float]) -> list[str]:
    """Tasks whose loss ranks the dev patterns the right way round (Spearman of minus the
    task loss with minus the ruler loss > 0) and is not saturated (accuracy below 0.98 on
    at least one dev pattern): MAD's memorisation is known to rank inverted."""

    first = by[("mad6", dev[0])][0]["tasks"]
    keep = []
    for t in first:
        rows = [[r["tasks"][t] for r in by[("mad6", p)]] for p in dev]
        if any(x.get("loss") is None for row in rows for x in row):
            continue  # a failed run has no loss: the task cannot be scored by it
        acc = [statistics.fmean(x["accuracy"] for x in row) for row in rows]
        loss = [statistics.fmean(x["loss"] for x in row) for row in rows]
        if min(acc) >= 0.98:
            continue
        if spearman([-v for v in loss], [-losses[p] for p in dev]) > 0:
            keep.append(t)
    return keep


def complete_losses(out: Path, cfg: RulerConfig) -> dict[str, float]:
    """Mean test loss of the patterns that have every seed of the ruler (partial ones wait)."""
    return {p: v["mean"] for p, v in ruler_losses(out).items() if len(v["seeds"]) >= len(cfg.seeds)}


def write_zoo(out: Path, split: dict, cfg: RulerConfig, n_boot: int = 2000) -> str:
    """The zoo on the dev and held-out sets: zoo.json, zoo.md, zoo.png (held-out)."""

    losses = complete_losses(out, cfg)
    params = read_json(RulerDir(out).plan)["non_embedding_active_params"]
    scores, cpu, notes = zoo_scores(out, split, cfg)
    res: dict = {"notes": notes, "sets": {}}
    lines = ["# The proxy zoo against ruler v3", ""]
    for name in ("heldout", "dev"):
        pats = [p for p in split[name] if p in losses]
        sub = {k: {p: v[p] for p in pats if p in v} for k, v in scores.items()}
        sub.update(trivial_scores(pats, params))
        verdicts = judge(sub, {p: losses[p] for p in pats}, cpu=cpu, n_boot=n_boot)
        res["sets"][name] = [v.to_dict() for v in verdicts]
        table = zoo_markdown(verdicts) if verdicts else "(not enough patterns yet)"
        lines += [f"## {name} patterns ({len(pats)} with a ruler loss)", "", table, ""]
        if name == "heldout" and verdicts:
            plot_zoo(verdicts, RulerDir(out).zoo_png, title="held-out patterns")
    for k, v in notes.items():
        lines.append(f"{k}: {v}")
    atomic_write_json(RulerDir(out).zoo_json, res)
    text = "\n".join(lines) + "\n"
    atomic_write_text(RulerDir(out).zoo_md, text)
    return text


def wide_spread(out: str | Path, above: float, seed: int) -> list[str]:
    """Patterns whose seeds 0 and 1 differ by more than ``above`` nats of test loss and that
    so would get ``seed``: where more seeds buy the most reliability. The list does not
    depend on which extra seeds exist yet, so workers sharing it split it the same way."""
    losses = ruler_losses(out)
    return sorted(
        p
        for p, v in losses.items()
        if {0, 1} <= set(v["seeds"]) and abs(v["seeds"][0] - v["seeds"][1]) > above
    )


def add_seed(
    out: str | Path,
    cfg: RulerConfig,
    seed: int,
    *,
    above: float,
    shard: tuple[int, int] = (0, 1),
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """One more seed, at each pattern's chosen rate (its unflagged seed-0 final run), for the
    patterns of :func:`wide_spread`. A flagged extra run is kept in the log and never averaged
    in; the pattern keeps its other seeds. Returns the patterns this worker took."""
    ruler = Ruler(out, cfg, work_dir, log)
    chosen = {
        r["pattern"]: r["lr"]
        for r in read_jsonl(RulerDir(out).runs)
        if r["role"] == "final" and r["seed"] == 0 and r["flag"] is None
    }
    mine = [p for k, p in enumerate(wide_spread(out, above, seed)) if k % shard[1] == shard[0]]
    for p in mine:
        ruler.train_one(p, chosen[p], cfg.tokens, seed, "final")
    return mine


# ---------------------------------------------------------------- byte against BPE


def _byte_dir(out: str | Path) -> Path:
    return Path(out) / "byte_check"


def run_byte_check(out, patterns: list[str], cfg: RulerConfig, *, shard=(0, 1), work_dir=None,
                   log: Callable[[str], None] = print) -> None:  # fmt: skip
    """The ruler again on ``patterns`` with byte-level text instead of BPE (same token
    budget, its own cheap rate rule, seed 0), in ``OUT/byte_check``: does the tokenizer change
    the ranking? The pattern list is recorded there and never changed."""
    sub = _byte_dir(out)
    sub.mkdir(parents=True, exist_ok=True)
    listed = sub / "patterns.json"
    if listed.is_file() and read_json(listed) != patterns:
        raise UserError(f"{listed} lists other patterns; it is never rewritten")
    atomic_write_json(listed, patterns)
    work = Path(work_dir) / "byte_check" if work_dir else None
    ruler = Ruler(sub, replace(cfg, tokenizer="byte", seeds=(0,)), work, log)
    for k, p in enumerate(patterns):
        if k % shard[1] == shard[0]:
            try:
                ruler.run(p)
            except UserError as e:
                log(f"{p}: {e}")


def byte_check(out: str | Path) -> dict | None:
    """Byte-level seed 0 against BPE (its two-seed mean, and its seed 0) on the check's
    patterns, beside BPE's own seed-to-seed Spearman on the same patterns (the noise)."""
    listed = _byte_dir(out) / "patterns.json"
    if not listed.is_file():
        return None
    bpe, byte = ruler_losses(out), ruler_losses(_byte_dir(out))
    two = {p for p, v in bpe.items() if {0, 1} <= set(v["seeds"])}
    pats = [p for p in read_json(listed) if p in two and p in byte and 0 in byte[p]["seeds"]]
    res: dict = {"listed": read_json(listed), "patterns": pats,
                 "byte": {p: byte[p]["seeds"][0] for p in pats},
                 "bpe_mean": {p: bpe[p]["mean"] for p in pats}}  # fmt: skip
    if len(pats) >= 3:
        b = [byte[p]["seeds"][0] for p in pats]
        for name, y in (("byte_vs_bpe_mean", [bpe[p]["mean"] for p in pats]),
                        ("byte_vs_bpe_seed0", [bpe[p]["seeds"][0] for p in pats]),
                        ("bpe_seed0_vs_seed1", None)):  # fmt: skip
            x = [bpe[p]["seeds"][0] for p in pats] if y is None else b
            y = [bpe[p]["seeds"][1] for p in pats] if y is None else y
            res[name] = list(spearman_ci(x, y))
    return res


def _byte_check_md(res: dict | None) -> list[str]:
    if not res:
        return []
    title = "## Byte-level text against BPE (same budget, own rate rule, seed 0)"
    n, listed = len(res["patterns"]), len(res["listed"])
    if "byte_vs_bpe_mean" not in res:
        return [title, "", f"{n} of {listed} patterns done; too few to compare yet.", ""]
    rows = [[k.replace("_", " "), f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"]
            for k, v in res.items() if k.count("_vs_")]  # fmt: skip
    return [title, "", f"{n} of {listed} patterns done.", "",
            markdown_table(["Spearman", "value [95% interval]"], rows), ""]  # fmt: skip
