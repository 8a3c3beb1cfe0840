"""The pattern language: parsing, printing, repeats, groups, Megatron, errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hcomposer.errors import PatternError, UserError
from hcomposer.pattern import (
    canonical,
    count_tokens,
    format_pattern,
    from_megatron,
    parse_pattern,
    to_megatron,
)


@pytest.mark.parametrize(
    "text, layers",
    [
        ("A", [("A",)]),
        ("AFWES", [("A",), ("F",), ("W",), ("E",), ("S",)]),
        ("[A|S]", [("A", "S")]),
        ("A[W|S]F", [("A",), ("W", "S"), ("F",)]),
        ("[A|W|S]E", [("A", "W", "S"), ("E",)]),
        ("(AF)*2", [("A",), ("F",), ("A",), ("F",)]),
        ("(A(SF)*2)*2", [("A",), ("S",), ("F",), ("S",), ("F",)] * 2),
        ("([A|S]F)*3W", [("A", "S"), ("F",)] * 3 + [("W",)]),
        (" A F\t[ A | S ]\n( E ) * 2 ", [("A",), ("F",), ("A", "S"), ("E",), ("E",)]),
        ("(AF) * 03", [("A",), ("F",)] * 3),
    ],
)
def test_parse(text, layers):
    assert parse_pattern(text) == layers
    # The canonical string parses back to the same list and prints to itself.
    c = format_pattern(layers)
    assert parse_pattern(c) == layers
    assert canonical(text) == c
    assert canonical(c) == c


def test_canonical_examples():
    assert canonical("(AF)*16") == "AF" * 16
    assert canonical("(A F) * 2 [A|S] F") == "AFAF[A|S]F"
    assert len(parse_pattern("(AF)*16")) == 32


def test_parse_accepts_a_list_of_sublayers():
    layers = [("A",), ("W", "S"), ("F",)]
    assert parse_pattern(layers) == layers


def test_count_tokens():
    counts = count_tokens(parse_pattern("(AF)*3[A|S]FE"))
    assert counts == {"A": 3, "F": 4, "[A|S]": 1, "E": 1}


@pytest.mark.parametrize("text", ["S*-S*-", "MEM*-", "M-M-M*-E", "*", "-E-E"])
def test_megatron_round_trip(text):
    text = text.replace("S", "M")
    layers = from_megatron(text)
    assert to_megatron(layers) == text
    assert from_megatron(to_megatron(format_pattern(layers))) == layers


def test_megatron_mapping():
    assert to_megatron("SAFE") == "M*-E"
    assert format_pattern(from_megatron("M-M*-")) == "SFSAF"
    assert to_megatron("(SF)*2") == "M-M-"


@pytest.mark.parametrize("text, bad", [("A[A|S]", 2), ("AW", 2)])
def test_megatron_rejects_what_it_cannot_express(text, bad):
    with pytest.raises(PatternError) as err:
        to_megatron(text)
    assert err.value.position == bad


def test_from_megatron_error_names_position():
    with pytest.raises(PatternError, match="position 3"):
        from_megatron("M-X")
    with pytest.raises(PatternError):
        from_megatron("  ")


@pytest.mark.parametrize(
    "text, position, char",
    [
        ("AXF", 2, "X"),
        ("AF?", 3, "?"),
        ("a", 1, "a"),
        ("A]F", 2, "]"),
        ("A|F", 2, "|"),
        ("[A|F]", 4, "F"),  # F cannot be a parallel branch
        ("[A|S", 1, "["),  # unclosed group: points at its start
        ("(AF", 1, "("),
        ("(AF)", 5, None),  # a repeat needs *k
        ("(AF)*x", 6, None),  # the message says a count is expected
        ("(AF)*0", 6, None),
        ("()*2", 1, None),
        ("[A]", 1, None),  # a group needs two branches
        ("AF)", 3, ")"),
        ("*", 1, "*"),
    ],
)
def test_errors_name_position_and_character(text, position, char):
    with pytest.raises(PatternError) as err:
        parse_pattern(text)
    e = err.value
    assert isinstance(e, UserError)
    assert e.position == position
    msg = str(e)
    assert f"position {position}" in msg
    assert "\n" not in msg
    if char is not None:
        assert repr(char) in msg
    # Every message lists the valid tokens.
    for tok in "AWFES":
        assert f"{tok} (" in msg


def test_axf_message_from_issue():
    with pytest.raises(PatternError) as err:
        parse_pattern("AXF")
    assert "position 2" in str(err.value) and "'X'" in str(err.value)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_is_an_error(text):
    with pytest.raises(PatternError):
        parse_pattern(text)


def test_huge_repeat_is_refused_not_expanded():
    with pytest.raises(PatternError, match="above the cap"):
        parse_pattern("((AF)*1000)*1000")


_ALPHABET = st.sampled_from(list("AWFES[]()|*0123456789 x\t-M"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(_ALPHABET, max_size=30).map("".join)))
def test_any_string_parses_or_raises_pattern_error(text):
    try:
        layers = parse_pattern(text)
    except PatternError as e:
        assert e.position is None or 1 <= e.position <= max(1, len(text) + 1)
        return
    c = canonical(text)
    assert c == format_pattern(layers)
    assert canonical(c) == c
    assert parse_pattern(c) == layers


_SUBLAYER = st.one_of(
    st.sampled_from("AWFES").map(lambda t: (t,)),
    st.lists(st.sampled_from("AWS"), min_size=2, max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SUBLAYER, min_size=1, max_size=20))
def test_format_parse_round_trip(layers):
    text = format_pattern(layers)
    assert parse_pattern(text) == layers
    # Wrapping in a repeat multiplies; whitespace between tokens changes nothing.
    assert parse_pattern(f"({text})*3") == layers * 3
    assert parse_pattern(" ".join(text)) == layers
