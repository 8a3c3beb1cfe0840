"""``--rehearse``: a recipe's own code path at toy size on a CPU, in a few minutes.

A rehearsal runs the stages the recipe runs, in the same order and through the same
functions, with everything that costs time shrunk. The shrink is defined here and only here:

- :func:`rehearsal` turns a :class:`~hcomposer.recipes.Recipe` into its toy twin: the search
  keeps its primitives, positions, sampler, strategy, proxy and workers but runs
  :data:`TRIALS` trials of a proxy trained :data:`PROXY_STEPS` steps on small task sets; the
  target keeps its depth and scale strategy at the ``tiny`` width; training keeps its optimiser
  and schedule kind for :data:`STEPS` steps of :data:`BATCH` x :data:`SEQ_LEN` tokens, sharded
  with FSDP over :data:`WORLD_SIZE` CPU processes (gloo) with a checkpoint every
  :data:`CHECKPOINT_EVERY` steps; the evaluation keeps its parts on small settings, each
  lm-eval task replaced by a local multiple-choice task; at most two training seeds and two
  re-scored patterns, each re-scored on one extra seed; a tenth of the data held out.
- Data and tokenizer keep their format: a Hub dataset (``hf:NAME``) becomes the shipped
  Parquet corpus, streamed the same way (``hf:<folder>``); a Hub or file ``tokenizer.json``
  becomes the shipped 1,024-entry one; ``bpe:N`` becomes ``bpe:512`` trained on the toy data;
  the embedded corpus and the byte tokenizer stay. Nothing is downloaded.
- :func:`rehearsal_train` and :func:`rehearsal_proxy` are the same shrink for ``proxy-rank``
  and ``isoflop``, which have their own recipes.

What the toy cannot show at full size is checked without memory: the full recipe's target
(the searched pattern extrapolated to ``target_layers`` at ``target_shape``, with the declared
tokenizer's vocabulary) and its matched baseline are built on the meta device and their exact
parameter counts recorded (the paper recipe's baseline is Llama-3.2-1B's 1,235,814,400).

The first training runs in its own processes (``torchrun --nproc_per_node 2``, through
:func:`launch_train`); it is killed with SIGKILL once its first sharded checkpoint is written
and launched again, and must continue from that checkpoint to the end. The other trainings run
in this process, as ``hcomposer run`` trains.
``rehearsal.json`` in the run folder lists each stage, what it exercised and its wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from hcomposer.accounting import meta_model
from hcomposer.architecture import Architecture
from hcomposer.config_io import stamp
from hcomposer.data import ByteTokenizer, get_tokenizer, rehearsal_assets
from hcomposer.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from hcomposer.pipeline.run import run_pipeline
from hcomposer.pipeline.scale import matched_baseline, target_on_meta
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.recipes import PAPER_TOKENIZER, EvalConfig, Recipe
from hcomposer.runs import RunDir, rehearsal_json
from hcomposer.training.checkpoint import read_state, usable_checkpoint
from hcomposer.training.trainer import TrainConfig, TrainResult, resolve_arch, train

__all__ = [
    "TRIALS",
    "PROXY_STEPS",
    "STEPS",
    "BATCH",
    "SEQ_LEN",
    "CHECKPOINT_EVERY",
    "WORLD_SIZE",
    "TOY_SHAPE",
    "KNOWN_VOCAB",
    "rehearsal",
    "rehearsal_train",
    "rehearsal_proxy",
    "rehearsal_data",
    "rehearsal_tokenizer",
    "declared_vocab",
    "launch_train",
    "Rehearsal",
    "rehearse_run",
    "write_rehearsal",
    "meta_counts",
    "timed",
    "describe_counts",
]

# The shrink (one place; the module docstring says what each keeps).
TRIALS = 3  # search trials (2 random, then 1 from the recipe's sampler)
PROXY_STEPS = 4  # proxy training steps per task
PROXY_EXAMPLES = 64  # proxy training examples per task (validation and test: a quarter)
STEPS = 16  # optimiser steps of each training
BATCH = 4  # sequences per step
SEQ_LEN = 32  # tokens per sequence
CHECKPOINT_EVERY = 2  # steps between sharded checkpoints
WORLD_SIZE = 2  # training processes (FSDP over gloo)
TOY_SHAPE = "tiny"  # the width of every trained model
BPE_VOCAB = 512  # bpe:N recipes train bpe:512 on the toy data
# Held-out share of the data: the shipped corpus has 120 passages, and at the recipes' 2% some
# seeds hold none of them out (the split hashes each document with the seed).
VAL_FRACTION = 0.1
MAX_SEEDS = 2  # train_seeds and rescore_top are capped here (rescore_seeds at 1)
LM_EVAL_TASK = "hc_rehearsal_mc"  # the local task each lm-eval task becomes
LM_EVAL_DIR = "lm_eval_tasks"  # its YAML, in the run folder

# Vocabulary sizes of tokenizers the recipes declare, so that the full target is counted
# without downloading them: Llama 3's BPE (128,000 merges + 256 special tokens).
KNOWN_VOCAB: dict[str, int] = {PAPER_TOKENIZER: 128_256}

_LM_EVAL_YAML = """\
# A local multiple-choice task written by a rehearsal (hcomposer.pipeline.rehearse).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def rehearsal_data(data: str | None) -> str | None:
    """The toy twin of a training source: a Hub dataset becomes the shipped Parquet corpus,
    streamed alike; the embedded corpus (None) and local paths stay."""
    if data is not None and data.startswith("hf:") and not Path(data[3:]).exists():
        return f"hf:{rehearsal_assets()[0]}"
    return data


def rehearsal_tokenizer(tokenizer: str) -> str:
    """The toy twin of a tokenizer spec: ``bpe:N`` -> ``bpe:512``; a Hub or file
    ``tokenizer.json`` -> the shipped one; ``byte`` stays."""
    if tokenizer.startswith("bpe:"):
        return f"bpe:{BPE_VOCAB}"
    if tokenizer == "byte":
        return tokenizer
    return str(rehearsal_assets()[1])


def rehearsal_train(cfg: TrainConfig, *, fsdp: bool = False) -> TrainConfig:
    """``cfg`` shrunk to :data:`STEPS` steps at :data:`BATCH` x :data:`SEQ_LEN` on the CPU
    (fp32), its data and tokenizer replaced by their toy twins, at least :data:`VAL_FRACTION`
    held out; optimiser, schedule kind and weight decay kept."""
    # As many micro-steps as the recipe's, up to what each process's share of the batch
    # allows (the paper's 4 becomes 2): accumulation is rehearsed where the recipe has it.
    per_rank = BATCH // WORLD_SIZE
    accum = max(a for a in range(1, cfg.grad_accum + 1) if per_rank % a == 0)
    return cfg.replace(
        tokens=STEPS * BATCH * SEQ_LEN, batch_size=BATCH, seq_len=SEQ_LEN, grad_accum=accum,
        warmup=2, eval_every=STEPS // 2, eval_tokens=8 * SEQ_LEN, log_every=1,
        checkpoint_every=CHECKPOINT_EVERY, dtype="fp32", device="cpu", compile=False,
        fsdp=fsdp, threads=1, batch_threads=1, data=rehearsal_data(cfg.data),
        val_fraction=max(cfg.val_fraction, VAL_FRACTION),
        tokenizer=rehearsal_tokenizer(cfg.tokenizer),
    )  # fmt: skip


def rehearsal_proxy(cfg: ProxyConfig | None) -> ProxyConfig:
    """A proxy config (None: the defaults) trained :data:`PROXY_STEPS` steps on small sets."""
    cfg = cfg or ProxyConfig()
    n = PROXY_EXAMPLES
    tasks = tuple(
        t.replace(num_train_examples=n, num_val_examples=n // 4, num_test_examples=n // 4)
        for t in cfg.mad_tasks
    )
    return cfg.replace(
        steps=PROXY_STEPS, batch_size=8, eval_batch_size=16, check_every=0, patience=0,
        restarts=0, mad_tasks=tasks, text_tokens=4096, text_seq_len=SEQ_LEN,
    )  # fmt: skip


def _rehearsal_eval(ev: EvalConfig, lm_eval_dir: Path) -> EvalConfig:
    parts, has_lm_eval = [], False
    for part in ev.suites:
        if part.startswith("lm-eval"):
            has_lm_eval = True
            continue
        parts.append(part)
    if has_lm_eval:
        parts.append(f"lm-eval:{LM_EVAL_TASK}")
    return ev.replace(
        suites=tuple(parts),
        niah=ev.niah.replace(lengths=(256,), depths=(0.5,), trials=1, max_new_tokens=4),
        mqar=ev.mqar.replace(lengths=(64,), steps=PROXY_STEPS, batch_size=8, dtype="fp32",
                             num_train_examples=PROXY_EXAMPLES, num_test_examples=16),
        efficiency=dataclasses.replace(
            ev.efficiency, contexts=(SEQ_LEN,), min_len=SEQ_LEN, max_len=2 * SEQ_LEN,
            bandwidth_probe_mib=1, decode_steps=2, train_batch=2, repeats=1, max_seconds=5.0,
            device="cpu",
        ),
        mad=rehearsal_proxy(ev.mad),
        lm_eval_batch_size=4,
        lm_eval_include=str(lm_eval_dir) if has_lm_eval else None,
    )  # fmt: skip


def rehearsal(recipe: Recipe, lm_eval_dir: str | Path) -> Recipe:
    """The toy twin of ``recipe`` (see the module docstring); its lm-eval tasks are read from
    ``lm_eval_dir`` (written by :func:`write_lm_eval_task`)."""
    s = recipe.search
    startup = None if s.n_startup is None else min(s.n_startup, TRIALS - 1)
    search = s.replace(
        trials=TRIALS, n_startup=startup, proxy_config=rehearsal_proxy(s.proxy_config),
        workers=min(s.workers, 2), storage=None,
    )  # fmt: skip
    return recipe.replace(
        name=f"{recipe.name}-rehearsal", search=search, target_shape=TOY_SHAPE,
        train=rehearsal_train(recipe.train, fsdp=True),
        eval=_rehearsal_eval(recipe.eval, Path(lm_eval_dir)),
        train_seeds=min(recipe.train_seeds, MAX_SEEDS),
        rescore_top=min(recipe.rescore_top, MAX_SEEDS),
        rescore_seeds=min(recipe.rescore_seeds, 1),
    )  # fmt: skip


def write_lm_eval_task(folder: Path) -> Path:
    """The local multiple-choice task (YAML naming the shipped JSON Lines file) in ``folder``."""
    data = rehearsal_assets()[0].parent / "lm_eval" / f"{LM_EVAL_TASK}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{LM_EVAL_TASK}.yaml", _LM_EVAL_YAML.format(task=LM_EVAL_TASK,
                      data=data))  # fmt: skip
    return folder


def declared_vocab(tokenizer: str, data: str | None = None) -> tuple[int | None, str]:
    """``(vocabulary size, where it came from)`` of a recipe's tokenizer, without downloading:
    byte and files load, ``bpe:N`` has N, Hub tokenizers come from :data:`KNOWN_VOCAB` (an
    unknown one: None, the target shape's preset vocabulary is used)."""
    if tokenizer == "byte":
        return ByteTokenizer().vocab_size, "the byte tokenizer"
    if tokenizer.startswith("bpe:"):
        return int(tokenizer[4:]), f"{tokenizer}: the size it is trained to"
    if tokenizer in KNOWN_VOCAB:
        return KNOWN_VOCAB[tokenizer], f"{tokenizer}: its declared size (not downloaded)"
    if not tokenizer.startswith("hf:") and Path(tokenizer).exists():
        return get_tokenizer(tokenizer).vocab_size, f"{tokenizer} (loaded)"
    return None, f"{tokenizer}: unknown without downloading; the shape preset's vocabulary"


@dataclasses.dataclass(frozen=True)
class _Vocab:
    """A tokenizer's size, all ``target_architecture`` reads of it."""

    vocab_size: int


def _launch(arch_json: Path, cfg_json: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(WORLD_SIZE), "-m", "hcomposer.pipeline.launch", str(arch_json), str(cfg_json),
            str(out)]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_all(pid: int, deadline: float) -> None:
    """SIGKILL ``pid`` (torchrun) and every process under it, and wait until they are gone:
    torchrun starts each rank in its own session, out of reach of a signal to its group, and
    a killed rank holds the run folder's lock until it has exited."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=max(deadline - time.monotonic(), 1.0))
    if alive:
        raise RuntimeError(f"the killed training's processes {[p.pid for p in alive]} did not exit")


def _kill_after_first_checkpoint(cmd: list[str], out: Path, timeout: float) -> int:
    """Start ``cmd``; SIGKILL it (torchrun and every rank) once a checkpoint exists; return
    the checkpoint's step."""
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    state = RunDir(out).checkpoint / "state.json"
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise RuntimeError(f"training ended (rc {proc.returncode}) before it could be killed "
                           f"after its first checkpoint: {err}")  # fmt: skip
    _kill_all(proc.pid, deadline)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    if not state.is_file():
        raise RuntimeError(f"no checkpoint in {out} within {timeout:.0f}s")
    return int(read_state(usable_checkpoint(out))["step"])


def launch_train(
    arch: Architecture, cfg: TrainConfig, out: str | Path, *, kill: bool, timeout: float = 300
) -> tuple[TrainResult, dict[str, Any]]:
    """Train ``arch`` on :data:`WORLD_SIZE` processes (torchrun, ``--fsdp`` as ``cfg`` says);
    with ``kill``, SIGKILL them after the first checkpoint and launch again, which must go on
    from it to the end. Returns the result and what was exercised."""
    out = Path(out)
    launch = out.parent / f".{out.name}.launch"
    launch.mkdir(parents=True, exist_ok=True)
    atomic_write_json(launch / "architecture.json", arch.to_dict())
    atomic_write_text(launch / "train.json", cfg.to_json())
    cmd = _launch(launch / "architecture.json", launch / "train.json", out)
    seen: dict[str, Any] = {"processes": WORLD_SIZE, "fsdp": cfg.fsdp}
    if kill:
        seen["killed_at_step"] = _kill_after_first_checkpoint(cmd, out, timeout)
        seen["status_after_kill"] = read_json(RunDir(out).status_json)["status"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        # The ranks' own tracebacks, not torchrun's summary of them.
        atomic_write_text(launch / "stderr.log", done.stderr)
        lines = [ln for ln in done.stderr.splitlines() if not ln.startswith(("W1", "E1", "I1"))]
        raise RuntimeError(f"training {arch.pattern} on {WORLD_SIZE} processes failed "
                           f"(rc {done.returncode}; {launch / 'stderr.log'}): "
                           + "\n".join(lines[:60]))  # fmt: skip
    summary = read_json(RunDir(out).summary_json)
    fields = {f.name for f in dataclasses.fields(TrainResult)}
    result = TrainResult(**{k: v for k, v in summary.items() if k in fields})
    result = dataclasses.replace(result, out_dir=Path(result.out_dir))
    ckpt = read_state(usable_checkpoint(out))
    steps = sorted({r["step"] for r in read_jsonl(RunDir(out).metrics) if "loss" in r})
    seen.update(final_step=result.step, checkpoint_world_size=ckpt.get("world_size"),
                checkpoint_format=ckpt.get("format"), logged_steps=len(steps))  # fmt: skip
    if kill and not (seen["killed_at_step"] < result.step == cfg.total_steps == ckpt["step"]):
        raise RuntimeError(f"the resumed training did not continue to the end: {seen}")
    if steps != list(range(1, cfg.total_steps + 1)):
        raise RuntimeError(f"training logged steps {steps}, not 1..{cfg.total_steps}")
    return result, seen


class Rehearsal:
    """What ``run_pipeline`` calls in a rehearsal: ``fit`` (training on two processes, the
    first one killed and resumed) and ``target`` (the full recipe's target on the meta
    device). ``trainings`` records what each training exercised."""

    def __init__(self, full: Recipe):
        self.full = full
        self.trainings: dict[str, dict[str, Any]] = {}

    def fit(self, arch: Architecture, cfg: TrainConfig, out_dir, **options) -> TrainResult:
        """The first training on two processes, killed and resumed; the others in this
        process, as ``hcomposer run`` trains (each torchrun start costs more than the toy
        training itself)."""
        if not self.trainings:
            result, seen = launch_train(arch, cfg, out_dir, kill=True)
        else:
            result = train(arch, cfg.replace(fsdp=False), out_dir, **options)
            seen = {"processes": 1, "steps": result.step}
        self.trainings[Path(out_dir).name] = seen
        return result

    def target(self, searched: str, out: Path) -> dict[str, Any]:
        """The ``target`` stage; it also writes the evaluation's local lm-eval task into the
        run folder (``out``), which exists by now."""
        write_lm_eval_task(out / LM_EVAL_DIR)
        vocab, source = declared_vocab(self.full.train.tokenizer, self.full.train.data)
        tok = None if vocab is None else _Vocab(vocab)
        arch, _, params = target_on_meta(self.full, searched, tok)
        base_pattern, _ = matched_baseline(params, arch.shape)
        _, base_params = meta_model(Architecture(pattern=base_pattern, shape=arch.shape))
        # The winner's count depends on the search; the Llama-style (AF)*n at the target's
        # depth and shape does not (paper: Llama-3.2-1B, 1,235,814,400).
        reference = "AF" * max(len(arch.layers) // 2, 1)
        _, ref_params = meta_model(Architecture(pattern=reference, shape=arch.shape))
        return {
            "device": "meta", "shape": self.full.target_shape, "layers": len(arch.layers),
            "vocab_size": arch.shape.vocab_size, "vocab_from": source,
            "composite": arch.pattern, "composite_params": params,
            "baseline": base_pattern, "baseline_params": base_params,
            "reference": reference, "reference_params": ref_params,
        }  # fmt: skip


def _exercised(name: str, st: dict, toy: Recipe, rehearsal: Rehearsal) -> str:
    s = st.get(name, {})
    if name == "search":
        c = toy.search
        return (f"{s.get('n_trials')} trials ({c.sampler}, {c.workers} worker(s)) of proxy "
                f"{c.proxy} over {c.layers} positions of {'/'.join(c.primitives)}")  # fmt: skip
    if name == "target":
        return (f"full target on the meta device: {s['layers']} sublayers at {s['shape']}, "
                f"vocabulary {s['vocab_size']:,} ({s['vocab_from']}); composite "
                f"{s['composite_params']:,} parameters, matched baseline {s['baseline']} "
                f"{s['baseline_params']:,}, (AF)*{len(s['reference']) // 2} "
                f"{s['reference_params']:,}")  # fmt: skip
    if name.startswith("train_"):
        seen = rehearsal.trainings.get(name[len("train_") :].replace("_seed", "-seed"), {})
        return f"{s.get('pattern', '')} {toy.train.data or 'embedded corpus'}, {seen}"
    if name.startswith("eval_"):
        return f"suite {','.join(toy.eval.suites)}: {s}"
    plain = (str, int, float)
    return ", ".join(f"{k} {v}" for k, v in s.items() if k != "finished" and isinstance(v, plain))


def write_rehearsal(folder: Path, command: str, recipe: str, stages: list[dict], **extra) -> dict:
    """``rehearsal.json``: the command, the recipe, each stage (name, what it exercised, wall
    seconds) and their total."""
    total = sum(s["wall_seconds"] for s in stages)
    record = {"command": command, "recipe": recipe, "stages": stages,
              "wall_seconds": total, **extra}  # fmt: skip
    atomic_write_json(rehearsal_json(folder), stamp(record))
    return record


def rehearse_run(
    recipe: Recipe, out: Path, *, argv=None, progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """``hcomposer run --recipe R --rehearse``: every stage of ``recipe`` at toy size (see the
    module docstring); returns ``rehearsal.json``'s content."""
    toy = rehearsal(recipe, out / LM_EVAL_DIR)
    rehearsed = Rehearsal(recipe)
    t0 = time.perf_counter()
    state = run_pipeline(toy, out, argv=argv, progress=progress, say=say, rehearsal=rehearsed)
    walls = state.get("wall_seconds", {})
    stages = [
        {"stage": name, "exercised": _exercised(name, state["stages"], toy, rehearsed),
         "wall_seconds": round(walls.get(name, 0.0), 3)}
        for name in state["stages"]
    ]  # fmt: skip
    return write_rehearsal(out, "run", recipe.name, stages, shrunk_to=toy.to_dict(),
                           total_call_seconds=round(time.perf_counter() - t0, 3))  # fmt: skip


def meta_counts(archs: dict[str, Architecture], tokenizer: str, seq_len: int) -> dict[str, Any]:
    """Each full-size architecture of ``archs`` (name -> architecture) with the declared
    vocabulary of ``tokenizer``, built on the meta device: its exact parameter count."""
    vocab, source = declared_vocab(tokenizer)
    out: dict[str, Any] = {"device": "meta", "vocab_from": source, "models": {}}
    for name, arch in archs.items():
        if vocab is not None:
            arch = resolve_arch(arch, _Vocab(vocab), seq_len)
        _, params = meta_model(arch)
        out["models"][name] = {"pattern": arch.pattern, "d_model": arch.shape.d_model,
                               "vocab_size": arch.shape.vocab_size, "params": params}  # fmt: skip
    return out


def timed(stages: list[dict], name: str, fn: Callable[[], Any], what: Callable[[Any], str],
          details: bool = False):  # fmt: skip
    """Run one stage of a command's rehearsal, appending ``{stage, exercised, wall_seconds}``
    (and, with ``details``, its result under ``details``) to ``stages``; returns its result."""
    t0 = time.perf_counter()
    res = fn()
    wall = round(time.perf_counter() - t0, 3)
    stages.append({"stage": name, "exercised": what(res), "wall_seconds": wall,
                   **({"details": res} if details else {})})  # fmt: skip
    return res


def describe_counts(counted: dict[str, Any]) -> str:
    """One line of :func:`meta_counts`' result."""
    models = ", ".join(f"{m['pattern']} {m['params']:,}" for m in counted["models"].values())
    return f"full size on the meta device ({counted['vocab_from']}): {models}"
