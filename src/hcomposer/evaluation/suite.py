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
from pathlib import Path
from typing import Any

import torch

from hcomposer.config_io import read_run_file
from hcomposer.data import prepare_dataset
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import (
    EfficiencyConfig,
    efficiency_markdown,
    plot_efficiency,
    run_efficiency,
)
from hcomposer.evaluation.lm_eval_adapter import check_tasks, run_lm_eval
from hcomposer.evaluation.mqar_curve import (
    MQARCurveConfig,
    mqar_markdown,
    plot_mqar_curve,
    run_mqar_curve,
)
from hcomposer.evaluation.niah import NIAHConfig, niah_lengths, niah_markdown, plot_niah, run_niah
from hcomposer.io import atomic_write_json, atomic_write_text, run_metadata
from hcomposer.proxies.proxy import ProxyConfig, evaluate_proxy
from hcomposer.runs import RunDir
from hcomposer.training.step import evaluate
from hcomposer.training.trainer import load_run

__all__ = ["PARTS", "parse_suite", "run_suite", "load_eval_results", "eval_markdown"]

PARTS = ("loss", "mad", "mqar", "niah", "efficiency", "lm-eval")


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
    ds = prepare_dataset(
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


def run_suite(
    run_dir: str | Path,
    suite: str | list[tuple[str, list[str]]],
    *,
    data: str | None = None,
    include_path: str | None = None,
    limit: int | float | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    progress: bool = False,
    loaded: tuple | None = None,
) -> dict[str, Any]:
    """Run the parts on a run folder; write and return the merged results.

    ``options`` tunes parts: ``niah`` (NIAHConfig fields), ``mqar`` (MQARCurveConfig
    fields), ``efficiency`` (EfficiencyConfig fields), ``lm_eval`` (num_fewshot,
    batch_size). ``loaded`` = (model, arch, tokenizer, info) skips ``load_run``.
    """
    parts = parse_suite(suite) if isinstance(suite, str) else suite
    options = options or {}
    run = RunDir(run_dir)
    run_dir = run.root
    if loaded is None:
        model, arch, tokenizer, info = load_run(run_dir, device=device)
    else:
        model, arch, tokenizer, info = loaded
    configs = _configs(options)
    tm_tasks = dict(parts).get("lm-eval")
    if tm_tasks:
        check_tasks(tm_tasks, include_path)
    if data is not None and not Path(data).exists() and ":" not in data:
        raise UserError(f"--data {data!r} does not exist (a file, folder, or hf:NAME)")

    train_len = _train_len(info, arch)
    if "niah" in dict(parts):
        niah_lengths(tokenizer, configs["niah"], train_len)
    results = load_eval_results(run_dir) or {}
    results.update(
        {
            "run": str(run_dir),
            "pattern": arch.pattern,
            "shape": arch.shape.name,
            "step": info.get("step"),
            "tokens": info.get("tokens"),
            "train_len": train_len,
        }
    )
    stored = results.setdefault("parts", {})
    timings = results.setdefault("wall_seconds", {})
    plots: list[tuple[str, Any]] = []
    for name, tasks in parts:
        t0 = time.perf_counter()
        _say(progress, f"eval {name} ...")
        if name == "loss":
            stored["loss"] = validation_loss(model, tokenizer, info, data)
        elif name == "mad":
            stored["mad"] = evaluate_proxy(
                arch.with_shape("proxy"), "mad", config=configs["mad"], progress=progress,
                device=device,
            ).to_dict()  # fmt: skip
        elif name == "mqar":
            stored["mqar"] = run_mqar_curve(arch, configs["mqar"], progress=progress)
            plots.append(("mqar", lambda p: plot_mqar_curve({arch.pattern: stored["mqar"]}, p)))
        elif name == "niah":
            stored["niah"] = run_niah(model, tokenizer, train_len=train_len,
                                      haystack_text=options.get("haystack_text"),
                                      config=configs["niah"])  # fmt: skip
            plots.append(("niah", lambda p: plot_niah(stored["niah"], p, arch.pattern)))
        elif name == "efficiency":
            stored["efficiency"] = run_efficiency(
                model, train_len=train_len, config=configs["efficiency"]
            )
            plots.append(
                (
                    "efficiency",
                    lambda p: plot_efficiency({arch.pattern: stored["efficiency"]}, p),
                )
            )
        elif name == "lm-eval":
            lm = options.get("lm_eval", {})
            res = run_lm_eval(model, tokenizer, tasks, include_path=include_path, limit=limit,
                              num_fewshot=lm.get("num_fewshot"),
                              batch_size=lm.get("batch_size", 8))  # fmt: skip
            prev = stored.get("lm-eval", {"tasks": {}, "n_samples": {}})
            prev["tasks"].update(res["tasks"])
            prev["n_samples"].update(res["n_samples"])
            prev["limit"] = limit
            stored["lm-eval"] = prev
        timings[name] = time.perf_counter() - t0
        _say(progress, f"eval {name} done in {timings[name]:.1f}s")
    results["meta"] = run_metadata(argv)
    atomic_write_json(run.eval_results, results)
    for name, draw in plots:
        draw(run.eval_plot(name))
    atomic_write_text(run.eval_markdown, eval_markdown(results))
    return results


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
    """The whole results.md: one section per part."""
    parts = results.get("parts", {})
    out = [
        f"# Evaluation of `{results.get('pattern')}` ({results.get('shape')})",
        "",
        f"Run `{results.get('run')}`, step {results.get('step')}, "
        f"{results.get('tokens')} training tokens, training length {results.get('train_len')}.",
    ]
    if "loss" in parts:
        lo = parts["loss"]
        out += ["", "## Validation loss", "",
                f"loss {lo['loss']:.4f}, perplexity {lo['perplexity']:.3f} "
                f"({lo['tokens']:,} tokens of {lo['data']}, length {lo['seq_len']})."]  # fmt: skip
    if "mad" in parts:
        m = parts["mad"]
        out += ["", "## MAD (fresh copies at the proxy shape)", "", f"score {m['score']:.4f}", "",
                "| task | accuracy |", "|---|---|"]  # fmt: skip
        out += [f"| {k} | {v['accuracy']:.3f} |" for k, v in m["tasks"].items()]
    if "mqar" in parts:
        out += ["", "## MQAR accuracy against length (fresh copy per length)", "",
                mqar_markdown(parts["mqar"]), "", "![mqar](mqar.png)"]  # fmt: skip
    if "niah" in parts:
        out += ["", "## Needle in a haystack (exact 7 digits, greedy)", "",
                niah_markdown(parts["niah"]), "", "![niah](niah.png)"]  # fmt: skip
    if "efficiency" in parts:
        out += ["", "## Efficiency", "", efficiency_markdown(parts["efficiency"]), "",
                "![efficiency](efficiency.png)"]  # fmt: skip
    if "lm-eval" in parts:
        out += ["", "## lm-evaluation-harness", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in parts["lm-eval"]["tasks"].items():
            out += [f"| {task} | {k} | {v:.4f} |" for k, v in metrics.items()]
        if parts["lm-eval"].get("limit"):
            out += ["", f"(limit {parts['lm-eval']['limit']} documents per task)"]
    return "\n".join(out) + "\n"
