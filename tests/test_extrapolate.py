"""Extrapolation: stack/stretch known answers and invariants, depth for a parameter target, CLI."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.pattern import parse_pattern
from hcomposer.scaling.extrapolate import runs, scale_to_params, stack, stretch


def test_known_answers():
    assert stretch("AAFFFF", 12) == "AAAAFFFFFFFF"
    assert stack("AAFFFF", 12) == "AAFFFFAAFFFF"
    assert stretch("AAFFFF", 6) == "AAFFFF" == stack("AAFFFF", 6)
    # Composer's 16-position result 2A+5M+2A+3M+1A+3M stretched to 32: every run doubles.
    paper = "AAFFFFFAAFFFAFFF"
    out = stretch(paper, 32)
    assert out == "AAAAFFFFFFFFFFAAAAFFFFFFAAFFFFFF"
    assert [(s, n) for s, n in runs(out)] == [(s, 2 * n) for s, n in runs(paper)]
    assert len(runs(out)) == 6


def test_rounding_rule_hand_checked():
    # AAFFFF to 9: s = 1.5, exact 3 + 6 = 9, no rounding.
    assert stretch("AAFFFF", 9) == "AAAFFFFFF"
    # AAFFFF to 10: exact 3.33 + 6.67, ceil 4 + 7 = 11; surplus on A (0.67) > F (0.33): trim A.
    assert stretch("AAFFFF", 10) == "AAAFFFFFFF"
    # AFF to 4: exact 1.33 + 2.67 -> ceil 2 + 3 = 5; surplus 0.67 on A vs 0.33 on F -> trim A.
    assert stretch("AFF", 4) == "AFFF"
    # AF to 3: exact 1.5 + 1.5 -> 2 + 2; equal surplus and length -> trim the later run.
    assert stretch("AF", 3) == "AAF"
    # Stack remainder: AAFFFF to 28 = 4 blocks + AAFFFF shrunk to 4 (exact 1.33 + 2.67).
    assert stack("AAFFFF", 28) == "AAFFFF" * 4 + "AFFF"
    # A remainder shorter than the number of runs keeps the longest runs (earlier on ties).
    assert stack("AAFFFF", 13) == "AAFFFF" * 2 + "F"
    assert stack("AFAF", 5) == "AFAF" + "A"


def test_shrink_and_errors():
    assert stretch("AAAAFFFFFFFF", 6) == "AAFFFF"
    assert stack("AAFFFF", 4) == "AFFF"
    with pytest.raises(UserError, match="transition"):
        stretch("AFAF", 3)
    for bad in (0, -3):
        with pytest.raises(UserError, match=">= 1"):
            stretch("AF", bad)
        with pytest.raises(UserError, match=">= 1"):
            stack("AF", bad)


def test_groups_are_one_position():
    assert stretch("[A|S]FF", 6) == "[A|S][A|S]FFFF"
    assert stack("[A|S]F", 5) == "[A|S]F[A|S]F[A|S]"
    assert runs("[A|S][A|S]F") == [(("A", "S"), 2), (("F",), 1)]


_blocks = st.lists(st.sampled_from(["A", "F", "S", "[A|S]"]), min_size=1, max_size=16).map("".join)


@settings(max_examples=200, deadline=None)
@given(block=_blocks, L=st.integers(1, 200))
def test_stretch_invariants(block, L):
    rs = runs(block)
    if len(rs) > L:
        with pytest.raises(UserError):
            stretch(block, L)
        return
    out = runs(stretch(block, L))
    # Exactly L sublayers, the same runs in the same order (each at least one long).
    assert sum(n for _, n in out) == L
    assert [s for s, _ in out] == [s for s, _ in rs]
    s = L / len(parse_pattern(block))
    if s >= 1:
        # Growing: every run within one sublayer of its exact share.
        for (_, r), (_, n) in zip(rs, out):
            assert abs(n - r * s) < 1
    else:
        # Shrinking: a run that is longer in the block is never shorter in the output
        # by more than rounding allows.
        for (_, r), (_, n) in zip(rs, out):
            assert 1 <= n <= max(1, -(-r * L // len(parse_pattern(block))))


@settings(max_examples=200, deadline=None)
@given(block=_blocks, L=st.integers(1, 200))
def test_stack_invariants(block, L):
    layers = parse_pattern(block)
    out = parse_pattern(stack(block, L))
    q, r = divmod(L, len(layers))
    assert len(out) == L
    assert out[: q * len(layers)] == layers * q
    tail = out[q * len(layers) :]
    rs = runs(layers)
    if r >= len(rs):
        assert tail == parse_pattern(stretch(block, r))
    else:
        # Order kept: the tail is a subsequence of the block's run sequence.
        it = iter(s for s, _ in rs)
        assert all(any(x == y for y in it) for x in tail)


@pytest.mark.parametrize("strategy", ["stack", "stretch"])
def test_scale_to_params_is_the_closest_depth(strategy):
    target = 150_000
    arch = scale_to_params("AAFFFF", target, "tiny", strategy)
    assert arch.shape.name == "tiny"
    got = count_costs(arch).params_total
    from hcomposer.scaling.extrapolate import extrapolate

    # Independent check: count every depth around the answer with count_costs.
    gaps = {}
    for L in range(2, arch.n_sublayers + 6):
        a = Architecture.parse(extrapolate("AAFFFF", L, strategy), shape="tiny")
        gaps[L] = abs(count_costs(a).params_total - target)
    assert gaps[arch.n_sublayers] == abs(got - target) == min(gaps.values())


def test_scale_to_params_errors():
    with pytest.raises(UserError, match="positive"):
        scale_to_params("AF", 0, "tiny", "stack")
    with pytest.raises(UserError, match="wider"):
        scale_to_params("AF", 1e12, "tiny", "stack")
    with pytest.raises(UserError, match="strategy"):
        scale_to_params("AF", 1e6, "tiny", "zigzag")


def test_cli_layers_and_params(capsys):
    assert main(["scale", "AAFFFF", "--layers", "12", "--strategy", "stretch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pattern"] == "AAAAFFFFFFFF" and out["n_sublayers"] == 12
    assert out["strategy"] == "stretch" and out["params_total"] > 0
    assert main(["scale", "AAFFFF", "--layers", "12", "--shape", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == "AAFFFFAAFFFF"
    assert main(["scale", "AAFFFF", "--params", "150K", "--shape", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_target"] == 150_000
    expect = scale_to_params("AAFFFF", 150_000, "tiny", "stack")
    assert out["pattern"] == expect.pattern
    assert out["params_total"] == count_costs(expect).params_total


@pytest.mark.parametrize(
    "argv",
    [
        ["scale", "AAFFFF"],
        ["scale", "AAFFFF", "--layers", "4", "--params", "1M"],
        ["scale", "AAFFFF", "--layers", "0"],
        ["scale", "AAFFFF", "--layers", "x"],
        ["scale", "AAXF", "--layers", "8"],
        ["scale", "AAFFFF", "--params", "lots"],
        ["scale", "AAFFFF", "--params", "0"],
        ["scale", "AFAF", "--layers", "3", "--strategy", "stretch"],
    ],
)
def test_cli_bad_input(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
