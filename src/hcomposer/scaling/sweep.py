"""IsoFLOP sweeps: plan, train (resumably), fit, and write the results.

A sweep folder holds ``sweep.json`` (the settings every run shares, with version, git
revision and command), one trainer run folder per (pattern, budget, size) under ``runs/``
(see ``hcomposer.scaling.ladder.run_key``), and, after the fits, ``results.json``,
``isoflop.png`` and ``frontier.png``. A run whose ``summary.json`` says ``completed`` is
skipped; a run with a checkpoint resumes from it (the trainer's exact resume); a folder left
without ``run.json`` by a kill during set-up is started again. Running the same command again
therefore continues a killed sweep, and re-fits a finished one without training. Budgets,
sizes and patterns may be added to a sweep later; the shared settings may not change.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcomposer.data import get_tokenizer
from hcomposer.errors import UserError
from hcomposer.format import progress_bar
from hcomposer.io import atomic_write_json, read_json, run_metadata
from hcomposer.runs import RunDir, SweepDir, tracking_dir
from hcomposer.scaling.fits import fit_frontier
from hcomposer.scaling.ladder import Ladder, PlannedRun, pattern_block, plan_runs
from hcomposer.scaling.plots import plot_frontier, plot_isoflop
from hcomposer.tracking import finite, open_tracking
from hcomposer.training.trainer import TrainConfig, train, vocab_for

__all__ = ["SweepConfig", "RECIPES", "get_recipe", "plan_sweep", "run_sweep", "collect"]

# Settings that must match for runs to share one sweep folder.
_SHARED = ("ladder", "train")


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """An IsoFLOP sweep. ``train.tokens`` is ignored: each run's tokens come from its budget."""

    patterns: tuple[str, ...]
    budgets: tuple[float, ...]
    sizes: tuple[int, ...]
    tokens_per_param: tuple[float, float] | None = None
    ladder: Ladder = dataclasses.field(default_factory=Ladder)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", tuple(pattern_block(p) for p in self.patterns))
        object.__setattr__(self, "budgets", tuple(sorted({float(b) for b in self.budgets})))
        object.__setattr__(self, "sizes", tuple(sorted(set(self.sizes))))
        if not self.patterns:
            raise UserError("give at least one pattern")
        if len(set(self.patterns)) != len(self.patterns):
            raise UserError(f"a pattern is given twice: {list(self.patterns)}")
        if len(self.budgets) < 2 or any(not b > 0 for b in self.budgets):
            raise UserError("--flops needs at least two positive budgets (a frontier has a slope)")
        if len(self.sizes) < 3:
            raise UserError("--sizes needs at least three widths (a parabola per budget)")
        if self.tokens_per_param is not None:
            lo, hi = (float(v) for v in self.tokens_per_param)
            if not 0 < lo < hi:
                raise UserError("--tokens-per-param LO,HI needs 0 < LO < HI")
            object.__setattr__(self, "tokens_per_param", (lo, hi))
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise UserError("--bootstrap must be a whole number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "patterns": list(self.patterns),
            "budgets": list(self.budgets),
            "sizes": list(self.sizes),
            "tokens_per_param": None
            if self.tokens_per_param is None
            else list(self.tokens_per_param),
            "ladder": self.ladder.to_dict(),
            "train": self.train.to_dict(),
            "bootstrap": self.bootstrap,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        tpp = d.get("tokens_per_param")
        return cls(
            patterns=tuple(d["patterns"]),
            budgets=tuple(d["budgets"]),
            sizes=tuple(d["sizes"]),
            tokens_per_param=None if tpp is None else tuple(tpp),
            ladder=Ladder(**d["ladder"]),
            train=TrainConfig.from_dict(d["train"]),
            bootstrap=d.get("bootstrap", 1000),
        )

    def replace(self, **changes: Any) -> SweepConfig:
        return dataclasses.replace(self, **changes)


def cpu() -> SweepConfig:
    """Two patterns in about an hour on 2 idle CPU cores (one pattern per core, fp32, the
    embedded corpus); run in full, with its frontier, in benchmarks/RESULTS.md (row isoflop).

    Widths 8-128 (head dim 8, at least 3 blocks so that AAFFFF is itself up to width 80; about
    4.5K-900K parameters with the byte vocabulary), five budgets 1e11-1e12 (a decade, about a
    factor 1.6 apart), and at each budget the widths trained on 2-700 tokens per parameter
    (five to eight sizes; the optimum of these tiny byte-level models lies near 25-35 tokens
    per parameter). About 2e12 training FLOPs, 52M tokens, per pattern. Steps of 8 x 64 tokens
    at lr 1e-2: with 16 x 128-token steps at lr 2e-3 every model but the smallest was still on
    the unigram plateau (~3.05 nats) at small budgets, so the step count, not the size, decided.
    (Budgets up to 3e12, as first planned, take about 2.5 hours on 2 cores.)
    """
    return SweepConfig(
        patterns=("AF", "AAFFFF"),
        budgets=(1e11, 2e11, 3e11, 5e11, 1e12),
        sizes=(8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128),
        tokens_per_param=(2.0, 700.0),
        ladder=Ladder(head_dim=8, aspect=32, min_blocks=3, kv_group=2, ffn_multiple=16),
        train=TrainConfig(
            tokens=512,
            batch_size=8,
            seq_len=64,
            lr=1e-2,
            min_lr=1e-3,
            warmup=0.05,
            dtype="fp32",
            eval_every=0,
            eval_tokens=65536,
            log_every=25,
            checkpoint_every=200,
        ),
    )


def gpu() -> SweepConfig:
    """Sized like Composer's sweep (their models span 350M-8B; not run here).

    Five budgets 1e18-1e20 FLOPs and widths 512-2048 (head dim 64, GQA 4:1, one block per
    64 of width: 8-32 blocks, about 40M-1.7B parameters with a 32K vocabulary), each budget
    keeping the widths at 5-100 tokens per parameter. 2048-token sequences, 256 per step
    (0.5M tokens), bf16. Needs a real corpus and tokenizer: pass ``--data`` and
    ``--tokenizer`` (the embedded corpus is 4 MB).
    """
    return SweepConfig(
        patterns=("AF", "AAFFFF"),
        budgets=(1e18, 3e18, 1e19, 3e19, 1e20),
        sizes=tuple(range(512, 2049, 128)),
        tokens_per_param=(5.0, 100.0),
        ladder=Ladder(head_dim=64, aspect=64, min_blocks=4, kv_group=4, ffn_multiple=256),
        train=TrainConfig(
            tokens=524288,
            batch_size=256,
            seq_len=2048,
            lr=2e-3,
            min_lr=2e-4,
            warmup=0.02,
            dtype="bf16",
            eval_every=0,
            eval_tokens=4_194_304,
            log_every=50,
            checkpoint_every=500,
            tokenizer="bpe:32768",
        ),
    )


RECIPES: dict[str, Callable[[], SweepConfig]] = {"cpu": cpu, "gpu": gpu}


def get_recipe(name: str) -> SweepConfig:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()


def plan_sweep(config: SweepConfig) -> list[PlannedRun]:
    """Every run of ``config`` (UserError on a plan that cannot be fitted)."""
    tokenizer = get_tokenizer(config.train.tokenizer, source=config.train.data)
    return plan_runs(
        config.patterns,
        config.budgets,
        config.sizes,
        config.ladder,
        vocab_size=vocab_for(tokenizer),
        seq_len=config.train.seq_len,
        tokens_per_step=config.train.tokens_per_step,
        tokens_per_param=config.tokens_per_param,
    )


def _check_folder(out: Path, config: SweepConfig) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; choose a folder")
    if not any(p for p in out.iterdir() if not p.name.startswith(".")):
        return
    if not SweepDir(out).config.is_file():
        raise UserError(
            f"--out {str(out)!r} is not empty and holds no sweep; choose a new or empty folder"
        )
    try:
        stored = read_json(SweepDir(out).config)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{str(out / 'sweep.json')!r} cannot be read ({e})") from None
    mine = config.to_dict()
    differ = [k for k in _SHARED if stored.get(k) != mine[k]]
    if differ:
        raise UserError(
            f"the sweep in {str(out)!r} was started with other {' and '.join(differ)} settings; "
            "repeat them (same --recipe and options) or choose another --out"
        )


def _status(folder: Path) -> str:
    run = RunDir(folder)
    if run.summary_json.is_file():
        try:
            return read_json(run.summary_json).get("status", "unknown")
        except (OSError, ValueError):
            return "unknown"
    return "started" if run.run_json.is_file() else "new"


def collect(out: Path, runs: Sequence[PlannedRun]) -> list[dict]:
    """Each planned run's description with its status and final validation loss."""
    rows = []
    for r in runs:
        row = r.describe()
        folder = out / r.key
        row["status"] = _status(folder)
        summary_json = RunDir(folder).summary_json
        summary = (
            read_json(summary_json) if row["status"] != "new" and summary_json.is_file() else {}
        )
        row["loss"] = summary.get("val_loss")
        row["train_loss"] = summary.get("loss")
        row["wall_seconds"] = summary.get("wall_seconds")
        rows.append(row)
    return rows


def run_sweep(
    config: SweepConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    argv: list[str] | None = None,
    on_run: Callable[[PlannedRun, str], None] | None = None,
    fit_only: bool = False,
    report_to: Sequence[str] = (),
) -> dict[str, Any]:
    """Train every run not yet finished, fit, plot; return the results (also results.json).

    ``on_run(run, what)`` is told ``"skipped"``, ``"resumed"``, ``"trained"`` or (with
    ``fit_only``, which trains nothing and fits the finished runs) ``"missing"`` per run.
    ``report_to``: experiment trackers for each training run and for the sweep's own run
    (:func:`_track`).
    """

    out = Path(out_dir)
    # Every check that can fail on bad input runs before anything is written.
    runs = plan_sweep(config)
    _check_folder(out, config)
    if fit_only and not SweepDir(out).config.is_file():
        raise UserError(f"--fit-only: {str(out)!r} holds no sweep to fit")
    out.mkdir(parents=True, exist_ok=True)
    if not fit_only:
        atomic_write_json(SweepDir(out).config, {"config": config.to_dict(), **run_metadata(argv)})
    todo = [] if fit_only else [r for r in runs if _status(out / r.key) != "completed"]
    t0 = time.perf_counter()
    with progress_bar(progress, field="info") as bar:
        task = bar.add_task("isoflop", total=len(runs), completed=len(runs) - len(todo), info="")
        for r in runs:
            folder = out / r.key
            status = _status(folder)
            if status == "completed" or fit_only:
                if on_run:
                    on_run(r, "skipped" if status == "completed" else "missing")
                continue
            bar.update(task, info=f"{r.block} C={r.budget:.3g} d={r.d_model} {r.tokens:,} tok")
            if status == "new" and folder.exists():
                # Killed before the trainer wrote run.json: nothing in it can be resumed.
                shutil.rmtree(folder)
            resume = status != "new"
            train(
                r.arch,
                config.train.replace(tokens=r.tokens),
                folder,
                resume=resume,
                progress=False,
                argv=argv,
                report_to=report_to,
            )
            if on_run:
                on_run(r, "resumed" if resume else "trained")
            bar.advance(task)
    rows = collect(out, runs)
    results = fit_results(config, rows)
    results["wall_seconds_this_call"] = time.perf_counter() - t0
    results["trained_this_call"] = len(todo)
    atomic_write_json(SweepDir(out).results, results)
    plot_isoflop(results, SweepDir(out).isoflop_png)
    plot_frontier(results, SweepDir(out).frontier_png)
    _track(report_to, out, config, rows, results)
    return results


def _track(report_to, out: Path, config: SweepConfig, rows: list[dict], results: dict) -> None:
    """The sweep's own tracked run: the settings, each finished run's final losses (one step
    per run, in plan order), the frontier's exponents and the two plots. A fit over the same
    finished runs as the last one logged is not logged again; a fit over more is logged whole
    (TensorBoard hides the earlier one's events; the other trackers take the steps after the
    last they hold)."""
    done = [r for r in rows if r["status"] == "completed"]
    with open_tracking(report_to, tracking_dir(out), run_name=out.resolve().name,
                       params={"sweep": config.to_dict()}, resume_step=0) as tracking:  # fmt: skip
        if not tracking or tracking.state.get("fitted_runs") == len(done):
            return
        for i, r in enumerate(done, 1):
            keys = ("budget", "d_model", "params", "tokens", "loss", "train_loss")
            tracking.log_metrics({f"isoflop/{k}": r[k] for k in keys if finite(r.get(k))}, i)
        fit = {f"frontier/{block}/{name}": (res.get(name) or {}).get("slope")
               for block, res in results["patterns"].items()
               for name in ("n_exponent", "d_exponent", "loss_slope")}  # fmt: skip
        tracking.log_metrics(fit, len(done))
        images = {
            "isoflop/isoflop": SweepDir(out).isoflop_png,
            "isoflop/frontier": SweepDir(out).frontier_png,
        }
        tracking.log_images(images, len(done))
        tracking.state["fitted_runs"] = len(done)
        tracking.save()


def fit_results(config: SweepConfig, rows: list[dict]) -> dict[str, Any]:
    """Per pattern: the budget parabolas and the frontier; plus every run."""
    patterns = {}
    for block in config.patterns:
        mine = [r for r in rows if r["pattern"] == block and r["budget"] in config.budgets]
        done = [
            {"budget": r["budget"], "params": r["params"], "tokens": r["tokens"], "loss": r["loss"]}
            for r in mine
            if r["status"] == "completed" and r["loss"] is not None
        ]
        front = fit_frontier(done, bootstrap=config.bootstrap, seed=config.train.seed)
        patterns[block] = {
            "runs_completed": len(done),
            "runs_failed": sum(r["status"] == "diverged" for r in mine),
            **front.to_dict(),
        }
    return {
        "config": config.to_dict(),
        "loss": "final validation loss, nats per token",
        "interval": "95%: ols = Student-t on the frontier regression; boot = percentile "
        "bootstrap over runs resampled within each budget",
        "patterns": patterns,
        "runs": rows,
    }
