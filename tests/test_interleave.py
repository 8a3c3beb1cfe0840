"""Interleaved timing on a fake clock: order, medians and spreads, paired ratios."""

from __future__ import annotations

import pytest
import torch

from hcomposer import build_model
from hcomposer.errors import UserError
from hcomposer.evaluation import efficiency, efficiency_compare
from hcomposer.evaluation.efficiency import EfficiencyConfig
from hcomposer.evaluation.efficiency_compare import compare_efficiency
from hcomposer.evaluation.interleave import measure_interleaved, round_order, spread
from hcomposer.primitives import cpu_kernels


class FakeClock:
    """A clock that only moves when a measured function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fns(clock, calls, cost, load):
    """fns whose duration is cost[name] x load[round] (warm-up rounds included), logging calls."""

    def make(name):
        def fn():
            rnd = len(calls) // len(cost)
            calls.append(name)
            clock.now += cost[name] * load[rnd]

        return fn

    return {name: make(name) for name in cost}


def test_rounds_alternate_direction_and_warmup_is_untimed():
    clock, calls = FakeClock(), []
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}
    load = [1.0] * 10
    res = measure_interleaved(_fns(clock, calls, cost, load), repeats=3, warmup=1, timer=clock)
    # The warm-up round, then the timed rounds, alternating from the given order.
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert res.order == list("abc") + list("cba") + list("abc")
    assert round_order(["x", "y"], 0) == ["x", "y"] and round_order(["x", "y"], 1) == ["y", "x"]
    assert res.times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}


def test_paired_ratios_cancel_load_that_unpaired_medians_keep():
    clock, calls = FakeClock(), []
    cost = {"base": 2.0, "hybrid": 1.0}
    # One warm-up round, then five rounds under very different load.
    load = [1.0, 1.0, 10.0, 1.0, 3.0, 7.0]
    res = measure_interleaved(_fns(clock, calls, cost, load), repeats=5, warmup=1, timer=clock)
    assert res.times["base"] == [2.0, 20.0, 2.0, 6.0, 14.0]
    assert res.paired_ratios("base", "hybrid") == [2.0] * 5
    r = res.ratio("base", "hybrid")
    assert (r.median, r.min, r.max) == (2.0, 2.0, 2.0)
    # A ratio of separate measurements would have seen the load: 20/1 in the worst pairing.
    assert max(res.times["base"]) / min(res.times["hybrid"]) == 20.0


def test_spread_arithmetic():
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    s = spread([1.0, 2.0, 3.0, 10.0])
    assert s.median == 2.5 and s.q1 == 1.75 and s.q3 == 4.75
    one = spread([7.0])
    assert one.median == one.q1 == one.q3 == one.min == one.max == 7.0
    inv = spread([1.0, 2.0, 4.0]).map(lambda t: 8 / t)
    assert (inv.median, inv.min, inv.max) == (4.0, 2.0, 8.0)
    assert (inv.q1, inv.q3) == pytest.approx((8 / 3, 8 / 1.5))
    with pytest.raises(ValueError):
        spread([])
    with pytest.raises(ValueError):
        measure_interleaved({"a": lambda: None}, repeats=0)


def test_compare_efficiency_on_a_fake_clock(monkeypatch):
    # Every timed call lasts exactly 0.5 fake seconds, whatever the model.
    ticks = iter(range(10**6))
    monkeypatch.setattr(
        efficiency_compare, "_clock", lambda device: (lambda: 0.25 * next(ticks), None)
    )
    models = {
        "base": build_model("AF", shape="tiny", seed=0),
        "hyb": build_model("SF", shape="tiny", seed=0),
    }
    cfg = EfficiencyConfig(min_len=16, max_len=32, repeats=3, decode_steps=2, train_batch=1,
                           train_optimizer="none", device="cpu")  # fmt: skip
    res = compare_efficiency(models, train_len=16, config=cfg)
    assert res["reference"] == "base" and list(res["ratios"]) == ["hyb"]
    assert set(res["ratios"]["hyb"]) == {"train", "prefill@16", "decode@16", "prefill@32",
                                         "decode@32"}  # fmt: skip
    for metric, r in res["ratios"]["hyb"].items():
        assert r["median"] == r["min"] == r["max"] == 1.0 and r["n"] == 3, metric
    inf = res["models"]["hyb"]["inference"]
    assert [p["context"] for p in inf] == [16, 32]
    assert inf[1]["prefill_tokens_per_s"] == 32 / 0.25
    assert inf[1]["decode_tokens_per_s"] == 2 / 0.25
    assert res["models"]["base"]["train"]["tokens_per_s"] == 16 / 0.25
    assert res["models"]["base"]["kv_bytes_per_token"] > 0
    assert res["models"]["hyb"]["kv_bytes_per_token"] == 0


def test_compare_efficiency_ratios_are_paired_per_round(monkeypatch):
    # The hybrid's calls last half the baseline's in every round, under load growing 10x.
    seen = []
    real = efficiency_compare.measure_interleaved

    def spy(fns, **kw):
        res = real(fns, **kw)
        seen.append(res)
        for r in range(len(res.times["base"])):
            load = 1.0 + 3.0 * r
            res.times["base"][r] = 2.0 * load
            res.times["hyb"][r] = 1.0 * load
        return res

    monkeypatch.setattr(efficiency_compare, "measure_interleaved", spy)
    models = {"base": build_model("AF", shape="tiny"), "hyb": build_model("AF", shape="tiny")}
    cfg = EfficiencyConfig(min_len=16, max_len=16, repeats=4, decode_steps=1, train_batch=1,
                           train_optimizer="none", device="cpu")  # fmt: skip
    res = compare_efficiency(models, train_len=16, config=cfg)
    assert len(seen) == 3  # training, prefill, decode
    for r in res["ratios"]["hyb"].values():
        assert r["median"] == r["min"] == r["max"] == 2.0
    assert torch.isfinite(torch.tensor(res["models"]["hyb"]["inference"][0]["decode_tokens_per_s"]))


def test_suite_contexts_and_decode_roofline():
    model = build_model("AFSF", shape="tiny", seed=0)
    cfg = EfficiencyConfig(contexts=[48, 16], repeats=1, decode_steps=2, train_batch=1,
                           train_optimizer="none", device="cpu", bandwidth_probe_mib=8)  # fmt: skip
    res = efficiency.run_efficiency(model, train_len=16, config=cfg)
    assert [p["context"] for p in res["inference"]] == [16, 48]
    weights = sum(p.numel() * 4 for p in model.parameters())  # the tied head counted once
    assert model.lm_head.weight is model.embed.weight
    for p in res["inference"]:
        assert p["decode_bytes_per_step"] == weights + p["kv_bytes"] + p["state_bytes"]
        roof = p["read_bandwidth_Bps"] / p["decode_bytes_per_step"]
        assert p["decode_roofline_tokens_per_s"] == pytest.approx(roof)
        assert p["decode_roofline_fraction"] == pytest.approx(p["decode_tokens_per_s"] / roof)
    assert "of" in efficiency.efficiency_markdown(res)
    # The report says whether the fused CPU decode kernels are built (cpu_kernels.status()).
    assert res["decode_kernels"] == cpu_kernels.status()
    md = efficiency.efficiency_markdown(res)
    assert f"CPU decode kernels (bf16 models): {cpu_kernels.status()}." in md
    with pytest.raises(UserError):
        EfficiencyConfig(contexts=[1])
