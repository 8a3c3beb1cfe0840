"""lm-evaluation-harness through an in-memory adapter of our model (lm-eval >= 0.4).

``HComposerLM`` subclasses ``lm_eval.api.model.LM`` and answers the three request
types from a model object and a tokenizer object (nothing is saved or reloaded):

- ``loglikelihood``: sum of log-probabilities of the continuation tokens given the
  context (contexts longer than the model's window are cut on the left), plus
  whether greedy decoding would produce the continuation. Requests are sorted by
  length and batched; sequences are right-padded, which a causal model never
  sees (position t only reads positions <= t).
- ``loglikelihood_rolling``: every token of the document (preceded by EOS) is
  predicted exactly once, in windows of ``max_length`` tokens; each window after
  the first re-reads up to ``max_length`` earlier tokens as context.
- ``generate_until``: greedy decoding with the model's cache; requests with the
  same prompt length and generation settings are decoded together; each stops
  at its first stop string (removed from the output), EOS, or ``max_gen_toks``.

``run_lm_eval`` resolves task names (with extra task folders from
``include_path``), checks that every task's data can be loaded *before* the
evaluation, and returns lm-eval's per-task metrics with their standard errors.

Standard errors. lm-eval computes none with ``bootstrap_iters=0``. With it above 0, metrics
aggregated by ``mean`` (acc, acc_norm, exact_match) get the closed form
sample_std / sqrt(n) = sqrt(p (1 - p) / (n - 1)) for a 0/1 score with mean p, whatever the
number of iterations; a few aggregations (median, perplexity, F1, BLEU...) are bootstrapped
with that many resamples; the rest (weighted_perplexity, bits_per_byte) get none. We pass
``BOOTSTRAP_ITERS`` = 1000 (lm-eval's default is 100,000: 100 times the time for a
standard error known to about 2% either way at 1000) and run any bootstrap in this process
(lm-eval would start a pool of one process per core for it).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hcomposer.errors import UserError

try:
    from lm_eval.api.model import LM
except ImportError:  # lm-eval is an optional dependency
    LM = object  # type: ignore[misc,assignment]

__all__ = [
    "BOOTSTRAP_ITERS",
    "HComposerLM",
    "LMEvalOptions",
    "run_lm_eval",
    "check_tasks",
    "score_continuations",
    "rolling_windows",
]

BOOTSTRAP_ITERS = 1000
_SEED_ARGS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")


@torch.no_grad()
def score_continuations(
    model, items: list[tuple[list[int], list[int]]], *, batch_size: int = 8, max_length: int
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy?) for token-id pairs, batched by length."""
    device = next(model.parameters()).device
    prepared = []
    for ctx, cont in items:
        if not cont:
            prepared.append(None)
            continue
        full = (ctx + cont)[-(max_length + 1) :]
        prepared.append((full[:-1], full[len(full) - len(cont) :]))
    order = sorted(
        (i for i, p in enumerate(prepared) if p is not None), key=lambda i: -len(prepared[i][0])
    )
    results: list[tuple[float, bool]] = [(0.0, True)] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(prepared[chunk[0]][0])
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp = prepared[i][0]
            batch[row, : len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(model(batch.to(device)).float(), dim=-1)
        for row, i in enumerate(chunk):
            inp, cont = prepared[i]
            n = len(cont)
            lp = logp[row, len(inp) - n : len(inp)]
            target = torch.tensor(cont, device=device)
            total = lp.gather(-1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = (total, greedy)
    return results


def rolling_windows(tokens: list[int], prefix: int, max_length: int):
    """(context_ids, target_ids) pairs that predict every token once, each window <= max_length.

    ``[prefix] + tokens`` is the stream; window k predicts ``max_length`` targets
    (the last one fewer) from all of its preceding tokens that fit the window.
    """
    stream = [prefix, *tokens]
    out = []
    first = 1
    while first < len(stream):
        last = min(first + max_length, len(stream))  # this window predicts stream[first:last]
        lo = max(0, last - 1 - max_length)  # its input stream[lo:last-1] fits the window
        out.append((stream[lo:first], stream[first:last]))
        first = last
    return out


class HComposerLM(LM):
    """lm-eval ``LM`` over an hcomposer model and tokenizer, entirely in memory."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        if LM is object:
            raise UserError("lm-eval is not installed: pip install 'hcomposer[lm-eval]'")
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.arch.shape.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.eot_token_id = int(tokenizer.eos_id)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", "hcomposer"))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Spaces at the end of the context belong to the continuation's first word.
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        ctx = self.tokenizer.encode(context) if context else [self.eot_token_id]
        whole = self.tokenizer.encode(context + continuation) if context else None
        if whole is not None and whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self.tokenizer.encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = [self._encode_pair(*req.args) for req in requests]
        return score_continuations(
            self.model, items, batch_size=self.batch_size, max_length=self.max_length
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for w in rolling_windows(
                self.tokenizer.encode(text), self.eot_token_id, self.max_length
            ):
                windows.append(w)
                owner.append(k)
        scores = score_continuations(
            self.model, windows, batch_size=self.batch_size, max_length=self.max_length
        )
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tokenizer.encode(context) or [self.eot_token_id]
            ids = ids[-max(1, self.max_length - max_new) :]
            prepared.append((ids, list(until), max_new))
            groups[(len(ids), tuple(until), max_new)].append(i)
        out = [""] * len(requests)
        for (_, until, max_new), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                prompts = torch.tensor([prepared[i][0] for i in chunk], device=self.device)
                texts = self._greedy(prompts, list(until), max_new)
                for i, t in zip(chunk, texts):
                    out[i] = t
        return out

    def _greedy(self, prompts: torch.Tensor, until: list[str], max_new: int) -> list[str]:
        """Greedy continuation of equal-length prompts; each row stops at its first stop string."""
        B, T = prompts.shape
        cache = self.model.init_cache(B, T + max_new)
        logits = self.model(prompts, cache=cache)[:, -1]
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        texts = [""] * B
        for _ in range(max_new):
            nxt = logits.float().argmax(-1)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                if tok == self.eot_token_id:
                    done[b] = True
                    continue
                new[b].append(tok)
                texts[b] = self.tokenizer.decode(new[b])
                if any(u and u in texts[b] for u in until):
                    done[b] = True
            if all(done):
                break
            logits = self.model(nxt[:, None], cache=cache)[:, -1]
        results = []
        for text in texts:
            cut = min((text.index(u) for u in until if u and u in text), default=len(text))
            results.append(text[:cut])
        return results


def _task_manager(tasks: list[str], include_path: str | Path | list | None):
    """A TaskManager that knows ``tasks``; lm-eval's ~15k built-in YAMLs are indexed only if
    a task is not found in ``include_path`` (indexing them takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    paths = include_path if isinstance(include_path, list) else [include_path]
    paths = [str(p) for p in paths if p is not None]
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p!r} is not a folder of lm-eval task YAML files")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    return TaskManager(include_path=paths or None)


def check_tasks(tasks: list[str], include_path=None):
    """Resolve the task names and load their data now (UserError when that is impossible)."""
    if LM is object:
        raise UserError("lm-eval is not installed: pip install 'hcomposer[lm-eval]'")
    tm = _task_manager(tasks, include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks`, or pass a folder of "
            "task YAML files with --include-path"
        )
    try:
        tm.load(list(tasks))
    except Exception as e:  # datasets raises many types: connection, offline, missing file
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        first = str(e).splitlines()[0][:160] if str(e) else ""
        how = (
            "offline mode is set (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), so only cached data is "
            "used: run once online to cache it, "
            if offline
            else "go online once to download it into the datasets cache (after that "
            "HF_DATASETS_OFFLINE=1 works), "
        )
        raise UserError(
            f"the data of lm-eval task(s) {tasks} could not be loaded ({type(e).__name__}: "
            f"{first}); {how}or point --include-path at a local task folder whose YAML reads "
            "local files"
        ) from None
    return tm


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


@contextmanager
def _single_process_bootstrap():
    """lm-eval's bootstrap in this process (its DISABLE_MULTIPROC), restored afterwards."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


@dataclass(frozen=True, kw_only=True)
class LMEvalOptions:
    """How ``run_lm_eval`` runs the tasks: ``limit`` examples per task (a fraction below 1;
    None: all), ``num_fewshot`` (None: each task's default), the batch size, the longest
    generation, and the seed of every random choice lm-eval makes."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    max_gen_toks: int = 256
    seed: int = 0


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | Path | list | None = None,
    options: LMEvalOptions | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory model; returns {"tasks": {task: {metric: value}},
    "stderr": {task: {metric: standard error}} (for the metrics lm-eval gives one), ...}."""
    from lm_eval import simple_evaluate

    opts = options or LMEvalOptions()
    limit = opts.limit
    tm = check_tasks(tasks, include_path)
    lm = HComposerLM(model, tokenizer, batch_size=opts.batch_size, max_gen_toks=opts.max_gen_toks)
    with _single_process_bootstrap():
        res = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=tm,
            limit=limit,
            num_fewshot=opts.num_fewshot,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            # One seed for all four of lm-eval's generators (python, numpy, torch, few-shot).
            **dict.fromkeys(_SEED_ARGS, opts.seed),
        )
    out: dict[str, Any] = {
        "tasks": {},
        "n_samples": {},
        "limit": limit,
        "num_fewshot": opts.num_fewshot,
        "stderr": {},
    }
    for name, metrics in (res or {}).get("results", {}).items():
        clean, errs = {}, {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not _is_number(value):
                continue
            metric = key.split(",")[0]
            if metric.endswith("_stderr"):
                errs[metric.removesuffix("_stderr")] = float(value)
            else:
                clean[metric] = float(value)
        out["tasks"][name] = clean
        out["stderr"][name] = {m: e for m, e in errs.items() if m in clean}
    for name, n in (res or {}).get("n-samples", {}).items():
        out["n_samples"][name] = n.get("effective", n.get("original"))
    return out
