"""The evaluation suite: suite parsing, needle-in-a-haystack scoring, efficiency accounting,
validation loss, results files, rank correlation, and the CLI's bad-input paths."""

from __future__ import annotations

import json

import pytest
import torch

from hcomposer import Architecture
from hcomposer.cli import main
from hcomposer.data import ByteTokenizer
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import EfficiencyConfig, run_efficiency
from hcomposer.evaluation.niah import NIAHConfig, _build_prompt, run_niah
from hcomposer.evaluation.suite import load_eval_results, parse_suite, run_suite
from hcomposer.model import build_model
from hcomposer.proxies.rank_correlation import rank_correlation, select_across_range

ByteTok = ByteTokenizer


HAY = "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 40


@pytest.fixture(scope="module")
def model():
    shape = Architecture.parse("AF", "tiny").shape.replace(vocab_size=320, max_seq_len=128)
    return build_model(Architecture.parse("AF[A|W]F", shape), seed=0).eval()


def test_parse_suite():
    assert parse_suite("loss,niah") == [("loss", []), ("niah", [])]
    assert parse_suite("loss,lm-eval:hellaswag,arc_easy,niah") == [
        ("loss", []),
        ("lm-eval", ["hellaswag", "arc_easy"]),
        ("niah", []),
    ]
    assert parse_suite("lm-eval:a+b") == [("lm-eval", ["a", "b"])]
    with pytest.raises(UserError, match="valid: loss, mad, mqar, niah, efficiency, lm-eval"):
        parse_suite("loss,perplexity")
    with pytest.raises(UserError, match="needs tasks"):
        parse_suite("lm-eval")


class Oracle(torch.nn.Module):
    """Reads the needle's number back out of the prompt: NIAH must then score 1.0
    (or 0.0 when ``wrong``), which checks prompt building and exact-digit scoring."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong
        self.prompts = []

    def generate(self, x, max_new, eos_token_id=None):
        text = ByteTok().decode(x[0].tolist())
        self.prompts.append(text)
        city = text.rsplit("What is the special magic ", 1)[1].split(" number?")[0]
        number = text.split(f"The special magic {city} number is: ")[1][:7]
        if self.wrong:
            number = str((int(number) + 1) % 10_000_000).zfill(7)
        out = torch.tensor([ByteTok().encode(" " + number + ".\n")[:max_new]])
        return torch.cat([x, out], dim=1)


def test_niah_scores_exact_digits_and_places_the_needle():
    cfg = NIAHConfig(lengths=(200, 300), depths=(0.0, 0.5, 1.0), trials=2)
    oracle = Oracle()
    res = run_niah(oracle, ByteTok(), train_len=150, haystack_text=HAY, config=cfg)
    assert res["accuracy_mean"] == 1.0
    assert res["lengths"] == [200, 300]
    wrong = run_niah(Oracle(wrong=True), ByteTok(), train_len=150, haystack_text=HAY, config=cfg)
    assert wrong["accuracy_mean"] == 0.0
    # Exact prompt length, and the needle sits at the asked depth of the haystack.
    hay = torch.tensor(ByteTok().encode(HAY)).numpy()
    for depth in (0.0, 0.5, 1.0):
        ids = _build_prompt(ByteTok(), hay, 300, depth, "Oslo", "1234567")
        assert len(ids) == 300
        text = ByteTok().decode(ids)
        pos = text.index("The special magic Oslo number is: 1234567")
        hay_len = text.index("\nWhat is the special") - len(
            " The special magic Oslo number is: 1234567. "
        )
        assert abs(pos / hay_len - depth) < 0.2


def test_efficiency_reports_accounting_bytes(model):
    from hcomposer.accounting import count_costs

    cfg = EfficiencyConfig(
        min_len=16, max_len=32, decode_steps=2, repeats=1, train_batch=1, batch=2
    )
    res = run_efficiency(model, train_len=32, config=cfg)
    assert [p["context"] for p in res["inference"]] == [16, 32]
    for p in res["inference"]:
        costs = count_costs(model.arch, seq_len=p["context"], dtype_bytes=4)
        assert p["kv_bytes"] == costs.kv_bytes_per_token * p["context"] * 2
        assert p["state_bytes"] == costs.state_bytes * 2
        assert p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
    assert res["train"]["tokens_per_s"] > 0
    assert "cpu" in res["memory_method"] or "cuda" in res["memory_method"]


def test_run_suite_writes_results_and_loss_matches_reference(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(HAY * 4)
    info = {"config": {"train": {"seq_len": 64, "eval_tokens": 1024, "val_fraction": 0.2}},
            "step": 7, "tokens": 1000}  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    opts = {"niah": {"lengths": (200,), "depths": (0.0, 1.0), "trials": 1, "max_new_tokens": 9},
            "efficiency": {"min_len": 16, "max_len": 16, "decode_steps": 2, "repeats": 1,
                           "train_batch": 1, "train_optimizer": "none"}}  # fmt: skip
    res = run_suite(
        run, "loss,niah", data=str(text), options={**opts, "haystack_text": HAY},
        loaded=(model, model.arch, ByteTok(), info),
    )  # fmt: skip
    stored = load_eval_results(run)
    assert stored["parts"].keys() == {"loss", "niah"}
    assert (run / "eval" / "niah.png").stat().st_size > 1000
    assert "## Needle in a haystack" in (run / "eval" / "results.md").read_text()
    # The loss is the mean next-token cross-entropy over the same validation windows.
    from hcomposer.data import prepare_dataset

    ds = prepare_dataset(str(text), ByteTok(), val_fraction=0.2, seed=0)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in ds.eval_batches(8, 64, 1024):
            total += float(model.loss(x, y)) * y.numel()
            n += y.numel()
    assert res["parts"]["loss"]["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["parts"]["loss"]["tokens"] == n
    # A second call adds a part and keeps the earlier ones.
    run_suite(run, "efficiency", options=opts, loaded=(model, model.arch, ByteTok(), info))
    assert load_eval_results(run)["parts"].keys() == {"loss", "niah", "efficiency"}
    assert json.loads((run / "eval" / "results.json").read_text())["step"] == 7


def test_rank_correlation_and_selection():
    scored = [(f"p{i}", float(s)) for i, s in enumerate([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8])]
    picked = select_across_range(scored, 3)
    assert [s for _, s in picked] == [0.1, 0.5, 0.9]
    assert rank_correlation([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])["spearman"] == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])["spearman"] == pytest.approx(-1.0)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--suite", "loss,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite part 'bogus'" in err and "efficiency" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "architecture.json").write_text(Architecture.parse("AF", "tiny").to_json())
    assert main(["eval", str(run), "--suite", "loss"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (run / "eval").exists()
    target = tmp_path / "hf"
    target.mkdir()
    assert main(["export", str(run), "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(target.iterdir()) == []


def test_proxy_rank_study_resumes_and_reports_intervals(tmp_path, capsys):
    from hcomposer.cli import main

    out = tmp_path / "rank"
    argv = ["proxy-rank", "--recipe", "smoke", "--out", str(out), "--json"]
    # A worker's share first (fewer than 3 patterns): logs only, no report.
    assert main(["proxy-rank", "--recipe", "smoke", "--out", str(out), "--patterns", "AFAF"]) == 0
    assert "a worker's share" in capsys.readouterr().err
    assert not (out / "result.md").exists()
    share = (out / "scale_losses.jsonl").read_text().splitlines()
    assert len(share) == 2 and len((out / "proxy_scores.jsonl").read_text().splitlines()) == 2
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    corr = doc["correlation"]
    assert corr["n"] == 3 and corr["spearman_ci"][0] <= corr["spearman"] <= corr["spearman_ci"][1]
    points = {p["pattern"]: p for p in doc["points"]}
    # Two proxy seeds each; AFAF also trained on a second seed, so its scale noise is measured.
    assert all(len(p["proxy_scores"]) == 2 for p in points.values())
    assert set(points["AFAF"]["scale_losses"]) == {"0", "1"}
    assert "AFAF" in doc["noise"]["scale_seed_std"]
    mean = sum(points["AFAF"]["proxy_scores"]) / 2
    assert points["AFAF"]["proxy_score"] == pytest.approx(mean)
    # The pair count is the study's own: 3 patterns, 3 pairs, each counted from its points.
    from hcomposer.stats import pair_agreement

    pairs = doc["pairs"]
    want = pair_agreement(
        {k: p["proxy_scores"] for k, p in points.items()},
        {k: list(p["scale_losses"].values()) for k, p in points.items()},
    )
    assert pairs["pairs"] == 3 and pairs == json.loads(json.dumps(want))
    # One task: its accuracy is the score, so its correlation is the study's own.
    by_task = doc["task_correlations"]["in_context_recall"]
    assert by_task["spearman"] == pytest.approx(corr["spearman"])
    assert by_task["accuracy"]["AFAF"] == pytest.approx(points["AFAF"]["proxy_score"])
    lines = (out / "scale_losses.jsonl").read_text().splitlines()
    assert len(lines) == 4 and lines[:2] == share  # the share's runs were kept, not repeated
    # Rerun: nothing is trained or scored again.
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "scale_losses.jsonl").read_text().splitlines() == lines
    assert len((out / "proxy_scores.jsonl").read_text().splitlines()) == 6
    assert (out / "proxy_rank.png").read_bytes()[:4] == b"\x89PNG"
    assert "bootstrap interval" in (out / "result.md").read_text()
    assert "Pairs the proxy separates" in (out / "result.md").read_text()


@pytest.mark.parametrize(
    "extra",
    [["--recipe", "nope"], ["--seeds", "a"], ["--patterns", "AF,,FF"], ["--patterns", "AX,FF,AA"]],
)
def test_proxy_rank_bad_input(extra, tmp_path, capsys):
    from hcomposer.cli import main

    out = tmp_path / "never"
    assert main(["proxy-rank", "--recipe", "smoke", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and not out.exists()


def test_proxy_rank_refuses_a_folder_made_with_other_settings(tmp_path, capsys):
    from hcomposer.cli import main

    out = tmp_path / "rank"
    argv = ["proxy-rank", "--recipe", "smoke", "--out", str(out)]
    assert main([*argv, "--tokens", "256"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    # Other training tokens would mix two budgets into one correlation: refused, nothing moves.
    assert main([*argv, "--tokens", "512"]) == 2
    err = capsys.readouterr().err
    assert "train_config.tokens" in err and "new --out" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    settings = json.loads((out / "study.json").read_text())
    assert settings["train_config"]["tokens"] == 256 and "seed" not in settings["train_config"]


def test_proxy_rank_trains_on_the_data_it_is_given(tmp_path, capsys):
    from hcomposer.cli import main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "rank"
    argv = ["proxy-rank", "--recipe", "smoke", "--out", str(out), "--data", str(text)]
    assert main([*argv, "--tokens", "256"]) == 0
    capsys.readouterr()
    run = json.loads((out / "runs" / "AFAF" / "run.json").read_text())
    assert run["config"]["train"]["data"] == str(text)
    assert json.loads((out / "study.json").read_text())["train_config"]["data"] == str(text)
    assert main([*argv[:-1], str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_study_scale_losses_means_finished_runs_across_folders(tmp_path):
    from hcomposer.proxies.rank_correlation import study_scale_losses

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "scale_losses.jsonl").write_text(
        '{"pattern": "AF", "seed": 0, "val_loss": 1.0}\n'
        '{"pattern": "AF", "seed": 1, "val_loss": 2.0}\n'
        '{"pattern": "FF", "seed": 0, "val_loss": null}\n'
        '{"pattern": "SF", "se'  # a torn last line is skipped
    )
    (b / "scale_losses.jsonl").write_text('{"pattern": "AF", "seed": 2, "val_loss": 4.5}\n')
    # A failed run (no loss) gives the pattern no entry; folders pool their runs.
    assert study_scale_losses(a) == {"AF": 1.5}
    assert study_scale_losses(a, b) == {"AF": 2.5}
    assert study_scale_losses(tmp_path / "missing") == {}
