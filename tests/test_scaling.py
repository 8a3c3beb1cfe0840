"""IsoFLOP sweeps: the fits against hand-worked answers, the ladder's FLOPs arithmetic,
resume (a finished sweep trains nothing; a killed run continues), and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from hcomposer.accounting import count_costs
from hcomposer.cli import main
from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import read_json
from hcomposer.model import build_model
from hcomposer.scaling import (
    Ladder,
    SweepConfig,
    fit_budget,
    fit_frontier,
    fit_parabola,
    fit_power_law,
    pattern_block,
    plan_sweep,
    run_sweep,
    shape_for,
)
from hcomposer.training.trainer import TrainConfig, train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "austen.txt"
    path.write_text(embedded_corpus_text()[:60_000], encoding="utf-8")
    return path


def _tiny(text_file, **kw) -> SweepConfig:
    base = dict(
        patterns=("AF",),
        budgets=(1e8, 2e8),
        sizes=(8, 16, 24),
        ladder=Ladder(head_dim=8, aspect=8, min_blocks=1, kv_group=1, ffn_multiple=8),
        train=TrainConfig(
            tokens=128,
            batch_size=4,
            seq_len=32,
            lr=3e-3,
            min_lr=3e-4,
            dtype="fp32",
            eval_every=0,
            eval_tokens=256,
            log_every=5,
            checkpoint_every=4,
            data=str(text_file),
        ),
        bootstrap=20,
    )
    base.update(kw)
    return SweepConfig(**base)


def test_parabola_vertex_of_a_known_parabola():
    # loss = 0.3 (x - 11.2)^2 + 3.1 at x = ln N around 11: vertex N* = e^11.2, loss 3.1.
    x = np.log([2e4, 4e4, 8e4, 1.6e5, 3.2e5])
    p = fit_parabola(x, 0.3 * (x - 11.2) ** 2 + 3.1)
    assert p.has_minimum
    assert p.vertex_x == pytest.approx(11.2, abs=1e-9)
    assert p.vertex_y == pytest.approx(3.1, abs=1e-9)
    assert p.a == pytest.approx(0.3) and p.b == pytest.approx(-2 * 0.3 * 11.2)
    # The budget fit reads N* and, from ln D linear in ln N, D* = C / (6 N*).
    n = np.exp(x)
    fit = fit_budget(1e12, n, 1e12 / (6 * n), 0.3 * (x - 11.2) ** 2 + 3.1)
    assert fit.ok and fit.inside
    assert fit.n_opt == pytest.approx(math.exp(11.2), rel=1e-9)
    assert fit.d_opt == pytest.approx(1e12 / (6 * math.exp(11.2)), rel=1e-9)
    # A concave set (no minimum) and too few sizes are reported, not fitted.
    assert not fit_budget(1e12, n, n, -((x - 11.2) ** 2)).ok
    assert not fit_budget(1e12, n[:2], n[:2], [1.0, 2.0]).ok
    # A vertex beyond the sizes trained is flagged as extrapolated.
    assert not fit_budget(1e12, n, n, 0.3 * (x - 14) ** 2).inside


def test_power_law_exponent_and_interval():
    c = np.geomspace(1e18, 1e21, 6)
    exact = fit_power_law(np.log(c), 0.49 * np.log(c) - 3.0)
    assert exact.slope == pytest.approx(0.49) and exact.intercept == pytest.approx(-3.0)
    assert exact.stderr == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(1)
    noisy = fit_power_law(np.log(c), 0.49 * np.log(c) - 3.0 + rng.normal(0, 0.05, 6))
    assert noisy.ols_low < 0.49 < noisy.ols_high
    assert noisy.ols_high - noisy.ols_low > 0
    # By hand: y = 2x + 1 + (+1, -1, -1, +1) at x = 0..3 -> slope 2, SSR 4, Sxx 5.
    hand = fit_power_law([0, 1, 2, 3], [2, 2, 4, 8])
    assert hand.slope == pytest.approx(2.0)
    assert hand.stderr == pytest.approx(math.sqrt(4 / 2 / 5))
    # Two points: a slope but no interval.
    two = fit_power_law([0, 1], [0, 1])
    assert two.slope == 1 and math.isinf(two.ols_high)


def _runs(exponent: float, noise: float, seed: int = 0) -> list[dict]:
    """IsoFLOP runs whose optimum is exactly N* = 0.1 C^exponent, loss 40 C^-0.05."""
    rng = np.random.default_rng(seed)
    out = []
    for c in (1e15, 1e16, 1e17, 1e18):
        x_opt = math.log(0.1) + exponent * math.log(c)
        for dx in (-1.2, -0.6, 0.0, 0.6, 1.2):
            n = math.exp(x_opt + dx)
            loss = 40 * c**-0.05 + 0.25 * dx**2 + rng.normal(0, noise)
            out.append({"budget": c, "params": n, "tokens": c / (6 * n), "loss": loss})
    return out


def test_frontier_recovers_a_known_exponent():
    exact = fit_frontier(_runs(0.5, 0.0), bootstrap=50)
    assert exact.n_exponent.slope == pytest.approx(0.5, abs=1e-9)
    assert exact.d_exponent.slope == pytest.approx(0.5, abs=1e-9)  # D = C / 6N
    assert exact.loss_exponent.slope == pytest.approx(-0.05, abs=1e-9)
    # L* = 40 C^-0.05: its slope per decade at these budgets, by hand, from the end points.
    ends = [40 * c**-0.05 for c in (1e15, 1e18)]
    assert exact.loss_slope.slope == pytest.approx((ends[1] - ends[0]) / 3, rel=0.02)
    noisy = fit_frontier(_runs(0.5, 0.01, seed=3), bootstrap=400)
    n = noisy.n_exponent
    assert abs(n.slope - 0.5) < 0.05
    assert n.boot_low < 0.5 < n.boot_high and n.ols_low < 0.5 < n.ols_high
    assert n.boot_draws + noisy.boot_failed == 400
    # A budget whose vertex lies outside its sizes stays out of the frontier.
    shifted = [
        dict(r, loss=r["loss"] + (math.log(r["params"]) if r["budget"] == 1e18 else 0))
        for r in _runs(0.5, 0.0)
    ]
    three = fit_frontier(shifted, bootstrap=0)
    assert [b.inside for b in three.budgets] == [True, True, True, False]
    assert three.n_exponent.n == 3 and three.n_exponent.slope == pytest.approx(0.5, abs=1e-9)
    # A single budget cannot give a frontier.
    one = fit_frontier([r for r in _runs(0.5, 0.0) if r["budget"] == 1e15], bootstrap=10)
    assert one.n_exponent is None and "at least two" in one.note


def test_ladder_rule_and_flops_arithmetic(text_file):
    lad = Ladder(head_dim=16, aspect=32, min_blocks=2, kv_group=4, ffn_multiple=16)
    s = shape_for(128, lad, 320, 128)
    assert (s.n_heads, s.n_kv_heads, s.head_dim, s.n_layers) == (8, 2, 16, 8)
    assert s.ffn_dim == 336  # 8/3 * 128 = 341.3 -> nearest multiple of 16
    # The largest group <= kv_group dividing the heads: 3 heads -> one group of 3; 5 -> none.
    assert shape_for(48, lad, 320, 128).n_kv_heads == 1
    assert shape_for(80, lad, 320, 128).n_kv_heads == 5
    assert pattern_block("(AF)*n") == pattern_block("AF*n") == "AF"
    assert pattern_block("(A F F)*n") == "AFF"
    cfg = _tiny(text_file, patterns=("(AF)*n", "AAFFFF"), sizes=(8, 16, 32))
    runs = plan_sweep(cfg)
    assert len(runs) == 2 * 2 * 3
    tps = cfg.train.tokens_per_step
    for r in runs:
        costs = count_costs(r.arch, cfg.train.seq_len)
        # Training FLOPs per token = 3 x forward (forward + backward), attention included.
        assert r.flops_per_token == 3 * costs.flops_per_token
        assert r.flops_per_token > 6 * r.params  # attention adds to 6N
        assert r.tokens == r.steps * tps
        # Whole optimiser steps: the budget is met to within half a step.
        assert abs(r.flops - r.budget) <= 0.5 * r.flops_per_token * tps + 1e-6
        # The model counted is the model trained.
        assert sum(p.numel() for p in build_model(r.arch).parameters()) == r.params
    # The composite has the baseline's depth at every width (stacked to 2 x blocks).
    depth = {(r.block, r.d_model): r.arch.n_sublayers for r in runs}
    assert all(
        depth["AF", d] == depth["AAFFFF", d] == 2 * cfg.ladder.blocks(d) for d in (8, 16, 32)
    )
    # Below the head dimension: one head as wide as the model.
    tiny = shape_for(4, lad, 320, 128)
    assert (tiny.n_heads, tiny.head_dim, tiny.n_kv_heads, tiny.ffn_dim) == (1, 4, 1, 16)
    for bad in (20, 3, 0):
        with pytest.raises(UserError, match="multiple of the head dimension"):
            shape_for(bad, lad, 320, 128)


def test_sweep_resumes_and_skips_finished_runs(text_file, tmp_path):
    cfg = _tiny(text_file)
    out = tmp_path / "sweep"
    seen: list[tuple[str, str]] = []
    first = run_sweep(cfg, out, progress=False, on_run=lambda r, what: seen.append((r.key, what)))
    assert [w for _, w in seen] == ["trained"] * 6
    assert first["trained_this_call"] == 6
    assert (out / "isoflop.png").stat().st_size > 0 and (out / "frontier.png").is_file()
    assert all(r["status"] == "completed" and r["loss"] is not None for r in first["runs"])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    seen.clear()
    second = run_sweep(cfg, out, progress=False, on_run=lambda r, what: seen.append((r.key, what)))
    assert [w for _, w in seen] == ["skipped"] * 6 and second["trained_this_call"] == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert second["patterns"] == first["patterns"]

    # A run killed mid-training resumes from its checkpoint; a folder killed during set-up
    # (no run.json) is started again; the rest are skipped.
    plan = plan_sweep(cfg)
    killed = max(plan, key=lambda r: r.steps)
    setup = next(r for r in plan if r is not killed)
    for r in (killed, setup):
        shutil.rmtree(out / r.key)
    train(
        killed.arch,
        cfg.train.replace(tokens=killed.tokens),
        out / killed.key,
        stop_at=killed.steps // 2,
        progress=False,
    )
    assert read_json(out / killed.key / "status.json")["status"] == "running"
    (out / setup.key).mkdir()
    (out / setup.key / "architecture.json").write_text("{}")
    seen.clear()
    third = run_sweep(cfg, out, progress=False, on_run=lambda r, what: seen.append((r.key, what)))
    what = dict(seen)
    assert what[killed.key] == "resumed" and what[setup.key] == "trained"
    assert sum(w == "skipped" for w in what.values()) == 4
    assert third["trained_this_call"] == 2
    # Exact resume: the killed run ends where the uninterrupted one ended.
    before = {r["key"]: r["loss"] for r in first["runs"]}
    after = {r["key"]: r["loss"] for r in third["runs"]}
    assert after[killed.key] == pytest.approx(before[killed.key], abs=1e-5)


def _cli(*args) -> int:
    return main(["scaling", *args])


def test_bad_input_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "s"
    bad = [
        ["AF", "--flops", "1e11"],  # one budget: no frontier
        ["AF", "--flops", "1e11,abc"],
        ["AF", "--flops", "1e11,-3e11"],
        ["AF", "--flops", "1e11,3e11", "--sizes", "16,24"],  # two sizes: no parabola
        ["AF", "--flops", "1e11,3e11", "--sizes", "16,20,24"],  # 20: not a multiple of 8
        ["AF", "--flops", "1e11,3e11", "--tokens-per-param", "5"],
        ["AF", "--flops", "1e11,3e11", "--tokens-per-param", "1000,2000"],  # < 3 sizes kept
        ["AXF", "--flops", "1e11,3e11"],  # unknown primitive
        ["AF", "--recipe", "gpu"],  # gpu needs --data
        ["AF", "AF", "--flops", "1e11,3e11"],
    ]
    for args in bad:
        assert _cli(*args, "--out", str(out)) == 2, args
        assert not out.exists(), args
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # A folder holding something else is refused and left as it was.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _cli("AF", "--flops", "1e11,3e11", "--out", str(other)) == 2
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_changed_settings_refused_and_dry_run_json(text_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    cfg = _tiny(text_file)
    (out / "sweep.json").write_text(json.dumps({"config": cfg.to_dict()}))
    with pytest.raises(UserError, match="other train settings"):
        run_sweep(cfg.replace(train=cfg.train.replace(lr=1e-2)), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg
    args = ["(AF)*n", "AAFFFF", "--dry-run", "--json", "--flops", "1e11,3e11", "--out", str(out)]
    assert _cli(*args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {r["pattern"] for r in plan["runs"]} == {"AF", "AAFFFF"}
    assert all(abs(r["flops"] / r["budget"] - 1) < 0.01 for r in plan["runs"])
