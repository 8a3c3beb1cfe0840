"""The placement searches that train: ``greedy`` (Distill-then-Replace), ``optuna`` and
``gates`` (learned gates, ``convert.gates``).

Each probe is an ordinary training run of the one trainer in ``placement/<name>/`` (resumed
when it exists), so a killed search continues where it stopped; the Optuna study lives in
``placement/study.db`` (SQLite), where ``optuna-dashboard`` can read it. See ``placement`` for
what each strategy does and scores.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from hcomposer.convert.distill import Distillation
from hcomposer.convert.gates import GateSearch, gate_values
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.convert.placement import LocalDistillation, greedy_replacement, val_loss
from hcomposer.model import build_model
from hcomposer.training import load_run, train
from hcomposer.training.checkpoint import find_checkpoint, load_checkpoint

__all__ = ["greedy_keep", "optuna_keep", "gates_keep"]


def _probe(ctx, name: str, converted: list[int], make_objective, scale: int = 1):
    """Convert ``converted`` sublayers, train the probe ``name`` on ``make_objective`` for
    ``scale`` x the probe tokens."""
    config, teacher = ctx.config, ctx.teacher
    arch = student_architecture(teacher.arch, converted, config.to)
    student, _ = convert_model(
        teacher.model, arch, calib_tokens=ctx.calibration(), seed=config.seed
    )
    run = ctx.cd.probe(name)
    result = train(
        arch, config.train_config(scale * config.probe_tokens, ctx.tok_spec), run.root,
        resume=run.run_json.is_file(), progress=False, objective=make_objective(student),
    )  # fmt: skip
    return result, run


def greedy_keep(ctx) -> dict[str, Any]:
    """Local distillation of every layer's twin, then greedy replacement (``placement``)."""
    teacher, config = ctx.teacher, ctx.config
    attn = teacher.attention_layers
    twins = {}
    for j, i in enumerate(attn):

        def local(student, i=i):
            return LocalDistillation(teacher.model, student.state_dict(), i, {"to": config.to})

        _, run = _probe(ctx, f"layer-{j}", [i], local)
        model, _, _, _ = load_run(run.root)
        twins[i] = model.layers[i].mixer
    batches = ctx.val_batches()
    model = teacher.model.to(ctx.device)

    def score(m):
        return val_loss(m, batches)

    base = score(model)
    alone = {}
    for j, i in enumerate(attn):
        kept, steps = greedy_replacement(model, [i], {i: twins[i]}, 0, score, config.to)
        alone[str(j)] = steps[0]["val_loss"] - base
    kept, steps = greedy_replacement(model, attn, twins, config.keep, score, config.to)
    order = [attn.index(s["replaced"]) for s in steps]
    return {
        "strategy": "greedy",
        "keep": kept,
        "scores": alone,
        "score_meaning": "validation-loss increase when this attention layer alone is replaced "
        "by its locally distilled twin",
        "teacher_val_loss": base,
        "replacement_order": order,
        "steps": [{"replaced": o, "val_loss": s["val_loss"]} for o, s in zip(order, steps)],
    }


def optuna_keep(ctx) -> dict[str, Any]:
    """TPE over keep-sets; each trial a short distillation scored by validation loss.

    ``config.trials`` distinct keep-sets are probed: a keep-set drawn again is told its known
    loss at no cost (TPE still learns from it) and does not count. TPE's random start is a
    third of the trials (at most its default 10), so a short study still models the rest.
    """
    teacher, config, cd = ctx.teacher, ctx.config, ctx.cd
    attn = teacher.attention_layers
    n, k = len(attn), config.keep
    cd.placement_dir.mkdir(parents=True, exist_ok=True)
    startup = max(1, min(10, config.trials // 3))
    study = optuna.create_study(
        study_name="placement",
        storage=f"sqlite:///{cd.study_db}",
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=startup),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = _keep_set_objective(ctx, n, k)
    # At most math.comb(n, k) distinct keep-sets exist; the attempts are capped all the same.
    want = min(config.trials, math.comb(n, k))
    for _ in range(50 * want):
        if len(_probed(study)) >= want:
            break
        study.optimize(objective, n_trials=1)
    probed = _probed(study)
    scores = {}
    for j in range(n):
        with_j = [v for key, v in probed.items() if j in key]
        without = [v for key, v in probed.items() if j not in key]
        if with_j and without:
            scores[str(j)] = sum(with_j) / len(with_j) - sum(without) / len(without)
    best = min(probed, key=probed.get)
    return {
        "strategy": "optuna",
        "keep": list(best),
        "scores": scores,
        "score_meaning": "mean validation loss of the probed keep-sets keeping this layer minus "
        "that of those converting it (negative: keeping it helps)",
        "trials": [{"keep": list(key), "val_loss": v} for key, v in probed.items()],
        "attempts": len(study.trials),
    }


def _probed(study) -> dict[tuple[int, ...], float]:
    """Keep-set -> validation loss, for the trials that trained (not the repeats)."""
    done = optuna.trial.TrialState.COMPLETE
    return {
        tuple(t.user_attrs["keep"]): t.value
        for t in study.trials
        if t.state == done and t.user_attrs.get("probed")
    }


def _keep_set_objective(ctx, n: int, k: int):
    teacher, config, attn = ctx.teacher, ctx.config, ctx.teacher.attention_layers

    def objective(trial: optuna.Trial) -> float:
        # A priority per layer, the k highest kept: any keep-set is reachable, and TPE models
        # each layer's priority on its own.
        prio = [trial.suggest_float(f"priority_{j}", 0.0, 1.0) for j in range(n)]
        keep = sorted(sorted(range(n), key=lambda j: -prio[j])[:k])
        trial.set_user_attr("keep", keep)
        known = _probed(trial.study)
        if tuple(keep) in known:
            trial.set_user_attr("probed", False)
            return known[tuple(keep)]
        converted = [a for j, a in enumerate(attn) if j not in keep]
        info = {"converted": converted, "to": config.to}

        def full(student):
            state = student.state_dict()
            return Distillation(teacher.model, state, config.distill(), info, teacher.tokenizer)

        result, _ = _probe(ctx, f"trial-{trial.number}", converted, full)
        trial.set_user_attr("probed", True)
        return float(result.val_loss) if result.val_loss is not None else math.inf

    return objective


def gates_keep(ctx) -> dict[str, Any]:
    """Train the gated super-network (``convert.gates``); keep the ``k`` highest gates."""
    teacher, config = ctx.teacher, ctx.config
    attn = teacher.attention_layers
    made = {}

    def gated(student):
        info = {"to": config.to}
        made["objective"] = GateSearch(
            teacher.model, student.state_dict(), attn, config.distill(), config.gate_penalty,
            info, recall=ctx.recall, recall_weight=config.gate_recall_weight if ctx.recall else 0,
        )  # fmt: skip
        return made["objective"]

    # One run as long as greedy's probes together (one per attention layer): the same budget.
    result, run = _probe(ctx, "gates", attn, gated, scale=len(attn))
    # The trained gates, read back through the trainer's own checkpoint loader.
    model = build_model(run.read_architecture(), device="cpu")
    made["objective"].prepare(model, "cpu")
    load_checkpoint(find_checkpoint(run.root), model, restore_rng=False)
    values = gate_values(model.state_dict(), attn)
    order = sorted(range(len(attn)), key=lambda j: -values[attn[j]])
    return {
        "strategy": "gates",
        "keep": sorted(order[: config.keep]),
        "scores": {str(j): values[a] for j, a in enumerate(attn)},
        "score_meaning": "learned gate g toward attention (1) or its converted twin (0) after "
        f"{result.tokens:,} tokens with penalty {config.gate_penalty:g} x mean(g)"
        + (f", recall weight {config.gate_recall_weight:g}" if ctx.recall else ""),
        "val_loss": result.val_loss,
    }
