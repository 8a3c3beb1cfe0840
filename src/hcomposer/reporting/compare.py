"""Side-by-side comparison of trained runs: tables, ratios, plots, ``compare.md``.

The first run is the reference: every other run gets ratios against it. Inputs are
run folders written by ``hcomposer train`` (and ``hcomposer eval``); nothing is
recomputed here, so a comparison is cheap and can be rebuilt at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcomposer.accounting import count_costs
from hcomposer.config_io import read_run_file
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import plot_efficiency
from hcomposer.evaluation.efficiency_compare import interleaved_markdown
from hcomposer.evaluation.mqar_curve import plot_mqar_curve
from hcomposer.evaluation.niah import plot_niah
from hcomposer.evaluation.suite import load_eval_results
from hcomposer.format import markdown_table
from hcomposer.io import atomic_write_json, atomic_write_text
from hcomposer.reporting.report import plot_loss_curves, plot_pattern_strips
from hcomposer.runs import RunDir

__all__ = ["collect_run", "compare_runs", "comparison_rows", "comparison_markdown"]


def collect_run(run_dir: str | Path, label: str | None = None) -> dict[str, Any]:
    """What a run folder says about itself: architecture, costs, training, evaluation."""
    run_dir = RunDir(run_dir)
    run_dir.require_run()
    d = run_dir.root
    arch = run_dir.read_architecture()
    run = (
        read_run_file(d, run_dir.run_json.name, versioned=True)
        if run_dir.run_json.is_file()
        else {}
    )
    train = (run.get("config") or {}).get("train") or {}
    seq_len = train.get("seq_len") if isinstance(train, dict) else None
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        seq_len = arch.shape.max_seq_len
    costs = count_costs(arch, seq_len=seq_len)
    summary = run_dir.read_summary() or {}
    return {
        "label": label or d.name,
        "dir": str(d),
        "pattern": arch.pattern,
        "shape": arch.shape.name,
        "costs": costs.to_dict(),
        "summary": summary,
        "metrics": run_dir.read_metrics(),
        "eval": load_eval_results(d).get("parts", {}),
    }


def _get(run: dict, *path: str) -> Any:
    cur: Any = run
    for key in path:
        if isinstance(cur, list):
            cur = cur[int(key)] if cur else None
        elif isinstance(cur, dict):
            cur = cur.get(key)
        else:
            return None
        if cur is None:
            return None
    return cur


# (row label, path into collect_run's dict, better: "lower"|"higher"|None)
_METRICS: list[tuple[str, tuple[str, ...], str | None]] = [
    ("sublayers", ("costs", "n_sublayers"), None),
    ("parameters", ("costs", "params_total"), None),
    ("active parameters", ("costs", "params_active"), None),
    ("FLOPs / token (train length)", ("costs", "flops_per_token"), "lower"),
    ("KV cache bytes / token", ("costs", "kv_bytes_per_token"), "lower"),
    ("state bytes / sequence", ("costs", "state_bytes"), "lower"),
    ("final train loss", ("summary", "loss"), "lower"),
    ("final validation loss", ("summary", "val_loss"), "lower"),
    ("eval loss", ("eval", "loss", "loss"), "lower"),
    ("eval perplexity", ("eval", "loss", "perplexity"), "lower"),
    ("training tokens/s", ("summary", "tokens_per_second"), "higher"),
    ("needle accuracy (mean)", ("eval", "niah", "accuracy_mean"), "higher"),
    ("efficiency: train tokens/s", ("eval", "efficiency", "train", "tokens_per_s"), "higher"),
]


def comparison_rows(runs: list[dict[str, Any]]) -> list[tuple[str, list[Any], list[Any]]]:
    """(metric, values per run, ratio to the first run) for every metric some run has."""
    rows = []
    metrics = list(_METRICS)
    # Per-context prefill/decode speeds and needle accuracy per length, where present.
    contexts = sorted(
        {p["context"] for r in runs for p in (_get(r, "eval", "efficiency", "inference") or [])}
    )
    for L in contexts:
        metrics.append(
            (f"prefill tokens/s @ {L}", ("_inf", str(L), "prefill_tokens_per_s"), "higher")
        )
        metrics.append(
            (f"decode tokens/s @ {L}", ("_inf", str(L), "decode_tokens_per_s"), "higher")
        )
    lengths = sorted(
        {int(k) for r in runs for k in (_get(r, "eval", "niah", "accuracy_by_length") or {})}
    )
    for L in lengths:
        metrics.append(
            (f"needle accuracy @ {L}", ("eval", "niah", "accuracy_by_length", str(L)), "higher")
        )
    tasks = sorted({t for r in runs for t in (_get(r, "eval", "lm-eval", "tasks") or {})})
    for t in tasks:
        metrics.append((f"lm-eval {t}", ("_lm", t), "higher"))
    for r in runs:
        inf = _get(r, "eval", "efficiency", "inference") or []
        r["_inf"] = {str(p["context"]): p for p in inf}
        lm = _get(r, "eval", "lm-eval") or {}
        errs = lm.get("stderr") or {}
        r["_lm"] = {t: _lm_score(v, errs.get(t)) for t, v in (lm.get("tasks") or {}).items()}
    for name, path, _better in metrics:
        values = [_get(r, *path) for r in runs]
        if all(v is None for v in values):
            continue
        ref = values[0]
        ratios = [
            (v / ref)
            if isinstance(v, (int, float)) and isinstance(ref, (int, float)) and ref
            else None
            for v in values
        ]
        rows.append((name, values, ratios))
    for r in runs:
        r.pop("_inf", None)
        r.pop("_lm", None)
    return rows


class Scored(float):
    """A score that carries its standard error (shown as "value ± stderr"; arithmetic, such
    as the ratios of the comparison, uses the value alone)."""

    stderr: float | None

    def __new__(cls, value: float, stderr: float | None = None):
        obj = super().__new__(cls, value)
        obj.stderr = stderr
        return obj


def _lm_score(task_result: Any, stderr: dict | None = None) -> float | None:
    """The accuracy of an lm-eval task result (acc_norm preferred, then acc), with its
    standard error when the run recorded one."""
    if isinstance(task_result, (int, float)):
        return float(task_result)
    if not isinstance(task_result, dict):
        return None
    for key in ("acc_norm,none", "acc_norm", "acc,none", "acc", "exact_match,none"):
        if isinstance(task_result.get(key), (int, float)):
            se = (stderr or {}).get(key.split(",")[0])
            return Scored(task_result[key], se if isinstance(se, (int, float)) else None)
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, Scored) and v.stderr is not None:
        return f"{v:.4g} ± {v.stderr:.2g}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    labels: list[str] | None = None,
    title: str = "Comparison",
    efficiency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``compare.md``, ``compare.json`` and plots into ``out_dir``; return the data.

    ``efficiency``: a ``compare_efficiency`` result keyed by these labels (the runs measured
    interleaved); its speeds replace the ones each run's evaluation measured on its own.

    The returned ``sections`` render the same Markdown elsewhere (:func:`comparison_markdown`).
    """
    if not run_dirs:
        raise UserError("give at least one run folder to compare")
    labels = labels or [Path(d).name for d in run_dirs]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    runs = [collect_run(d, lab) for d, lab in zip(run_dirs, labels)]
    for r in runs:
        if efficiency is not None and r["label"] in efficiency["models"]:
            own = r["eval"].get("efficiency") or {}
            r["eval"]["efficiency"] = {**own, **efficiency["models"][r["label"]]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    header = ["metric", *labels] + [f"{lab} / {labels[0]}" for lab in labels[1:]]
    table = [
        [name, *(_fmt(v) for v in values), *(_fmt(r) for r in ratios[1:])]
        for name, values, ratios in rows
    ]
    plot_pattern_strips(
        [(r["label"], r["pattern"]) for r in runs], out / "patterns.png", title="Architectures"
    )
    plot_loss_curves({r["label"]: r["metrics"] for r in runs}, out / "loss.png")
    intro = [f"- **{r['label']}** `{r['pattern']}` ({r['shape']}) — `{r['dir']}`" for r in runs]
    sections: list[list[Any]] = [
        ["title", title],
        ["text", "\n".join(intro)],
        ["image", "architectures", "patterns.png"],
        ["text", markdown_table(header, table)],
        ["image", "loss curves", "loss.png"],
        *_eval_plots(runs, out),
    ]
    if efficiency is not None:
        sections += [
            ["heading", "Efficiency, paired"],
            ["text", interleaved_markdown(efficiency)],
        ]
    markdown = out / "compare.md"
    atomic_write_text(markdown, comparison_markdown(sections))
    data = {
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
        "rows": [{"metric": n, "values": v, "ratios": q} for n, v, q in rows],
        "efficiency_interleaved": efficiency,
    }
    atomic_write_json(out / "compare.json", data)
    return {
        "table_header": header,
        "table": table,
        **data,
        "markdown": str(markdown),
        "sections": sections,
    }


def comparison_markdown(sections: list[list[Any]], images: str = "", level: int = 1) -> str:
    """The comparison as Markdown; ``images`` prefixes every image link (the folder of the
    plots as seen from where the text goes) and ``level`` is the title's heading level."""
    lines: list[str] = []
    for kind, *rest in sections:
        if kind == "title":
            lines += ["#" * level + " " + rest[0], ""]
        elif kind == "heading":
            lines += ["#" * (level + 1) + " " + rest[0], ""]
        elif kind == "image":
            lines += [f"![{rest[0]}]({images}{rest[1]})", ""]
        else:
            lines += [rest[0], ""]
    return "\n".join(lines) + "\n"


def _eval_plots(runs: list[dict[str, Any]], out: Path) -> list[list[Any]]:
    """Joint plots of the evaluation parts the runs have (efficiency, MQAR, needles)."""
    sections: list[list[Any]] = []
    eff = {r["label"]: r["eval"]["efficiency"] for r in runs if "efficiency" in r["eval"]}
    if eff:
        plot_efficiency(eff, out / "efficiency.png")
        sections += [["heading", "Efficiency"], ["image", "efficiency", "efficiency.png"]]
    mq = {r["label"]: r["eval"]["mqar"] for r in runs if "mqar" in r["eval"]}
    if mq:
        plot_mqar_curve(mq, out / "mqar.png")
        sections += [["heading", "MQAR"], ["image", "mqar", "mqar.png"]]
    niah_runs = [r for r in runs if "niah" in r["eval"]]
    if niah_runs:
        sections += [["heading", "Needle in a haystack"]]
        for i, r in enumerate(niah_runs):
            name = f"niah_{i}.png"
            plot_niah(r["eval"]["niah"], out / name, r["label"])
            sections += [["text", f"**{r['label']}**"], ["image", f"needle {r['label']}", name]]
    return sections
