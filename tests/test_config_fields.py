"""Each config field is declared once (``hcomposer.fields.spec``) and every way in agrees.

Every declared field of every config class gets its edge values -- just inside and just
outside each end of its range, a choice and a non-choice, a value of the wrong type -- through
the constructor, ``dataclasses.replace``, the class's ``.replace``, JSON (``from_dict`` of a
dict that went through ``json``) and, where a command has an option for it, the command line
(``hcomposer.cli.main``, exit code 2 on refusal). All of them give the same verdict: a value
outside the declaration is refused with the field's own message; a value inside it is never
refused for that field (a rule that spans several fields, such as ``min_lr <= lr``, may still
refuse it, and then every route refuses it alike).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
import typing

import pytest

from hcomposer import recipes
from hcomposer.cli import COMMANDS, main
from hcomposer.config_io import CONFIGS, Config
from hcomposer.convert.distill import DistillConfig
from hcomposer.convert.run import ConvertConfig
from hcomposer.data.mad import MADTaskConfig, default_task_config
from hcomposer.data.mqar import MQARConfig
from hcomposer.errors import UserError
from hcomposer.evaluation.mqar_curve import MQARCurveConfig
from hcomposer.evaluation.niah import NIAHConfig
from hcomposer.fields import FieldSpec, field_specs
from hcomposer.guards import _ARG_RANGES as ARG_RANGES
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.search.space import SearchConfig
from hcomposer.shapes import PRESETS, Shape
from hcomposer.training.trainer import TrainConfig

# One valid instance of every config class: the values the edges are set into.
BASES: dict[type, Config] = {
    Shape: PRESETS["tiny"],
    TrainConfig: TrainConfig(),
    ProxyConfig: ProxyConfig(),
    SearchConfig: SearchConfig(shape="tiny"),
    MADTaskConfig: default_task_config("in_context_recall"),
    MQARConfig: MQARConfig(),
    NIAHConfig: NIAHConfig(),
    MQARCurveConfig: MQARCurveConfig(),
    recipes.EvalConfig: recipes.EvalConfig(),
    recipes.Recipe: recipes.quickstart(),
    DistillConfig: DistillConfig(),
    ConvertConfig: ConvertConfig(teacher="teacher", keep=1),
}

# Environment variables that lift every cap, so that a range's own ends can be reached.
LIFTED = {env: str(10**18) for env in ("HCOMPOSER_MAX_TRIALS", "HCOMPOSER_MAX_SEARCH_LAYERS",
                                       "HCOMPOSER_MAX_TOKENS")}  # fmt: skip


def test_every_config_class_is_covered_and_every_field_declared():
    assert set(CONFIGS) == set(BASES), "a config class without a base instance in this test"
    for cls in CONFIGS:
        undeclared = [f.name for f in dataclasses.fields(cls) if f.name not in field_specs(cls)]
        assert not undeclared, f"{cls.__name__}: fields without a declaration: {undeclared}"


def _base_type(cls: type, name: str):
    """The field's annotation without its ``| None``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    return hint


def _is_int(cls: type, name: str, rules: FieldSpec) -> bool:
    hint = _base_type(cls, name)
    if rules.each:
        hint = typing.get_args(hint)[0]
    return hint is int


def _edges(cls: type, name: str, rules: FieldSpec) -> list[tuple[str, object]]:
    """(what, value) pairs: each end just inside and just outside, choices, a wrong type."""
    out: list[tuple[str, object]] = []
    whole = _is_int(cls, name, rules)
    step = (lambda v, d: v + d) if whole else (lambda v, d: math.nextafter(v, d * math.inf))
    if rules.ge is not None:
        out += [("at lowest", rules.ge), ("below lowest", step(rules.ge, -1))]
    if rules.gt is not None:
        out += [("just above open low end", step(rules.gt, 1)), ("open low end", rules.gt)]
    if rules.le is not None and rules.le != math.inf:
        out += [("at highest", rules.le), ("above highest", step(rules.le, 1))]
    if rules.lt is not None:
        out += [("just below open high end", step(rules.lt, -1)), ("open high end", rules.lt)]
    if whole:
        out = [(w, int(v)) for w, v in out]
    if rules.choices:
        out += [("a choice", rules.choices[0]), ("not a choice", "nosuch")]
    if rules.has_range and not whole:
        out.append(("not finite", math.inf))
    hint = _base_type(cls, name)
    # "no" for a flag, "x" for a number, 5 for text, a list or an object.
    out.append(("wrong type", "no" if hint is bool else "x" if hint in (int, float) else 5))
    return out


def _fill(base: Config, name: str, rules: FieldSpec, what: str, value: object) -> object:
    """The field's value holding ``value``: every element of a list-valued field."""
    if not rules.each or what == "wrong type":
        return value
    return tuple([value] * len(getattr(base, name) or (None,)))


def _routes(cls: type, base: Config, name: str, value: object):
    """(route, callable) for every way a value gets into a config."""
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    data = base.to_dict()
    if cls is recipes.Recipe and name == "eval":
        # pipeline.json holds the evaluation as eval_suites and eval_options, or as "eval".
        data = {k: v for k, v in data.items() if k not in ("eval_suites", "eval_options")}
    data = {**data, name: value}
    as_json = json.loads(json.dumps(data))
    return [
        ("constructor", lambda: cls(**{**kwargs, name: value})),
        ("dataclasses.replace", lambda: dataclasses.replace(base, **{name: value})),
        (".replace", lambda: base.replace(**{name: value})),
        ("from_dict", lambda: cls.from_dict(as_json)),
    ]


def _verdict(fn) -> str | None:
    """None when accepted, else the refusal's message (anything else but UserError fails)."""
    try:
        fn()
    except UserError as e:
        return str(e)
    return None


def _field_cases():
    for cls in BASES:
        for name, rules in field_specs(cls).items():
            if cls is recipes.EvalConfig and name == "efficiency":
                continue  # not a Config (evaluation.efficiency keeps its own checks)
            for what, value in _edges(cls, name, rules):
                yield pytest.param(cls, name, what, value, id=f"{cls.__name__}.{name}-{what}")


@pytest.mark.parametrize("cls,name,what,value", list(_field_cases()))
def test_every_route_gives_the_same_verdict(cls, name, what, value, monkeypatch):
    for env, v in LIFTED.items():
        monkeypatch.setenv(env, v)
    base = BASES[cls]
    rules = field_specs(cls)[name]
    value = _fill(base, name, rules, what, value)
    verdicts = {route: _verdict(fn) for route, fn in _routes(cls, base, name, value)}
    refused = {route: msg is not None for route, msg in verdicts.items()}
    assert len(set(refused.values())) == 1, f"routes disagree: {verdicts}"
    problem = rules.problem(value, name, "W")
    if what in ("wrong type", "not finite"):
        for msg in verdicts.values():
            assert msg is not None and f"field {name!r}" in msg and " must be " in msg, msg
    elif problem is not None:
        # Outside the declaration: refused everywhere with the field's own message.
        tail = problem[1:]
        for route, msg in verdicts.items():
            assert msg is not None and msg.endswith(tail), (route, msg, tail)
    else:
        # Inside: never refused by this field's rule (a rule across fields may refuse it).
        assert what in ("at lowest", "at highest", "a choice") or "just" in what
        for msg in verdicts.values():
            if msg is not None:
                assert not (f"field {name!r} must be" in msg or f"unknown {name} " in msg), msg
        if not any(refused.values()):
            built = cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(cls)},
                           name: value})  # fmt: skip
            assert cls.from_dict(json.loads(json.dumps(built.to_dict()))) == built


# ---------------------------------------------------------------- the command line


class _Reached(BaseException):
    """Raised by a stub of a command's work: the command line was accepted."""


def _reach(*args, **kwargs):
    raise _Reached


# Each command with options that set config fields: a minimal command line, and the work
# (module:attribute) that is stubbed so an accepted line stops before doing anything.
COMMAND_LINES: dict[str, tuple[list[str], list[str]]] = {
    "train": (["train", "AF", "--shape", "tiny", "--out", "{d}/o"],
              ["hcomposer.commands.train_cmd:train"]),
    "score": (["score", "AF", "--shape", "tiny", "--proxy", "mad:copy"],
              ["hcomposer.commands.score_cmd:evaluate_proxy"]),
    "search": (["search", "--proxy", "synthetic", "--shape", "tiny", "--out", "{d}/o"],
               ["hcomposer.commands.search_cmd:run_search"]),
    "run": (["run", "--out", "{d}/o"], ["hcomposer.commands.run_cmd:run_pipeline"]),
    "isoflop": (["isoflop", "AF", "AAFF", "--out", "{d}/o"],
                ["hcomposer.commands.isoflop_cmd:run_sweep",
                 "hcomposer.commands.isoflop_cmd:plan_sweep"]),
    "proxy-rank": (["proxy-rank", "--out", "{d}/o"],
                   ["hcomposer.commands.proxy_rank_cmd:run_proxy_rank"]),
    "eval": (["eval", "{d}/run", "--suite", "loss"], ["hcomposer.commands.eval_cmd:run"]),
    "aggregate": (["aggregate", "{d}/s"], ["hcomposer.commands.aggregate_cmd:run"]),
    "bench-search": (["bench-search", "--seeds", "1"],
                     ["hcomposer.commands.bench_search_cmd:run"]),
    "inspect": (["inspect", "AF", "--shape", "tiny"],
                ["hcomposer.commands.inspect_cmd:count_costs"]),
    "convert": (["convert", "{d}/t", "--keep", "1", "--out", "{d}/o"],
                ["hcomposer.commands.convert_cmd:convert"]),
}  # fmt: skip


def _option_fields() -> dict[str, dict[str, tuple[type, str]]]:
    out = {}
    for command, module in COMMANDS.items():
        mod = importlib.import_module(f"hcomposer.commands.{module}")
        if hasattr(mod, "option_fields"):
            out[command] = mod.option_fields()
    return out


OPTION_FIELDS = _option_fields()


def test_option_fields_name_declared_fields_and_no_range_is_written_twice():
    assert set(OPTION_FIELDS) == set(COMMAND_LINES), "a command missing from COMMAND_LINES"
    for command, fields in OPTION_FIELDS.items():
        for dest, (cls, name) in fields.items():
            assert name in field_specs(cls), f"{command} --{dest}: {cls.__name__}.{name}"
            # The declaration is the option's one rule: guards holds no second range for it.
            assert dest not in ARG_RANGES, f"{command} --{dest} has a range in guards too"


def _cli_cases():
    for command, fields in OPTION_FIELDS.items():
        for dest, (cls, name) in fields.items():
            rules = field_specs(cls)[name]
            for what, value in _edges(cls, name, rules):
                if what == "wrong type" and rules.choices is not None:
                    continue  # every option is text: a choice option has no wrong type
                yield pytest.param(
                    command, dest, cls, name, what, value, id=f"{command}--{dest}-{what}"
                )


def _run_cli(argv: list[str], stubs: list[str], monkeypatch, capsys) -> tuple[str, str]:
    for target in stubs:
        module, attr = target.split(":")
        monkeypatch.setattr(importlib.import_module(module), attr, _reach)
    capsys.readouterr()
    try:
        code = main(argv)
    except _Reached:
        return "accepted", ""
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err[-600:]}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return "refused", err.removeprefix("error: ")


@pytest.mark.parametrize("command,dest,cls,name,what,value", list(_cli_cases()))
def test_the_command_line_agrees_with_the_declaration(
    command, dest, cls, name, what, value, tmp_path, monkeypatch, capsys
):
    for env, v in LIFTED.items():
        monkeypatch.setenv(env, v)
    monkeypatch.setenv("HCOMPOSER_SKIP_MEMORY_CHECK", "1")
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rules = field_specs(cls)[name]
    flag = "--" + dest.replace("_", "-")
    line, stubs = COMMAND_LINES[command]
    argv = [a.replace("{d}", str(tmp_path)) for a in line] + [f"{flag}={value}"]
    verdict, msg = _run_cli(argv, stubs, monkeypatch, capsys)
    problem = rules.problem(value, flag)
    if what in ("wrong type", "not finite") or problem is not None:
        # Outside the declaration (or not a number): refused, naming the option.
        assert verdict == "refused" and flag in msg, msg
        if problem is not None and rules.choices is None:
            assert msg == problem
        # ... and the same value is refused by the config itself (JSON, constructor).
        base = BASES.get(cls) or cls()
        assert _verdict(lambda: base.replace(**{name: value})) is not None
    else:
        # Inside: the option's check lets it through; a rule across values may still refuse.
        assert verdict == "accepted" or f"field {name!r} must be" not in msg, msg


def test_lr_20_is_refused_alike_on_the_command_line_and_in_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = ["train", "AF", "--shape", "tiny", "--out", str(tmp_path / "o")]
    verdict, msg = _run_cli([*line, "--lr", "20"], ["hcomposer.commands.train_cmd:train"],
                            monkeypatch, capsys)  # fmt: skip
    assert verdict == "refused" and msg == "--lr must be above 0 and at most 10, got 20"
    with pytest.raises(UserError, match="field 'lr' must be above 0 and at most 10, got 20"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "lr": 20})
    with pytest.raises(UserError, match="field 'lr' must be above 0 and at most 10, got 20"):
        TrainConfig(lr=20, min_lr=0)
    verdict, _ = _run_cli([*line, "--lr", "10"], ["hcomposer.commands.train_cmd:train"],
                          monkeypatch, capsys)  # fmt: skip
    assert verdict == "accepted"
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "lr": 10}).lr == 10


@pytest.mark.parametrize(
    "cls,name,env,cap", [(SearchConfig, "trials", "HCOMPOSER_MAX_TRIALS", 100_000),
                         (SearchConfig, "layers", "HCOMPOSER_MAX_SEARCH_LAYERS", 1_024)],
)  # fmt: skip
def test_caps_hold_everywhere_and_lift_everywhere(cls, name, env, cap, monkeypatch):
    base = BASES[cls]
    # A search of more layers than the cap; each choice still fits the tiny shape.
    assert _verdict(lambda: base.replace(**{name: cap})) is None
    msg = _verdict(lambda: base.replace(**{name: cap + 1}))
    assert msg is not None and env in msg
    data = {**base.to_dict(), name: cap + 1}
    assert env in (_verdict(lambda: cls.from_dict(data)) or "")
    monkeypatch.setenv(env, str(cap + 1))
    assert _verdict(lambda: cls.from_dict(data)) is None


def test_proxy_config_is_typed_and_round_trips_in_its_old_form():
    cfg = SearchConfig(shape="tiny", proxy_config={"steps": 7, "lrs": [2e-3]})
    assert isinstance(cfg.proxy_config, ProxyConfig) and cfg.proxy_config.lrs == (2e-3,)
    # Stored as the fields that differ from the defaults, as search.json always held it.
    assert cfg.to_dict()["proxy_config"] == {"steps": 7, "lrs": [2e-3]}
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    same = SearchConfig(shape="tiny", proxy_config=ProxyConfig(steps=7, lrs=(2e-3,)))
    assert same == cfg and same.identity() == cfg.identity()
    # The defaults, however given, are one value: None, written {}.
    for given in (None, {}, ProxyConfig()):
        c = SearchConfig(shape="tiny", proxy_config=given)
        assert c.proxy_config is None and c.to_dict()["proxy_config"] == {}
    with pytest.raises(UserError, match="steps"):
        SearchConfig(shape="tiny", proxy_config={"steps": 0})
