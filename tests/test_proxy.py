"""The proxy evaluator: config round trips, errors, determinism, failures, known answers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.data.mad import default_task_config
from hcomposer.errors import UserError
from hcomposer.proxies import proxy as proxy_mod
from hcomposer.proxies import task as proxy_train
from hcomposer.proxies.proxy import ProxyPruned, early_stop, evaluate_proxy, parse_proxy
from hcomposer.proxies.proxy_config import ProxyConfig

HAS_MAMBA = importlib.util.find_spec("hcomposer.primitives.mamba2") is not None


def _tiny_config(**kw) -> ProxyConfig:
    small = dict(num_train_examples=64, num_test_examples=32, seq_len=16)
    tasks = tuple(
        default_task_config(t, **{**small, **extra})
        for t, extra in (
            ("in_context_recall", {}),
            ("selective_copying", {"num_tokens_to_copy": 4}),
            ("compression", {"seq_len": 8}),
            ("memorization", {"seq_len": 8}),
            ("fuzzy_in_context_recall", {}),
            ("noisy_in_context_recall", {}),
        )
    )
    base = dict(
        steps=3,
        batch_size=8,
        task_batch_sizes=(),
        lrs=(1e-3, 3e-3),
        warmup_steps=1,
        mad_tasks=tasks,
    )
    return ProxyConfig(**{**base, **kw})


def test_config_json_round_trip():
    cfg = _tiny_config(dtype="fp32", weight_decays=(0.0, 0.1))
    again = ProxyConfig.from_json(cfg.to_json())
    assert again == cfg
    assert ProxyConfig.from_dict(json.loads(ProxyConfig().to_json())) == ProxyConfig()
    with pytest.raises(UserError, match="dtype"):
        ProxyConfig(dtype="fp16")
    with pytest.raises(UserError, match="unknown proxy config field"):
        ProxyConfig.from_dict({"stepz": 3})


def test_parse_proxy():
    assert parse_proxy("mad") == ("mad", ())
    assert parse_proxy("mad:recall,selective-copying") == (
        "mad",
        ("in_context_recall", "selective_copying"),
    )
    assert parse_proxy("mqar") == ("mqar", ())
    with pytest.raises(UserError, match="valid: in_context_recall, fuzzy_in_context_recall"):
        parse_proxy("mad:recal")
    with pytest.raises(UserError, match="unknown proxy"):
        parse_proxy("glue")
    with pytest.raises(UserError, match="takes no task list"):
        parse_proxy("mqar:recall")


def test_all_tasks_run_and_same_seed_same_score():
    arch = Architecture.parse("AF", "tiny")
    cfg = _tiny_config()
    state = torch.get_rng_state()
    a = evaluate_proxy(arch, "mad", seed=1, config=cfg)
    b = evaluate_proxy(arch, "mad", seed=1, config=cfg)
    c = evaluate_proxy(arch, "mad", seed=2, config=cfg)
    # the caller's global random state is left as it was
    assert torch.equal(state, torch.get_rng_state())
    assert set(a.tasks) == {t.task for t in cfg.mad_tasks}
    assert a.score == b.score
    assert [t["loss"] for t in a.tasks.values()] == [t["loss"] for t in b.tasks.values()]
    assert [t["loss"] for t in a.tasks.values()] != [t["loss"] for t in c.tasks.values()]
    assert 0.0 <= a.score <= 1.0 and not a.failures
    assert a.score == pytest.approx(sum(t["accuracy"] for t in a.tasks.values()) / 6)
    assert all(len(t["grid"]) == 2 for t in a.tasks.values())
    d = a.to_dict()
    json.dumps(d)  # strict JSON
    for key in ("score", "tasks", "params_total", "wall_seconds", "tokens_per_second"):
        assert key in d
    seq = {t.task: t.seq_len for t in cfg.mad_tasks}
    for name, t in a.tasks.items():
        assert [g["tokens"] for g in t["grid"]] == [3 * 8 * seq[name]] * 2
    assert a.tokens == sum(g["tokens"] for t in a.tasks.values() for g in t["grid"])


def test_nan_model_scores_zero_with_a_recorded_failure(monkeypatch):
    real = proxy_train.build_task_model

    def poisoned(arch, data, seed, device="cpu"):
        model, head = real(arch, data, seed, device)
        with torch.no_grad():
            model.embed.weight[0, 0] = float("nan")
        return model, head

    monkeypatch.setattr(proxy_train, "build_task_model", poisoned)
    cfg = _tiny_config(mad_tasks=_tiny_config().mad_tasks[:1], lrs=(1e-3,))
    r = evaluate_proxy(Architecture.parse("AF", "tiny"), "mad", config=cfg)
    assert r.score == 0.0
    assert r.failure and "non-finite" in r.failure
    assert r.to_dict()["tasks"]["in_context_recall"]["loss"] is None


def test_grid_is_chosen_on_validation_and_scored_on_test(monkeypatch):
    # lr 1e-3 is better on validation, 3e-3 on test: the choice must not look at test.
    fake = {
        1e-3: proxy_train.RunResult(1e-3, 0.0, 0.40, 1.0, 3, 10, 0.1, val_accuracy=0.9),
        3e-3: proxy_train.RunResult(3e-3, 0.0, 0.95, 0.5, 3, 10, 0.1, val_accuracy=0.5),
    }
    monkeypatch.setattr(proxy_mod, "train_and_score", lambda arch, data, run, **kw: fake[run.lr])
    cfg = _tiny_config(mad_tasks=_tiny_config().mad_tasks[:1], stop_when_perfect=False)
    r = evaluate_proxy(Architecture.parse("AF", "tiny"), "mad", config=cfg)
    task = r.tasks["in_context_recall"]
    assert task["lr"] == 1e-3 and task["accuracy"] == 0.40 and task["val_accuracy"] == 0.9
    assert r.score == 0.40


def test_early_stop_on_a_solved_check_and_the_curve():
    arch = Architecture.parse("AF", "tiny")
    cfg = _tiny_config(mad_tasks=_tiny_config().mad_tasks[:1], steps=12, check_every=4, lrs=(1e-3,))
    full = evaluate_proxy(arch, "mad", config=cfg).tasks["in_context_recall"]["grid"][0]
    assert [c[0] for c in full["curve"]] == [4, 8, 12] and full["steps"] == 12
    # any accuracy counts as solved: the run stops at its first check
    stopped = evaluate_proxy(arch, "mad", config=cfg.replace(solved_accuracy=1e-9))
    run = stopped.tasks["in_context_recall"]["grid"][0]
    assert run["steps"] == 4 and run["tokens"] == 4 * 8 * 16
    assert run["curve"][0] == full["curve"][0]  # same run up to the stop


def test_early_stop_rule():
    rule = early_stop(ProxyConfig(check_every=1, solved_accuracy=0.9, patience=2))
    assert [rule(i, a) for i, a in enumerate([0.1, 0.5, 0.505, 0.5])] == [
        False,
        False,
        False,
        True,
    ]
    assert early_stop(ProxyConfig(solved_accuracy=0.9))(1, 0.95)
    never = early_stop(ProxyConfig(solved_accuracy=0.9, patience=0))  # plateaus go on
    assert not any(never(i, 0.2) for i in range(100))
    # the default: 6 checks without a gain of 0.05 over the best so far is a stall
    default = early_stop(ProxyConfig())
    curve = [0.20, 0.22, 0.24, 0.21, 0.23, 0.24, 0.22, 0.23]
    assert [default(i, a) for i, a in enumerate(curve)] == [False] * 6 + [True, True]


def _scripted_runs(monkeypatch, script):
    """train_and_score replaced by a script of (steps_done, val_accuracy) per call; the
    seeds it was called with are returned."""
    seeds: list[int] = []

    def fake(arch, data, run, **kw):
        done, val = script[len(seeds)]
        seeds.append(run.seed)
        return proxy_train.RunResult(
            run.lr, run.weight_decay, val, 1.0 - val, done, 10, 0.1, val_accuracy=val
        )

    monkeypatch.setattr(proxy_mod, "train_and_score", fake)
    return seeds


def _one_task(**kw) -> ProxyConfig:
    return _tiny_config(mad_tasks=_tiny_config().mad_tasks[:1], lrs=(1e-3,), steps=600, **kw)


def test_a_stalled_run_restarts_from_new_weights_and_the_best_is_kept(monkeypatch):
    arch = Architecture.parse("AF", "tiny")
    # stalled at 350 of 600 on the plateau, then the restart solves the task
    seeds = _scripted_runs(monkeypatch, [(350, 0.24), (450, 0.995)])
    task = evaluate_proxy(arch, "mad", seed=3, config=_one_task()).tasks["in_context_recall"]
    assert [g["restart"] for g in task["grid"]] == [0, 1]
    assert task["accuracy"] == 0.995 and task["steps"] == 450
    assert seeds[0] == 3000 and seeds[1] != seeds[0]  # the first attempt's seed is unchanged
    # both stall: the better of the two is kept, and no third attempt with restarts=1
    seeds = _scripted_runs(monkeypatch, [(350, 0.30), (350, 0.24), (350, 0.9)])
    cfg = _one_task(restarts=1)
    task = evaluate_proxy(arch, "mad", seed=3, config=cfg).tasks["in_context_recall"]
    assert len(seeds) == 2 and task["accuracy"] == 0.30
    # restarts=2 allows a third, with a third seed
    seeds = _scripted_runs(monkeypatch, [(350, 0.30), (350, 0.24), (400, 0.995)])
    cfg = _one_task(restarts=2)
    task = evaluate_proxy(arch, "mad", seed=3, config=cfg).tasks["in_context_recall"]
    assert len(set(seeds)) == 3 and task["accuracy"] == 0.995


@pytest.mark.parametrize(
    "script, changes",
    [
        ([(600, 0.5)], {}),  # ran to its step cap: not stalled (the task is just hard)
        ([(250, 0.995)], {}),  # solved
        ([(350, 0.24)], {"restarts": 0}),  # stalled, but restarts are off
    ],
)
def test_runs_that_did_not_stall_are_not_restarted(monkeypatch, script, changes):
    seeds = _scripted_runs(monkeypatch, script + [(600, 1.0)])
    arch = Architecture.parse("AF", "tiny")
    evaluate_proxy(arch, "mad", config=_one_task(**changes))
    assert len(seeds) == 1


def test_per_task_batch_sizes_and_old_configs_keep_their_behaviour(monkeypatch):
    cfg = ProxyConfig(batch_size=16, task_batch_sizes={"noisy_in_context_recall": 48})
    assert cfg.batch_for("noisy_in_context_recall") == 48 and cfg.batch_for("memorization") == 16
    assert ProxyConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(UserError, match="task_batch_sizes"):
        ProxyConfig(task_batch_sizes={"nosuch": 8})
    # a whole config written before these fields existed reads back without them
    old = {
        k: v
        for k, v in ProxyConfig().to_dict().items()
        if k not in ("restarts", "task_batch_sizes")
    }
    back = ProxyConfig.from_dict(old)
    assert back.restarts == 0 and back.task_batch_sizes == ()
    # a partial config (a user's overrides) gets today's defaults
    assert ProxyConfig.from_dict({"steps": 10}).restarts == ProxyConfig().restarts
    # the batch size reaches the training run
    seen = []

    def fake(arch, data, run, **kw):
        seen.append(run.batch_size)
        return proxy_train.RunResult(
            run.lr, run.weight_decay, 1.0, 0.0, 3, 10, 0.1, val_accuracy=1.0
        )

    monkeypatch.setattr(proxy_mod, "train_and_score", fake)
    tasks = _tiny_config().mad_tasks
    evaluate_proxy(
        Architecture.parse("AF", "tiny"),
        "mad",
        config=_tiny_config(lrs=(1e-3,), task_batch_sizes={"noisy_in_context_recall": 5}),
    )
    assert seen == [5 if t.task == "noisy_in_context_recall" else 8 for t in tasks]


def test_a_real_stall_restarts_with_different_weights():
    # min_delta 1: no check can gain enough, so every run stalls after `patience` checks
    arch = Architecture.parse("FF", "tiny")
    cfg = _tiny_config(
        mad_tasks=_tiny_config().mad_tasks[:1],
        lrs=(1e-3,),
        steps=12,
        check_every=2,
        patience=1,
        min_delta=1.0,
        restarts=1,
    )
    grid = evaluate_proxy(arch, "mad", config=cfg).tasks["in_context_recall"]["grid"]
    assert [(g["restart"], g["steps"]) for g in grid] == [(0, 4), (1, 4)]
    assert grid[0]["loss"] != grid[1]["loss"]  # new initial weights, a different run
    with pytest.raises(UserError, match="restarts"):
        ProxyConfig(restarts=-1)


def test_report_hook_sees_each_task_and_can_prune():
    arch = Architecture.parse("AF", "tiny")
    cfg = _tiny_config(mad_tasks=_tiny_config().mad_tasks[:3], lrs=(1e-3,))
    seen = []
    r = evaluate_proxy(arch, "mad", config=cfg, report=lambda k, v: seen.append((k, v)) or False)
    accs = [t["accuracy"] for t in r.tasks.values()]
    assert [k for k, _ in seen] == [1, 2, 3]
    assert [v for _, v in seen] == pytest.approx([sum(accs[:k]) / k for k in (1, 2, 3)])
    assert seen[-1][1] == pytest.approx(r.score)
    calls = []
    with pytest.raises(ProxyPruned) as err:
        evaluate_proxy(arch, "mad", config=cfg, report=lambda k, v: calls.append(k) or k == 2)
    assert calls == [1, 2] and err.value.step == 2
    # After the last task the score is known: a prune answer there is not heeded.
    last = evaluate_proxy(arch, "mad", config=cfg, report=lambda k, v: k == 3)
    assert last.score == pytest.approx(r.score)


def test_mqar_proxy_runs():
    from hcomposer.data.mqar import MQARConfig

    cfg = _tiny_config(
        mqar_tasks=(
            MQARConfig(
                vocab_size=32,
                seq_len=16,
                num_kv_pairs=4,
                num_train_examples=32,
                num_test_examples=16,
            ),
        )
    )
    r = evaluate_proxy(Architecture.parse("AF", "tiny"), "mqar", config=cfg)
    assert list(r.tasks) == ["mqar_T16_kv4"] and 0.0 <= r.score <= 1.0


def test_cli_errors_and_json(capsys, tmp_path):
    assert main(["evaluate", "AF", "--proxy", "mad:bogus"]) == 2
    err = capsys.readouterr().err
    assert "in_context_recall" in err and "memorization" in err
    assert main(["evaluate", "AF", "--proxy", "mad", "--data", "x.txt"]) == 2
    assert main(["evaluate", "AQ", "--proxy", "mad"]) == 2
    capsys.readouterr()
    cfg = tmp_path / "proxy.json"
    cfg.write_text(_tiny_config(lrs=(2e-3,)).to_json())
    rc = main(
        [
            "evaluate",
            "AF",
            "--shape",
            "tiny",
            "--proxy",
            "mad:copy,compress",
            "--config",
            str(cfg),
            "--steps",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"selective_copying", "compression"}
    assert out["config"]["steps"] == 2 and out["params_total"] > 0


# Known answers (issue 3) at the `tiny` shape: on in-context recall an MLP-only model cannot
# see the context and stays near chance (1/8 with 8 values); Mamba-2 beats MLP-only. (At `tiny`,
# init_std 0.02, attention's induction circuit did not form within 1,500 steps; at the `proxy`
# shape, whose init is calibrated for it, it does: the defaults tests below.)
RECALL = dict(vocab_size=16, seq_len=32, num_train_examples=2048, num_test_examples=128)


def _recall(pattern: str, steps: int) -> float:
    # fp32: at the tiny shape bf16 autocast is slower on CPU, not faster.
    cfg = ProxyConfig(
        steps=steps,
        batch_size=32,
        lrs=(1e-3,),
        warmup_steps=10,
        dtype="fp32",
        mad_tasks=(default_task_config("in_context_recall", **RECALL),),
    )
    r = evaluate_proxy(Architecture.parse(pattern, "tiny"), "mad:recall", config=cfg)
    return r.tasks["in_context_recall"]["accuracy"]


@pytest.fixture(scope="module")
def mlp_recall() -> float:
    return _recall("FFFF", 200)


def test_known_answer_mlp_near_chance_on_recall(mlp_recall):
    assert mlp_recall < 0.2


@pytest.mark.skipif(not HAS_MAMBA, reason="S (primitives/mamba2.py) not built yet")
def test_known_answer_ssm_beats_mlp_on_recall(mlp_recall):
    assert _recall("SFSF", 400) > mlp_recall + 0.1


def test_text_proxy_on_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = ProxyConfig(
        text_tokens=4096, text_seq_len=32, text_batch_size=4, text_eval_tokens=256, lrs=(1e-3,)
    )
    arch = Architecture.parse("AF", "tiny")
    r = evaluate_proxy(arch, "text", data=corpus, config=cfg)
    again = evaluate_proxy(arch, "text", data=corpus, config=cfg)
    loss = r.tasks["text"]["loss"]
    assert r.score == -loss == again.score
    # 32 steps on a repetitive text: well below the uniform byte loss ln(256) = 5.55
    assert loss < 4.0 and r.tokens == 4096 and not r.failures


# Known answers at the calibrated defaults: `proxy` shape, ProxyConfig(), what the
# calibration measured (docs/proxies.md, docs/history/results-log.md "MAD proxy calibration"),
# asserted with margins. One test per pattern so that xdist spreads them over the workers;
# about 5 CPU-minutes in all.
def _at_defaults(pattern: str, proxy: str, seeds: tuple[int, ...]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    arch = Architecture.parse(pattern, "proxy")
    for seed in seeds:
        r = evaluate_proxy(arch, proxy, seed=seed, config=ProxyConfig())
        for task, t in r.tasks.items():
            out.setdefault(task, []).append(t["accuracy"])
    return out


@pytest.mark.slow
def test_known_answer_defaults_attention():
    runs = _at_defaults("AFAFAF", "mad:recall,copy", (0, 1, 2))
    recall = runs["in_context_recall"]
    # the induction circuit forms within the budget on every seed (0.98-1.00 measured)
    assert sum(recall) / 3 >= 0.9 and min(recall) >= 0.8, recall
    # selective copying: 0.40-0.49 measured (seeds 0-2; a task's model seed depends on its
    # place in the evaluation, so these differ from the six-task rows in RESULTS); MLP-only
    # stays at the context-free 0.07 (below): a gap >= 0.25 on every seed, 0.33-0.43 measured
    assert min(runs["selective_copying"]) >= 0.35, runs["selective_copying"]


@pytest.mark.slow
def test_known_answer_defaults_attention_noisy_recall():
    # Noisy recall was the seed-noise culprit: at batch 32 without restarts AFAFAF formed the
    # circuit on 1 seed of 3 (0.24 on the others). Batch 64 and one restart after a stall
    # make it form on every seed (docs/proxies.md, "Stalls and restarts").
    noisy = _at_defaults("AFAFAF", "mad:noisy", (0, 1, 2))["noisy_in_context_recall"]
    assert min(noisy) >= 0.9, noisy


@pytest.mark.slow
def test_known_answer_defaults_mlp_only():
    runs = _at_defaults("FFFFFF", "mad:recall,copy,memorize", (0, 1, 2))
    # an MLP-only pattern cannot see the context: chance 1/8 (+ 0.1 at most) on recall, the
    # context-free level (0.074) on copying -- so attention's copying is >= 0.3 above it
    assert max(runs["in_context_recall"]) <= 1 / 8 + 0.1
    assert max(runs["selective_copying"]) <= 0.1
    # the channel mixers memorise the fixed map within the budget (1.0 measured)
    assert min(runs["memorization"]) >= 0.9


@pytest.mark.slow
def test_known_answer_defaults_attention_only_memorises_slowly():
    runs = _at_defaults("AAAAAA", "mad:memorize", (0,))
    assert runs["memorization"][0] <= 0.7  # >= 0.2 below MLP-only's >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MAMBA, reason="S (primitives/mamba2.py) not built yet")
def test_known_answer_defaults_ssm_recall():
    runs = _at_defaults("SFSFSF", "mad:recall", (0,))
    assert runs["in_context_recall"][0] >= 0.5  # 0.99 measured
