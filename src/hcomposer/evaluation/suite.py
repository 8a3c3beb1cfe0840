"""``hcomposer eval DIR --suite ...``: run evaluation parts on a trained run folder.

Parts (``--suite`` is a comma-separated list):

- ``loss``: validation loss and perplexity on the run's data (or ``data``);
- ``mad``: the MAD proxy score of the run's pattern (fresh copies trained per task,
  at the ``proxy`` shape: MAD measures what a pattern can learn, not these weights);
- ``mqar``: MQAR accuracy against sequence length (see ``mqar_curve``);
- ``niah``: needle in a haystack on the run's weights, lengths up to 2x training;
- ``efficiency``: training / prefill / decode throughput, memory, cache bytes;
- ``lm-eval:TASK[,TASK...]``: lm-evaluation-harness tasks on the run's weights
  (names after ``lm-eval:`` up to the next part name are tasks; ``+`` also
  separates tasks).

Everything is checked before anything runs or is written: the run folder has a
checkpoint, the part names are known, lm-eval tasks resolve and their data loads.
Results go to ``DIR/eval/results.json`` + ``results.md`` (+ ``niah.png``,
``mqar.png``, ``efficiency.png``), written atomically; parts already stored
there from earlier calls are kept unless run again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hcomposer.config_io import read_run_file
from hcomposer.data.stream import open_validation
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import (
    EfficiencyConfig,
    efficiency_markdown,
    plot_efficiency,
    run_efficiency,
)
from hcomposer.evaluation.lm_eval_adapter import LMEvalOptions, check_tasks, run_lm_eval
from hcomposer.evaluation.mqar_curve import (
    MQARCurveConfig,
    mqar_markdown,
    plot_mqar_curve,
    run_mqar_curve,
)
from hcomposer.evaluation.niah import NIAHConfig, niah_lengths, niah_markdown, plot_niah, run_niah
from hcomposer.io import atomic_write_json, atomic_write_text, run_metadata
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.runs import RunDir
from hcomposer.training.step import evaluate
from hcomposer.training.trainer import TrainConfig, load_run

__all__ = [
    "PARTS",
    "Part",
    "EvalContext",
    "parse_suite",
    "run_suite",
    "load_eval_results",
    "eval_markdown",
]


def parse_suite(text: str) -> list[tuple[str, list[str]]]:
    """``"loss,niah,lm-eval:hellaswag,arc_easy"`` -> [("loss", []), ("niah", []),
    ("lm-eval", ["hellaswag", "arc_easy"])]; unknown names list the valid ones."""
    parts: list[tuple[str, list[str]]] = []
    in_lm_eval = False
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, rest = item.partition(":")
        if name == "lm-eval" and not rest.strip():
            raise UserError("lm-eval needs tasks: --suite lm-eval:TASK[,TASK]")
        if name in PARTS:
            in_lm_eval = name == "lm-eval"
            tasks = [t.strip() for t in rest.split("+") if t.strip()] if in_lm_eval else []
            if sep and not in_lm_eval:
                raise UserError(f"suite part {name!r} takes no ':' argument")
            if in_lm_eval and not tasks:
                raise UserError("lm-eval needs tasks: --suite lm-eval:TASK[,TASK]")
            parts.append((name, tasks))
        elif in_lm_eval and not sep:
            parts[-1][1].extend(t.strip() for t in item.split("+") if t.strip())
        else:
            valid = ", ".join(p if p != "lm-eval" else "lm-eval:TASKS" for p in PARTS)
            raise UserError(f"unknown suite part {item!r}; valid: {valid}")
    if not parts:
        raise UserError("empty --suite; valid parts: " + ", ".join(PARTS))
    merged: dict[str, list[str]] = {}
    for name, tasks in parts:
        merged.setdefault(name, [])
        merged[name] += [t for t in tasks if t not in merged[name]]
    return list(merged.items())


def _train_config(info: dict[str, Any]) -> dict[str, Any]:
    """The run's TrainConfig dict (run.json stores {"architecture", "train", "dataset"})."""
    cfg = info.get("config") or {}
    return cfg.get("train", cfg)


def _train_len(info: dict[str, Any], arch) -> int:
    return int(_train_config(info).get("seq_len") or arch.shape.max_seq_len)


@torch.no_grad()
def validation_loss(
    model,
    tokenizer,
    info: dict[str, Any],
    data: str | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean next-token loss and perplexity on the validation split of the run's data."""
    cfg = _train_config(info)
    source = data if data is not None else cfg.get("data")
    seq_len = int(cfg.get("seq_len") or model.arch.shape.max_seq_len)
    max_tokens = int(max_tokens or cfg.get("eval_tokens") or 65536)
    ds = open_validation(
        source, tokenizer, val_fraction=float(cfg.get("val_fraction", 0.02)),
        seed=int(cfg.get("seed", 0)),
    )  # fmt: skip
    # The training core's evaluation loop, at the model's own dtype (no autocast).
    val = evaluate(
        lambda x, y: (model(x), y), ds.eval_batches(batch_size, seq_len, max_tokens),
        device=next(model.parameters()).device, dtype="fp32", modules=[model],
    )  # fmt: skip
    count = val.count
    loss = val.loss if count else 0.0
    return {
        "data": source if source is not None else "embedded corpus",
        "split": "val",
        "seq_len": seq_len,
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
    }


@dataclass
class EvalContext:
    """What every part may use: the loaded run, its training length, the parts' configs,
    the caller's options, and the results stored so far (lm-eval adds to earlier tasks)."""

    model: Any
    arch: Any
    tokenizer: Any
    info: dict[str, Any]
    train_len: int
    configs: dict[str, Any]
    options: dict[str, Any]
    # results.json as it will be written; its "parts" are the results stored so far.
    results: dict[str, Any]
    data: str | None = None
    include_path: str | None = None
    limit: int | float | None = None
    device: str = "cpu"
    progress: bool = False

    @property
    def stored(self) -> dict[str, Any]:
        return self.results.setdefault("parts", {})


@dataclass(frozen=True)
class Part:
    """One evaluation part: ``run(ctx, tasks)`` returns its result (stored under its name in
    results.json), ``markdown(result)`` its section of results.md, ``plot(result, path,
    pattern)`` its PNG (``<name>.png`` beside the results) when it has one."""

    name: str
    run: Callable[[EvalContext, list[str]], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], list[str]]
    plot: Callable[[dict[str, Any], Path, str], Any] | None = None


def run_suite(
    run_dir: str | Path,
    suite: str | list[tuple[str, list[str]]],
    *,
    options: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    loaded: tuple | None = None,
    **context: Any,
) -> dict[str, Any]:
    """Run the parts on a run folder; write and return the merged results.

    ``options`` tunes parts: ``niah`` (NIAHConfig fields), ``mqar`` (MQARCurveConfig
    fields), ``efficiency`` (EfficiencyConfig fields), ``lm_eval`` (num_fewshot,
    batch_size). ``loaded`` = (model, arch, tokenizer, info) skips ``load_run``. The other
    keywords (``data``, ``include_path``, ``limit``, ``device``, ``progress``) are
    :class:`EvalContext` fields.
    """
    parts = parse_suite(suite) if isinstance(suite, str) else suite
    run = RunDir(run_dir)
    device = context.get("device", "cpu")
    model, arch, tokenizer, info = loaded or load_run(run.root, device=device)
    ctx = _context(run, parts, model, arch, tokenizer, info, options or {}, context)
    results = ctx.results
    timings = results.setdefault("wall_seconds", {})
    for name, tasks in parts:
        t0 = time.perf_counter()
        _say(ctx.progress, f"eval {name} ...")
        ctx.stored[name] = PARTS[name].run(ctx, tasks)
        timings[name] = time.perf_counter() - t0
        _say(ctx.progress, f"eval {name} done in {timings[name]:.1f}s")
    results["meta"] = run_metadata(argv)
    atomic_write_json(run.eval_results, results)
    for name, _ in parts:
        if PARTS[name].plot is not None:
            PARTS[name].plot(ctx.stored[name], run.eval_plot(name), arch.pattern)
    atomic_write_text(run.eval_markdown, eval_markdown(results))
    return results


def _context(run, parts, model, arch, tokenizer, info, options, context) -> EvalContext:
    """Check every input (before any part runs or anything is written), read the stored
    results, and gather what the parts use."""
    configs = _configs(options)
    tasks = dict(parts).get("lm-eval")
    if tasks:
        check_tasks(tasks, context.get("include_path"))
    data = context.get("data")
    if data is not None and not Path(data).exists() and ":" not in data:
        raise UserError(f"--data {data!r} does not exist (a file, folder, or hf:NAME)")
    train_len = _train_len(info, arch)
    if "niah" in dict(parts):
        niah_lengths(tokenizer, configs["niah"], train_len)
    results = load_eval_results(run.root) or {}
    results.update({
        "run": str(run.root), "pattern": arch.pattern, "shape": arch.shape.name,
        "step": info.get("step"), "tokens": info.get("tokens"), "train_len": train_len,
    })  # fmt: skip
    return EvalContext(model=model, arch=arch, tokenizer=tokenizer, info=info,
                       train_len=train_len, configs=configs, options=options, results=results,
                       **context)  # fmt: skip


def _run_loss(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    return validation_loss(ctx.model, ctx.tokenizer, ctx.info, ctx.data)


def _run_mad(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    return evaluate_proxy(ctx.arch.with_shape("proxy"), "mad", config=ctx.configs["mad"],
                          progress=ctx.progress, device=ctx.device).to_dict()  # fmt: skip


def _run_mqar(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    return run_mqar_curve(ctx.arch, ctx.configs["mqar"], progress=ctx.progress)


def _run_niah(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    return run_niah(ctx.model, ctx.tokenizer, train_len=ctx.train_len,
                    haystack_text=ctx.options.get("haystack_text"),
                    config=ctx.configs["niah"])  # fmt: skip


def _run_efficiency(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    # The training step with the run's own settings (optimiser, autocast, clipping).
    train = TrainConfig.from_dict(_train_config(ctx.info))
    return run_efficiency(ctx.model, train_len=ctx.train_len, config=ctx.configs["efficiency"],
                          train=train)  # fmt: skip


def _run_lm_eval(ctx: EvalContext, tasks: list[str]) -> dict[str, Any]:
    lm = ctx.options.get("lm_eval", {})
    opts = LMEvalOptions(limit=ctx.limit, num_fewshot=lm.get("num_fewshot"),
                         batch_size=lm.get("batch_size", 8))  # fmt: skip
    res = run_lm_eval(ctx.model, ctx.tokenizer, tasks, include_path=ctx.include_path, options=opts)
    prev = ctx.stored.get("lm-eval", {"tasks": {}, "n_samples": {}})
    prev["tasks"].update(res["tasks"])
    prev["n_samples"].update(res["n_samples"])
    prev.setdefault("stderr", {}).update(res["stderr"])
    prev["limit"] = ctx.limit
    return prev


def _configs(options: dict[str, Any]) -> dict[str, Any]:
    """Part configs from options, built up front so a bad option fails before any work."""
    try:
        return {
            "niah": NIAHConfig(**options.get("niah", {})),
            "mqar": MQARCurveConfig(**options.get("mqar", {})),
            "efficiency": EfficiencyConfig(**options.get("efficiency", {})),
            "mad": ProxyConfig.from_dict(options.get("mad", {})),
        }
    except TypeError as e:
        raise UserError(f"bad evaluation option: {e}") from None


def _say(enabled: bool, text: str) -> None:
    if enabled:
        from rich.console import Console

        Console(stderr=True).print(text)


def load_eval_results(run_dir: str | Path) -> dict[str, Any]:
    """The stored results of ``hcomposer eval`` for a run folder (or its ``eval/``); {} if none."""
    run = RunDir(run_dir)
    for cand in (run.eval_results, run.root / run.eval_results.name):
        if cand.is_file():
            return read_run_file(
                cand.parent, cand.name,
                recover="delete it and run 'hcomposer eval' again to write it anew",
            )  # fmt: skip
    return {}


def eval_markdown(results: dict[str, Any]) -> str:
    """The whole results.md: one section per part, in the registry's order."""
    parts = results.get("parts", {})
    out = [
        f"# Evaluation of `{results.get('pattern')}` ({results.get('shape')})",
        "",
        f"Run `{results.get('run')}`, step {results.get('step')}, "
        f"{results.get('tokens')} training tokens, training length {results.get('train_len')}.",
    ]
    for name, part in PARTS.items():
        if name in parts:
            out += ["", *part.markdown(parts[name])]
    return "\n".join(out) + "\n"


def _md_loss(lo: dict[str, Any]) -> list[str]:
    return ["## Validation loss", "",
            f"loss {lo['loss']:.4f}, perplexity {lo['perplexity']:.3f} "
            f"({lo['tokens']:,} tokens of {lo['data']}, length {lo['seq_len']})."]  # fmt: skip


def _md_mad(m: dict[str, Any]) -> list[str]:
    return ["## MAD (fresh copies at the proxy shape)", "", f"score {m['score']:.4f}", "",
            "| task | accuracy |", "|---|---|",
            *(f"| {k} | {v['accuracy']:.3f} |" for k, v in m["tasks"].items())]  # fmt: skip


def _md_lm_eval(r: dict[str, Any]) -> list[str]:
    out = [
        "## lm-evaluation-harness",
        "",
        "| task | metric | value | ± stderr |",
        "|---|---|---|---|",
    ]
    errs = r.get("stderr", {})
    for task, metrics in r["tasks"].items():
        for k, v in metrics.items():
            se = errs.get(task, {}).get(k)
            out.append(f"| {task} | {k} | {v:.4f} | {'—' if se is None else f'± {se:.4f}'} |")
    if r.get("limit"):
        out += ["", f"(limit {r['limit']} documents per task)"]
    return out


def _md_section(title: str, body: Callable[[dict[str, Any]], str], image: str):
    return lambda r: [f"## {title}", "", body(r), "", f"![{image}]({image}.png)"]


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part(name="loss", run=_run_loss, markdown=_md_loss),
        Part(name="mad", run=_run_mad, markdown=_md_mad),
        Part(name="mqar", run=_run_mqar,
             markdown=_md_section("MQAR accuracy against length (fresh copy per length)",
                                  mqar_markdown, "mqar"),
             plot=lambda r, path, pattern: plot_mqar_curve({pattern: r}, path)),
        Part(name="niah", run=_run_niah,
             markdown=_md_section("Needle in a haystack (exact 7 digits, greedy)",
                                  niah_markdown, "niah"),
             plot=lambda r, path, pattern: plot_niah(r, path, pattern)),
        Part(name="efficiency", run=_run_efficiency,
             markdown=_md_section("Efficiency", efficiency_markdown, "efficiency"),
             plot=lambda r, path, pattern: plot_efficiency({pattern: r}, path)),
        Part(name="lm-eval", run=_run_lm_eval, markdown=_md_lm_eval),
    )
}  # fmt: skip
