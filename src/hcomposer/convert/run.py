"""``hcomposer convert``: teacher -> placement -> converted student -> distillation -> report.

Every check that can fail on bad input (the teacher folder, the keep-set, the layer indices,
the tokenizer's vocabulary against the teacher's, an existing folder without ``--resume``)
runs before anything is written. The folder's files are ``runs.ConvertDir``'s; the student is
an ordinary training run (``student/``) that ``hcomposer eval`` and ``hcomposer export`` read.
A killed conversion resumes with ``--resume``: a finished placement is read back, the Optuna
study and each probe run continue, the distillation resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from hcomposer.config_io import Config
from hcomposer.convert.distill import Distillation, DistillConfig
from hcomposer.convert.mapping import TARGETS, convert_model, describe, student_architecture
from hcomposer.convert.placement import STRATEGIES, even_keep, val_loss
from hcomposer.convert.recall import RecallData
from hcomposer.convert.search import gates_keep, greedy_keep, optuna_keep
from hcomposer.convert.teacher import Teacher, load_teacher
from hcomposer.data import get_tokenizer, prepare_dataset
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.io import atomic_write_json, atomic_write_text, read_json
from hcomposer.runs import ConvertDir
from hcomposer.training import TrainConfig, train, vocab_for
from hcomposer.training.step import DTYPES, resolve_device

__all__ = ["ConvertConfig", "convert", "parse_layers"]


@dataclass(frozen=True, kw_only=True)
class ConvertConfig(Config):
    """Everything that decides a conversion. Frozen, keyword-only, JSON round trip."""

    _what: ClassVar[str] = "convert config"

    teacher: str = spec(help="Hugging Face model folder or hcomposer run folder")
    to: str = spec("S", choices=TARGETS, help="what the converted attention layers become")
    init: str = spec(
        "attention", choices=("attention", "random"),
        help="converted mixers start from the attention weights (default) or fresh (ablation)",
    )  # fmt: skip
    keep: int = spec(ge=0, le=2**16, help="attention layers kept")
    layers: str = spec("", help="kept attention layers, e.g. '0,3' (empty: the strategy picks)")
    strategy: str = spec(
        "even", choices=STRATEGIES,
        help="how the kept layers are chosen. even: spread evenly; greedy: Distill-then-Replace; "
        "optuna: TPE over keep-sets; gates: learned gates between attention and its twin "
        "(FlashMorph-style)",
    )  # fmt: skip
    trials: int = spec(8, ge=1, le=10_000, help="optuna: keep-sets tried")
    gate_penalty: float = spec(0.05, ge=0, le=1e6, help="gates: weight of mean(g)")
    gate_recall_weight: float = spec(
        0.0, ge=0, le=1e6,
        help="gates: also train the gates on MAD in-context recall, this weight x its LM loss "
        "(default 0: on the distillation text only)",
    )  # fmt: skip
    gate_recall_offset: int = spec(
        0, ge=0, le=2**31,
        help="gates: the recall's 16 tokens become ids OFFSET..OFFSET+15 of the teacher's "
        "vocabulary (ids the teacher recalls with)",
    )  # fmt: skip
    probe_tokens: int = spec(32_768, ge=1, cap="tokens", unit="tokens", help="tokens per probe")
    tokens: int = spec(1_000_000, ge=1, cap="tokens", unit="tokens", help="distillation tokens")
    seq_len: int = spec(256, ge=1, le=2**24, unit="tokens", help="training sequence length")
    batch_size: int = spec(16, ge=1, le=2**20, help="sequences per optimiser step")
    lr: float = spec(1e-3, gt=0, le=10.0, help="peak learning rate")
    data: str | None = spec(None, help="text, token shards or hf:NAME (None: embedded corpus)")
    tokenizer: str | None = spec(None, help="byte, bpe:N or tokenizer.json (None: teacher's)")
    seed: int = spec(0, ge=0, le=MAX_SEED, help="data order and fresh weights")
    device: str = spec("auto", help="auto, cpu, cuda, cuda:N")
    eval_tokens: int = spec(16_384, ge=1, le=10**12, unit="tokens", help="validation tokens")
    eval_every: int = spec(0, ge=0, le=2**40, unit="steps", help="validate every N steps (0: end)")
    dtype: str = spec("fp32", choices=DTYPES, help="distillation's autocast dtype")
    temperature: float = spec(2.0, gt=0, le=100.0, help="KL temperature")
    kl_weight: float = spec(1.0, ge=0, le=1e6, help="weight of the KL term")
    lm_weight: float = spec(0.1, ge=0, le=1e6, help="weight of the LM loss")
    hidden_weight: float = spec(0.0, ge=0, le=1e6, help="weight of the per-sublayer state MSE")
    freeze_mlp: bool = spec(False, help="keep F/E sublayers at the teacher's weights")

    def distill(self) -> DistillConfig:
        names = ("temperature", "kl_weight", "lm_weight", "hidden_weight", "freeze_mlp")
        return DistillConfig(**{n: getattr(self, n) for n in names})

    def train_config(self, tokens: int, tokenizer: str) -> TrainConfig:
        batch = max(1, min(self.batch_size, tokens // self.seq_len))
        return TrainConfig(
            tokens=max(tokens, batch * self.seq_len), batch_size=batch, seq_len=self.seq_len,
            lr=self.lr, min_lr=self.lr / 10, warmup=0.05, dtype=self.dtype,
            eval_every=self.eval_every, eval_tokens=self.eval_tokens, log_every=10,
            checkpoint_every=200, seed=self.seed,
            data=self.data, tokenizer=tokenizer, device=self.device, threads=None,
        )  # fmt: skip


def parse_layers(text: str, n: int) -> list[int]:
    """``"0,3"`` -> ``[0, 3]``, each an attention-layer index below ``n``."""
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise UserError(f"--keep-layers {text!r}: {part!r} is not a layer index") from None
        if not 0 <= i < n:
            raise UserError(
                f"--keep-layers: layer index {i} is out of range; the teacher has {n} attention "
                f"layers (0..{n - 1})"
            )
        if i in out:
            raise UserError(f"--keep-layers: layer {i} is listed twice")
        out.append(i)
    return sorted(out)


def _tokenizer_spec(teacher: Teacher, config: ConvertConfig) -> tuple[str, Any]:
    """The tokenizer the student trains with, checked against the teacher's vocabulary."""
    spec_ = config.tokenizer
    if spec_ is None:
        src = Path(teacher.source["path"])
        found = src / "tokenizer" / "tokenizer.json" if teacher.source["kind"] == "run" else None
        if teacher.source["kind"] == "hf":
            found = src / "tokenizer.json"
        if found is not None and found.is_file():
            spec_ = str(found)
        elif teacher.tokenizer is not None and teacher.tokenizer.kind == "byte":
            spec_ = "byte"
        else:
            raise UserError(
                f"teacher {str(src)!r} has no tokenizer.json; pass --tokenizer with its tokenizer"
            )
    tokenizer = get_tokenizer(spec_, source=config.data)
    vocab = teacher.arch.shape.vocab_size
    fits = tokenizer.vocab_size == vocab or vocab_for(tokenizer) == vocab
    mine = teacher.tokenizer
    if not fits or (mine is not None and mine.identity != tokenizer.identity):
        raise UserError(
            f"vocabulary mismatch: tokenizer {tokenizer.name!r} ({tokenizer.vocab_size} ids) is "
            f"not the teacher's ({vocab} ids); use the teacher's tokenizer"
        )
    return spec_, tokenizer


def _defaults(config: ConvertConfig) -> dict[str, Any]:
    """Every field's default (the required ones: ``config``'s values)."""
    return ConvertConfig(teacher=config.teacher, keep=config.keep).to_dict()


def _check_request(cd: ConvertDir, config: ConvertConfig, resume: bool) -> None:
    if not cd.root.exists() or not any(cd.root.iterdir()):
        return
    stored = cd.read_request()
    if stored is None:
        raise UserError(
            f"--out {str(cd.root)!r} is not empty and holds no conversion; choose a new folder"
        )
    if not resume:
        raise UserError(
            f"--out {str(cd.root)!r} already holds a conversion; pass --resume to continue it"
        )
    # A field added since the conversion was started counts as its default.
    stored = {**_defaults(config), **stored}
    if stored != config.to_dict():
        differ = sorted(k for k in config.to_dict() if stored.get(k) != config.to_dict()[k])
        raise UserError(
            f"--resume: the conversion in {str(cd.root)!r} was started with other settings "
            f"({', '.join(differ)}); repeat the original options"
        )


def convert(
    config: ConvertConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Run a conversion into ``out`` (see the module docstring); returns the summary."""
    cd = ConvertDir(out)
    _check_request(cd, config, resume)
    teacher = load_teacher(config.teacher)
    n = len(teacher.attention_layers)
    if config.keep > n:
        raise UserError(f"--keep {config.keep} is larger than the teacher's {n} attention layers")
    chosen = parse_layers(config.layers, n)
    if config.layers and len(chosen) != config.keep:
        raise UserError(f"--keep {config.keep} but --keep-layers lists {len(chosen)} layers")
    tok_spec, tokenizer = _tokenizer_spec(teacher, config)
    recall = None
    if config.gate_recall_weight and config.strategy != "gates":
        raise UserError("--gate-recall-weight trains the gates: it needs --strategy gates")
    if config.gate_recall_weight and not config.layers:
        vocab = teacher.arch.shape.vocab_size
        recall = RecallData(config.seed, config.gate_recall_offset, vocab)
    # Nothing was written before this line.
    # Written once: a resumed conversion keeps the command line it was started with.
    if not cd.request.is_file():
        cd.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cd.request, config.to_dict())
    if not cd.run_json.is_file():
        cd.record({"convert": config.to_dict(), "teacher": teacher.source}, argv)
    dataset = prepare_dataset(config.data, tokenizer, None, 0.02, config.seed)
    ctx = _Context(config, cd, teacher, tok_spec, dataset, progress)
    ctx.recall = recall
    placement = _placement(ctx, chosen)
    converted = [a for j, a in enumerate(teacher.attention_layers) if j not in placement["keep"]]
    student_arch = student_architecture(teacher.arch, converted, config.to)
    student, reports = convert_model(
        teacher.model, student_arch, init=config.init, calib_tokens=ctx.calibration(),
        seed=config.seed,
    )  # fmt: skip
    atomic_write_json(cd.conversion, {str(k): v for k, v in reports.items()})
    info = {"teacher": teacher.source, "converted": converted, "to": config.to}
    objective = Distillation(
        teacher.model, student.state_dict(), config.distill(), info, teacher.tokenizer
    )
    result = train(
        student_arch, config.train_config(config.tokens, tok_spec), cd.student.root,
        resume=cd.student.run_json.is_file(), progress=progress, argv=argv, objective=objective,
    )  # fmt: skip
    teacher_loss = ctx.teacher_val_loss()
    summary = {
        "teacher": teacher.source,
        "teacher_pattern": teacher.arch.pattern,
        "student_pattern": student_arch.pattern,
        "kept_attention_layers": placement["keep"],
        "strategy": placement["strategy"],
        "teacher_val_loss": teacher_loss,
        "student": result.to_dict(),
    }
    atomic_write_text(cd.report, _report(summary, placement, reports))
    return summary


class _Context:
    """What the placement strategies share: the teacher, data, folder and config."""

    def __init__(self, config, cd, teacher, tok_spec, dataset, progress):
        self.config, self.cd, self.teacher = config, cd, teacher
        self.tok_spec, self.dataset, self.progress = tok_spec, dataset, progress
        self.device = resolve_device(config.device)
        self.recall: RecallData | None = None  # gates: MAD recall data, when asked for

    def calibration(self) -> torch.Tensor:
        """A training batch (its own seed) to fit the converted mixers' gates and scales."""
        x, _ = self.dataset.batch_at(
            "train", 0, 8, min(self.config.seq_len, 256), seed=self.config.seed + 7919
        )
        return x

    def val_batches(self) -> list:
        """The windows the trainer validates the student on (its batch size and length)."""
        c = self.config.train_config(self.config.tokens, self.tok_spec)
        return list(self.dataset.eval_batches(c.batch_size, c.seq_len, c.eval_tokens))

    def teacher_val_loss(self) -> float:
        return val_loss(self.teacher.model.to(self.device), self.val_batches())


def _placement(ctx: _Context, chosen: list[int]) -> dict[str, Any]:
    cd, config = ctx.cd, ctx.config
    if cd.placement.is_file():
        return read_json(cd.placement)
    n = len(ctx.teacher.attention_layers)
    if config.layers:
        placement = {"strategy": "given", "keep": chosen, "scores": {}}
    elif config.strategy == "even":
        placement = {"strategy": "even", "keep": even_keep(n, config.keep), "scores": {}}
    elif config.strategy == "greedy":
        placement = greedy_keep(ctx)
    elif config.strategy == "gates":
        placement = gates_keep(ctx)
    else:
        placement = optuna_keep(ctx)
    atomic_write_json(cd.placement, placement)
    return placement


def _report(summary: dict, placement: dict, reports: dict) -> str:
    s = summary["student"]
    lines = [
        "# Conversion report",
        "",
        f"- teacher: `{summary['teacher']['path']}` ({summary['teacher_pattern']})",
        f"- student: `{summary['student_pattern']}`",
        f"- kept attention layers: {placement['keep']} (strategy `{placement['strategy']}`)",
        f"- distillation: {s['tokens']:,} tokens, {s['step']} steps, status {s['status']}",
        f"- validation loss: teacher {summary['teacher_val_loss']:.4f}, student "
        + ("-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"),
        "",
        "## Per-layer scores",
        "",
    ]
    scores = placement.get("scores") or {}
    if scores:
        lines += ["| attention layer | score |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores.items()]
    else:
        lines.append("(this strategy scores no layer)")
    lines += ["", "## Initialisation of the converted mixers", ""]
    lines += [f"- {line}" for line in describe(reports)]
    return "\n".join(lines) + "\n"
