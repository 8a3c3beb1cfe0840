"""Options declared from a config field (commands.options.add_fields) follow the field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hcomposer.cli import main
from hcomposer.commands import convert_cmd
from hcomposer.commands.options import add_fields
from hcomposer.convert.run import ConvertConfig
from hcomposer.fields import field_specs
from hcomposer.format import parse_count


def test_an_option_takes_the_fields_default_type_choices_and_help():
    p = argparse.ArgumentParser()
    add_fields(p, ConvertConfig, "to trials lr freeze_mlp")
    assert vars(p.parse_args([])) == {"to": "S", "trials": 8, "lr": 1e-3, "freeze_mlp": False}
    a = p.parse_args(["--trials", "3", "--lr", "0.5", "--freeze-mlp", "--to", "D"])
    assert (a.trials, a.lr, a.freeze_mlp, a.to) == (3, 0.5, True, "D")
    assert type(a.trials) is int and type(a.lr) is float
    for bad in (["--to", "X"], ["--trials", "1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    assert helps == {n: field_specs(ConvertConfig)[n].help for n in helps}
    with pytest.raises(ValueError, match="teacher"):
        add_fields(p, ConvertConfig, "teacher")  # required field: no default to offer


def test_convert_options_agree_with_the_config_they_set():
    p = argparse.ArgumentParser()
    convert_cmd.add_arguments(p)
    defaults = vars(p.parse_args(["t", "--out", "o"]))
    declared = {f.name: f.default for f in dataclasses.fields(ConvertConfig)}
    shared = {n: d for n, d in declared.items() if n in defaults and d is not dataclasses.MISSING}
    assert len(shared) >= 20
    # Token counts are written as text (32K) and parsed by the command.
    given = {n: parse_count(v) if isinstance(v, str) and n.endswith("tokens") else v
             for n, v in defaults.items()}  # fmt: skip
    assert {n: given[n] for n in shared} == shared


def test_a_value_outside_the_fields_range_exits_2(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["convert", str(tmp_path), "--keep", "1", "--out", str(out), "--temperature", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature" in err[0] and "above 0" in err[0]
    assert not out.exists()
