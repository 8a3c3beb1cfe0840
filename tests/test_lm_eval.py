"""The lm-eval adapter: batched scoring against an unbatched reference, rolling windows,
greedy generation against the model's own generate, and a local task run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hcomposer import Architecture
from hcomposer.errors import UserError
from hcomposer.evaluation.suite import _md_lm_eval
from hcomposer.model import build_model

pytest.importorskip("lm_eval")

from byte_tok import ByteTok  # noqa: E402
from hcomposer.evaluation.lm_eval_adapter import (  # noqa: E402
    HComposerLM,
    rolling_windows,
    run_lm_eval,
    score_continuations,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval_task"


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def model():
    shape = Architecture.parse("AF", "tiny").shape.replace(vocab_size=260, max_seq_len=48)
    return build_model(Architecture.parse("AW[A|W]F", shape), seed=0).eval()


def _reference_logprob(model, ctx, cont, max_length):
    full = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0]
    n = len(cont)
    targets = torch.tensor(full[-n:])
    lp = logp[len(full) - 1 - n :].gather(-1, targets[:, None]).sum().item()
    greedy = bool((logp[len(full) - 1 - n :].argmax(-1) == targets).all())
    return lp, greedy


def test_batched_scores_equal_unbatched_reference(model):
    g = torch.Generator().manual_seed(0)
    items = []
    for n_ctx, n_cont in [(3, 2), (10, 5), (1, 1), (40, 20), (7, 1), (30, 3)]:
        ids = torch.randint(0, 256, (n_ctx + n_cont,), generator=g).tolist()
        items.append((ids[:n_ctx], ids[n_ctx:]))
    # Make one continuation exactly the model's greedy choice: is_greedy must say so.
    ctx = items[0][0]
    items.append((ctx, model.generate(torch.tensor([ctx]), 3)[0, len(ctx) :].tolist()))
    got = score_continuations(model, items, batch_size=3, max_length=48)
    for (ctx, cont), (lp, greedy) in zip(items, got):
        ref_lp, ref_greedy = _reference_logprob(model, ctx, cont, 48)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert got[-1][1] is True


def test_rolling_windows_predict_each_token_once_within_the_window():
    tokens = list(range(100))
    for L in (1, 7, 16, 200):
        wins = rolling_windows(tokens, 999, L)
        predicted = [t for _, cont in wins for t in cont]
        assert predicted == tokens
        for ctx, cont in wins:
            assert len(ctx) + len(cont) - 1 <= L
            assert ctx[0] == 999 or len(ctx) + len(cont) - 1 == L


def test_rolling_loglikelihood_equals_full_sequence_when_it_fits(model):
    lm = HComposerLM(model, ByteTok(), batch_size=2)
    text = "hybrid models " * 2
    (got,) = lm.loglikelihood_rolling([Req(text)])
    ids = [256, *ByteTok().encode(text)]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
    ref = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(ref, abs=1e-4)
    # Longer than the window: still one term per token, each at most 48 tokens of context.
    long_text = "abcdefghij" * 12
    (long_lp,) = lm.loglikelihood_rolling([Req(long_text)])
    assert long_lp < 0 and long_lp / len(long_text) > -20


def test_generate_until_matches_greedy_generate(model):
    lm = HComposerLM(model, ByteTok(), batch_size=4)
    prompts = ["abc", "xyz", "hello", "ab"]
    reqs = [Req(p, {"until": ["\n", "q"], "max_gen_toks": 10}) for p in prompts]
    got = lm.generate_until(reqs)
    for p, text in zip(prompts, got):
        full = model.generate(torch.tensor([ByteTok().encode(p)]), 10)[0, len(p) :].tolist()
        if 256 in full:
            full = full[: full.index(256)]
        ref = ByteTok().decode(full)
        for stop in ("\n", "q"):
            ref = ref.split(stop)[0]
        assert text == ref


def test_local_tasks_end_to_end(model, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = run_lm_eval(
        model, ByteTok(), ["hc_tiny_mc", "hc_tiny_gen", "hc_tiny_ppl"], include_path=TASKS
    )
    docs = [json.loads(line) for line in (TASKS / "hc_tiny_mc.jsonl").read_text().splitlines()]
    lm = HComposerLM(model, ByteTok())
    correct = 0
    for d in docs:
        scores = lm.loglikelihood([Req(d["question"], " " + c) for c in d["choices"]])
        best = max(range(len(scores)), key=lambda i: scores[i][0])
        correct += best == d["answer"]
    p, n = correct / len(docs), len(docs)
    assert res["tasks"]["hc_tiny_mc"]["acc"] == pytest.approx(p)
    assert res["n_samples"]["hc_tiny_mc"] == n
    # The standard error of a mean of 0/1 scores: sample std / sqrt(n) = sqrt(p(1-p)/(n-1)).
    assert res["stderr"]["hc_tiny_mc"]["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert 0 < p < 1  # the fixture model gets some right and some wrong: a non-trivial check
    gen_docs = [json.loads(x) for x in (TASKS / "hc_tiny_gen.jsonl").read_text().splitlines()]
    outs = lm.generate_until(
        [Req(d["prompt"], {"until": ["\n"], "max_gen_toks": 8}) for d in gen_docs]
    )
    em = sum(o == d["target"] for o, d in zip(outs, gen_docs)) / len(gen_docs)
    assert res["tasks"]["hc_tiny_gen"]["exact_match"] == pytest.approx(em)
    se_em = math.sqrt(em * (1 - em) / (len(gen_docs) - 1))
    assert res["stderr"]["hc_tiny_gen"]["exact_match"] == pytest.approx(se_em)
    # weighted perplexities and bits per byte have no standard error in lm-eval
    assert res["stderr"]["hc_tiny_ppl"] == {}
    md = "\n".join(_md_lm_eval(res))
    assert f"| hc_tiny_mc | acc | {p:.4f} | ± {math.sqrt(p * (1 - p) / (n - 1)):.4f} |" in md
    assert "| hc_tiny_ppl | bits_per_byte |" in md and "| — |" in md
    ppl = res["tasks"]["hc_tiny_ppl"]
    assert ppl["bits_per_byte"] == pytest.approx(
        torch.log2(torch.tensor(ppl["byte_perplexity"])).item(), rel=1e-6
    )


def test_task_without_offline_data_is_a_user_error(tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "gone.yaml").write_text(
        (TASKS / "hc_tiny_mc.yaml")
        .read_text()
        .replace("task: hc_tiny_mc", "task: hc_gone")
        .replace("tests/data/lm_eval_task/hc_tiny_mc.jsonl", str(tmp_path / "missing.jsonl"))
    )
    with pytest.raises(UserError, match="could not be loaded.*include-path"):
        run_lm_eval(model, ByteTok(), ["hc_gone"], include_path=tmp_path)
