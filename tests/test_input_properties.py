"""Property tests of the parsers and loaders: any input either parses or raises UserError --
never another exception -- and never runs past a time bound."""

from __future__ import annotations

import dataclasses
import json
import math
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_json_file
from hcomposer.errors import UserError
from hcomposer.pattern import format_pattern, parse_pattern
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.search.space import SearchConfig
from hcomposer.shapes import Shape, resolve_shape
from hcomposer.training.trainer import TrainConfig

SECONDS = 2.0
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Pattern text: mostly the language's own characters (so deep structures come up), plus
# look-alikes (superscript and Arabic digits, full-width letters) and anything at all.
PATTERN_CHARS = "AWFES()[]|*0123456789 \t\n²٣３ＡxD-"
patterns = st.one_of(
    st.text(alphabet=PATTERN_CHARS, max_size=300),
    st.text(max_size=60),
    st.builds(
        lambda body, n, k: f"({body})*{n}" * k,
        st.text(alphabet="AFWS", min_size=1, max_size=4),
        st.integers(0, 10**12),
        st.integers(1, 12),
    ),
)

# Values a hand-edited JSON file may hold: edge numbers, wrong types, nesting.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 2, 3, 4, 16, 64, 2**31, 2**40, 10**30]),
    st.sampled_from([0.0, -0.5, 0.5, 1e-3, 1e999, -1e999, math.nan, 1e300]),
    st.sampled_from(["", "x", "tiny", "proxy", "AF", "bf16", "cosine", "mad", "gp", "é", "A=1"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _field_dicts(cls) -> st.SearchStrategy[dict]:
    names = [f.name for f in dataclasses.fields(cls)]
    return st.dictionaries(st.sampled_from([*names, "preset", "format_version", "nosuch"]),
                           values, max_size=6)  # fmt: skip


def _bounded(fn, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except UserError:
        return None
    finally:
        assert time.perf_counter() - t0 < SECONDS, "ran past the time bound"


@SETTINGS
@given(patterns)
def test_pattern_parser_parses_or_refuses(text):
    layers = _bounded(parse_pattern, text)
    if layers is not None:
        assert parse_pattern(format_pattern(layers)) == layers  # the canonical form round-trips


@SETTINGS
@given(_field_dicts(Shape))
def test_shape_dicts_load_or_refuse(data):
    shape = _bounded(resolve_shape, data)
    if shape is not None:
        assert Shape.from_dict(shape.to_dict()) == shape


@SETTINGS
@given(st.one_of(_field_dicts(Shape), values))
def test_shape_files_load_or_refuse(tmp_path, data):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(data))
    _bounded(resolve_shape, str(path))


@SETTINGS
@given(st.binary(max_size=200))
def test_any_bytes_as_a_json_file_load_or_refuse(tmp_path, raw):
    path = tmp_path / "x.json"
    path.write_bytes(raw)
    _bounded(read_json_file, path, "config file")


@SETTINGS
@given(_field_dicts(TrainConfig))
def test_train_configs_load_or_refuse(data):
    cfg = _bounded(TrainConfig.from_dict, data)
    if cfg is not None:
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@SETTINGS
@given(st.one_of(_field_dicts(ProxyConfig), values))
def test_proxy_configs_load_or_refuse(data):
    cfg = _bounded(ProxyConfig.from_json, json.dumps(data))
    if cfg is not None:
        assert ProxyConfig.from_json(cfg.to_json()) == cfg


@SETTINGS
@given(_field_dicts(SearchConfig))
def test_search_configs_load_or_refuse(data):
    _bounded(SearchConfig.from_dict, data)


@SETTINGS
@given(
    st.one_of(
        st.fixed_dictionaries({"pattern": patterns, "shape": st.sampled_from(["tiny", "x", 5])}),
        st.dictionaries(st.sampled_from(["pattern", "shape", "layers", "format"]), values),
        values,
    )
)
def test_architectures_load_or_refuse(data):
    arch = _bounded(Architecture.from_json, json.dumps(data))
    if arch is not None:
        assert Architecture.from_json(arch.to_json()) == arch
