"""The command table: one name per concept, old names still accepted but not listed."""

from __future__ import annotations

import json

from hcomposer.cli import ALIASES, COMMANDS, main


def test_help_lists_new_names_not_aliases(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for old in ALIASES:
        assert f"    {old} " not in out and f"    {old}\n" not in out


def test_alias_runs_the_same_command(capsys):
    assert main(["score", "AF", "--proxy", "mad:bogus"]) == 2
    new = capsys.readouterr().err
    assert main(["evaluate", "AF", "--proxy", "mad:bogus"]) == 2
    old = capsys.readouterr().err
    assert new == old and "bogus" in new


def test_isoflop_and_its_old_name_plan_the_same(capsys):
    args = ["(AF)*n", "--dry-run", "--json"]
    assert main(["isoflop", *args]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(["scaling", *args]) == 0
    old = json.loads(capsys.readouterr().out)
    assert new == old
