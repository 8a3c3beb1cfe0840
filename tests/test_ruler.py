"""The scale ruler (hcomposer.proxies.ruler): flags, the text and pattern splits, the rate
rule, seeds, resume, and the committed study split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcomposer.errors import UserError
from hcomposer.io import read_jsonl
from hcomposer.proxies.ruler import (
    RULER_SHAPE,
    Ruler,
    RulerConfig,
    family,
    flag_run,
    prepare_text,
    ruler_losses,
    run_ruler,
    split_patterns,
)
from hcomposer.proxies.ruler_study import add_seed, byte_check, run_byte_check, wide_spread
from hcomposer.runs import RulerDir, RunDir
from load_script import script

ROOT = Path(__file__).resolve().parents[1]


def _m(step, loss):
    return {"step": step, "loss": loss}


def test_flag_run_known_answers():
    ok = [_m(5, 6.0), _m(10, 5.5), _m(15, 5.0), _m(20, 5.1)]
    assert flag_run(ok, "completed", 4.9, 6.3, warmup=2, spike_nats=0.5) is None
    spike = [_m(5, 6.0), _m(10, 5.0), _m(15, 5.7), _m(20, 5.0)]
    assert flag_run(spike, "completed", 4.9, 6.3, warmup=2, spike_nats=0.5) == "spiked"
    # A jump during warmup (step <= 2 x warmup) is not a spike.
    early = [_m(2, 6.0), _m(3, 5.0), _m(4, 5.9), _m(20, 5.0)]
    assert flag_run(early, "completed", 4.9, 6.3, warmup=2, spike_nats=0.5) is None
    assert flag_run(ok, "diverged", None, 6.3, warmup=2, spike_nats=0.5) == "diverged"
    assert flag_run([_m(5, math.nan)], "completed", 4.0, 6.3, warmup=2, spike_nats=0.5) == (
        "diverged"
    )
    assert flag_run(ok, "completed", 6.4, 6.3, warmup=2, spike_nats=0.5) == "above-unigram"


def test_split_patterns_is_seeded_stratified_and_disjoint():
    pats = ["AF", "FA", "AAF", "FFA", "WF", "EF", "SF", "DF", "SSF", "[A|S]F"]
    a = split_patterns(pats, heldout_afwe=3, heldout_sd=2, seed=1)
    assert a == split_patterns(pats, heldout_afwe=3, heldout_sd=2, seed=1)
    assert sorted(a["dev"] + a["heldout"]) == sorted(pats)
    assert not set(a["dev"]) & set(a["heldout"])
    assert sum(family(p) == "afwe" for p in a["heldout"]) == 3
    assert sum(family(p) == "sd" for p in a["heldout"]) == 2
    assert family("[A|W]F") == "afwe" and family("[A|D]F") == "sd"
    with pytest.raises(UserError, match="cannot hold out"):
        split_patterns(pats, heldout_afwe=7, heldout_sd=0)


def test_prepare_text_splits_chapters_disjointly(tmp_path):
    info = prepare_text(tmp_path)
    chapters = {
        s: [
            json.loads(line)["text"]
            for line in Path(info[s]["path"]).read_text("utf-8").splitlines()
        ]
        for s in ("train", "val", "test")
    }
    assert all(chapters[s] for s in chapters)
    assert not set(chapters["train"]) & set(chapters["val"])
    assert not set(chapters["train"]) & set(chapters["test"])
    assert not set(chapters["val"]) & set(chapters["test"])
    total = sum(info[s]["bytes"] for s in info)
    assert 0.8 < info["train"]["bytes"] / total < 0.97
    again = prepare_text(tmp_path)  # the same text: the same files, nothing rewritten
    assert {s: again[s]["sha256"] for s in again} == {s: info[s]["sha256"] for s in info}


def test_committed_study_split_is_reproducible_and_big_enough():
    mod = script("benchmarks/ruler_v3.py")
    committed = json.loads((ROOT / "benchmarks/results/ruler_v3/split.json").read_text())
    assert committed == mod.make_split()
    held = committed["heldout"]
    assert len(set(held) | set(committed["dev"])) >= 40
    assert len(held) >= 20 and sum(family(p) == "afwe" for p in held) >= 12
    letters = set("".join(held + committed["dev"]))
    assert {"W", "E", "D", "S", "|"} <= letters
    assert set(committed["check"]) <= set(committed["dev"]) and len(committed["check"]) == 5


TINY = {**RULER_SHAPE, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
        "vocab_size": 256, "max_seq_len": 64, "window": 16, "expert_ffn_dim": 32}  # fmt: skip


def test_ruler_chooses_a_rate_trains_seeds_and_resumes(tmp_path):
    cfg = RulerConfig(shape=TINY, layers=2, tokens=8 * 64 * 160, batch_size=8, seq_len=64,
                      base_lr=1e-2, warmup_steps=3, tokenizer="byte")  # fmt: skip
    out = tmp_path / "study"
    run_ruler(out, ["AF"], cfg, log=lambda m: None)
    recs = list(read_jsonl(out / "runs.jsonl"))
    select = [r for r in recs if r["role"] == "select"]
    final = [r for r in recs if r["role"] == "final"]
    assert len(select) >= 3 and all(r["tokens"] == cfg.select_tokens() for r in select)
    ok = [r for r in select if r["flag"] is None]
    best = min(ok, key=lambda r: (r["val_loss"], r["lr"]))
    # An edge winner of the 3-rate grid is checked against the next rate beyond it.
    factors = sorted(round(r["lr"] / cfg.base_lr, 3) for r in select)
    if round(best["lr"] / cfg.base_lr, 3) in (min(factors), max(factors)):
        assert len(factors) == 3 or factors in ([0.25, 0.5, 1, 2], [0.5, 1, 2, 4])
    assert {r["seed"] for r in final} == {0, 1}
    assert all(r["lr"] == best["lr"] and r["test_loss"] is not None for r in final)
    losses = ruler_losses(out)
    assert set(losses["AF"]["seeds"]) == {0, 1}
    assert losses["AF"]["mean"] == pytest.approx(sum(r["test_loss"] for r in final) / 2)
    # Resume: nothing is trained or logged again.
    run_ruler(out, ["AF"], cfg, log=lambda m: None)
    assert len(list(read_jsonl(out / "runs.jsonl"))) == len(recs)
    # Another config on the same folder is refused before anything runs.
    with pytest.raises(UserError, match="other settings"):
        run_ruler(out, ["AF"], cfg.__class__(**{**cfg.__dict__, "base_lr": 2e-2}))


def test_flagged_runs_never_enter_the_losses(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    rows = [
        {"pattern": "AF", "role": "final", "seed": 0, "flag": None, "test_loss": 3.0},
        {"pattern": "AF", "role": "final", "seed": 1, "flag": "spiked", "test_loss": 9.0},
        {"pattern": "AF", "role": "final", "seed": 1, "flag": None, "test_loss": 3.2},
        {"pattern": "FF", "role": "select", "seed": 0, "flag": None, "test_loss": None},
    ]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ruler_losses(out) == {"AF": {"seeds": {0: 3.0, 1: 3.2}, "mean": pytest.approx(3.1)}}


def test_reliability_known_answers():
    from hcomposer.proxies.ruler import reliability

    same = {p: {"seeds": {0: v, 1: v + 0.01}, "mean": v + 0.005}
            for p, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, 5.0])}  # fmt: skip
    r = reliability(same)
    assert r["n"] == 5 and r["seed_spearman"] == pytest.approx(1.0)
    assert r["spearman_brown"] == pytest.approx(1.0)
    assert r["spread_median"] == pytest.approx(0.01)
    flipped = {p: {"seeds": {0: v, 1: -v}, "mean": 0.0}
               for p, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, 5.0])}  # fmt: skip
    assert reliability(flipped)["seed_spearman"] == pytest.approx(-1.0)
    half = {"a": {"seeds": {0: 1.0}, "mean": 1.0}}
    assert reliability(half) == {"n": 0, "spread": {}}


def test_rate_rule_check_compares_the_cheap_pick_with_the_full_grid(tmp_path):
    from hcomposer.proxies.ruler import rate_rule_check

    cfg = RulerConfig(tokens=1000, base_lr=1.0)
    rows = [
        # AF: the cheap rule chose 2.0; the full grid's validation prefers 1.0.
        {"pattern": "AF", "lr": 0.5, "tokens": 1000, "seed": 0, "role": "grid", "flag": None,
         "val_loss": 3.3, "test_loss": 3.31},
        {"pattern": "AF", "lr": 1.0, "tokens": 1000, "seed": 0, "role": "grid", "flag": None,
         "val_loss": 3.1, "test_loss": 3.12},
        {"pattern": "AF", "lr": 2.0, "tokens": 1000, "seed": 0, "role": "final", "flag": None,
         "val_loss": 3.2, "test_loss": 3.25},
        # FF: agrees.
        {"pattern": "FF", "lr": 0.5, "tokens": 1000, "seed": 0, "role": "grid", "flag": None,
         "val_loss": 4.3, "test_loss": 4.3},
        {"pattern": "FF", "lr": 1.0, "tokens": 1000, "seed": 0, "role": "final", "flag": None,
         "val_loss": 4.0, "test_loss": 4.0},
        {"pattern": "FF", "lr": 2.0, "tokens": 1000, "seed": 0, "role": "grid", "flag": "spiked",
         "val_loss": 3.0, "test_loss": 3.0},
        {"pattern": "FF", "lr": 2.0, "tokens": 1000, "seed": 0, "role": "grid", "flag": None,
         "val_loss": 4.2, "test_loss": 4.2},
    ]  # fmt: skip
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = {r["pattern"]: r for r in rate_rule_check(tmp_path, ["AF", "FF", "SF"], cfg)}
    assert set(res) == {"AF", "FF"}  # SF has no runs
    assert res["AF"]["cheap_lr"] == 2.0 and res["AF"]["grid_lr"] == 1.0
    assert res["AF"]["test_cost"] == pytest.approx(0.13) and not res["AF"]["agree"]
    assert res["FF"]["agree"] and res["FF"]["test_cost"] == 0.0  # the spiked run is ignored


def test_a_flagged_final_run_is_retried_one_rate_lower_and_never_averaged(tmp_path, monkeypatch):
    """The selection picks 6e-3; seed 1's final run there spikes: it is kept in the log,
    retried at 3e-3, and the pattern's loss uses the unflagged runs only."""
    from hcomposer.io import append_jsonl
    from hcomposer.proxies import ruler as ruler_mod

    cfg = RulerConfig(tokens=4096 * 40, warmup_steps=3)
    r = ruler_mod.Ruler(tmp_path / "s", cfg, log=lambda m: None)

    def fake(self, pattern, lr, tokens, seed, role):
        lr = float(ruler_mod._lr_key(lr)) if hasattr(ruler_mod, "_lr_key") else lr
        select = {1.5e-3: 5.0, 3e-3: 4.9, 6e-3: 4.8, 1.2e-2: 4.85}
        flag = "spiked" if (role == "final" and seed == 1 and lr == 6e-3) else None
        loss = select[lr] if tokens != cfg.tokens else 4.0 + seed * 0.01 + (lr == 3e-3) * 0.1
        rec = {
            "pattern": pattern,
            "lr": lr,
            "tokens": tokens,
            "seed": seed,
            "role": role,
            "flag": flag,
            "val_loss": loss,
            "test_loss": loss if tokens == cfg.tokens else None,
        }
        append_jsonl(self.runs_log, rec)
        return rec

    monkeypatch.setattr(ruler_mod.Ruler, "train_one", fake)
    r.run("AF")
    finals = [x for x in read_jsonl(r.runs_log) if x["role"] == "final"]
    assert [(x["seed"], x["lr"], x["flag"]) for x in finals] == [
        (0, 6e-3, None),
        (1, 6e-3, "spiked"),
        (1, 3e-3, None),
    ]
    losses = ruler_losses(r.out)["AF"]
    assert losses["seeds"] == {0: 4.0, 1: pytest.approx(4.11)}  # the spiked 4.01 is not used


def test_text_proxy_trains_its_budget_with_its_own_warmup_and_never_reads_test(tmp_path):
    cfg = RulerConfig(shape=TINY, layers=2, tokens=8 * 64 * 160, batch_size=8, seq_len=64,
                      base_lr=1e-2, warmup_steps=20, tokenizer="byte")  # fmt: skip
    ruler = Ruler(tmp_path / "study", cfg, log=lambda m: None)
    tokens = 8 * 64 * 10  # 10 steps: the ruler's 20 warmup steps would be the whole run
    a = ruler.text_proxy("AF", tokens, seed=0)
    assert a["status"] == "completed" and a["cpu_seconds"] > 0
    (folder,) = (tmp_path / "study" / "runs" / "proxy" / "AF").iterdir()
    info = RunDir(folder).read_run()["config"]["train"]
    assert info["tokens"] == tokens and info["warmup"] == 1 and info["lr"] == cfg.base_lr
    # The validation text is scored; an untrained model sits near log(256) = 5.55 nats.
    assert 0 < a["val_loss"] < math.log(256)
    # Asked again, the finished run is read back, not trained again.
    b = ruler.text_proxy("AF", tokens, seed=0)
    assert b["val_loss"] == pytest.approx(a["val_loss"])
    assert b["cpu_seconds"] < a["cpu_seconds"]
    # Nothing of the ruler's own record is written by a proxy run.
    assert not RulerDir(tmp_path / "study").runs.exists()


def _final(pattern, seed, loss, lr=1e-2, flag=None):
    return {"pattern": pattern, "lr": lr, "tokens": 8 * 64 * 40, "seed": seed, "role": "final",
            "status": "completed", "flag": flag, "val_loss": loss, "test_loss": loss}  # fmt: skip


def test_a_third_seed_goes_where_the_first_two_disagree(tmp_path):
    cfg = RulerConfig(shape=TINY, layers=2, tokens=8 * 64 * 40, batch_size=8, seq_len=64,
                      base_lr=1e-2, warmup_steps=3, tokenizer="byte")  # fmt: skip
    out = tmp_path / "study"
    out.mkdir()
    runs = [_final("AF", 0, 5.0), _final("AF", 1, 5.3), _final("FA", 0, 5.0),
            _final("FA", 1, 5.05), _final("AA", 0, 5.0)]  # fmt: skip
    RulerDir(out).runs.write_text("".join(json.dumps(r) + "\n" for r in runs))
    # FA's seeds agree and AA has one seed: only AF is wide.
    assert wide_spread(out, 0.1, 2) == ["AF"]
    assert wide_spread(out, 0.5, 2) == []
    # Two workers split the list; the one without a share trains nothing.
    assert add_seed(out, cfg, 2, above=0.1, shard=(1, 2), log=lambda m: None) == []
    assert add_seed(out, cfg, 2, above=0.1, shard=(0, 2), log=lambda m: None) == ["AF"]
    losses = ruler_losses(out)
    assert set(losses["AF"]["seeds"]) == {0, 1, 2}
    new = [r for r in read_jsonl(RulerDir(out).runs) if r["seed"] == 2]
    assert len(new) == 1 and new[0]["lr"] == 1e-2 and new[0]["test_loss"] is not None
    # Again: the run is read from the log, not trained twice; the list does not shrink.
    assert add_seed(out, cfg, 2, above=0.1, log=lambda m: None) == ["AF"]
    assert len(list(read_jsonl(RulerDir(out).runs))) == len(runs) + 1


def test_byte_check_trains_seed_0_byte_level_and_compares_with_bpe(tmp_path):
    cfg = RulerConfig(shape=TINY, layers=2, tokens=8 * 64 * 160, batch_size=8, seq_len=64,
                      base_lr=1e-2, warmup_steps=3, tokenizer="bpe:300")  # fmt: skip
    out = tmp_path / "study"
    out.mkdir()
    bpe = {"AF": (5.0, 5.1), "FA": (5.2, 5.25), "AA": (5.5, 5.15), "FF": (6.0, 6.1)}
    runs = [_final(p, s, v[s]) for p, v in bpe.items() for s in (0, 1)]
    RulerDir(out).runs.write_text("".join(json.dumps(r) + "\n" for r in runs))
    # Nothing byte-level yet: the check lists its patterns, compares nothing.
    assert byte_check(out) is None
    said = []
    run_byte_check(out, ["AF"], cfg, log=said.append)
    sub = out / "byte_check"
    recs = list(read_jsonl(RulerDir(sub).runs))
    assert {r["seed"] for r in recs} == {0}, said
    assert any(r["role"] == "final" and r["test_loss"] for r in recs), said
    assert json.loads((sub / "ruler.json").read_text())["tokenizer"] == "byte"
    res = byte_check(out)
    assert res["patterns"] == ["AF"] and "byte_vs_bpe_mean" not in res  # 1 < 3 patterns
    # Another pattern list on the same folder is refused; nothing is trained.
    with pytest.raises(UserError, match="other patterns"):
        run_byte_check(out, ["FA"], cfg, log=lambda m: None)
    # Known answers from hand-written byte-level losses: the same order as BPE's mean.
    byte = [_final(p, 0, v[0] + v[1]) for p, v in bpe.items()]
    RulerDir(sub).runs.write_text("".join(json.dumps(r) + "\n" for r in byte))
    (sub / "patterns.json").write_text(json.dumps(list(bpe)))
    res = byte_check(out)
    assert res["patterns"] == list(bpe)
    assert res["byte_vs_bpe_mean"][0] == pytest.approx(1.0)
    assert res["bpe_seed0_vs_seed1"][0] == pytest.approx(0.8)
