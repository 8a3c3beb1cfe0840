"""Config format versions, run-folder permissions, and a closed stdout pipe."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest

from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.config_io import FORMAT_VERSION, check_fields, load_config, migrate, stamp
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.runs import record_run
from hcomposer.shapes import Shape, resolve_shape


def test_written_configs_carry_the_version_and_unversioned_files_read_as_version_1(tmp_path):
    arch = Architecture.parse("(AF)*2", shape="tiny")
    data = arch.to_dict()
    assert data["format_version"] == FORMAT_VERSION == 1
    data.pop("format_version")  # a file written before versions existed
    assert Architecture.from_dict(data) == arch
    assert json.loads(ProxyConfig().to_json())["format_version"] == 1
    record_run(tmp_path, {"x": 1}, ["hcomposer"])
    assert json.loads((tmp_path / "run.json").read_text())["format_version"] == 1
    assert migrate({"a": 1}, "f") == {"a": 1} == migrate(stamp({"a": 1}), "f")


@pytest.mark.parametrize("version", [2, 99, 0, -1, "1", True, None, 1.0])
def test_unknown_versions_are_refused_with_the_file_named(tmp_path, version):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({"format_version": version, "preset": "tiny"}))
    with pytest.raises(UserError, match="shape.json.*format_version"):
        resolve_shape(str(path))
    with pytest.raises(UserError, match="format_version"):
        load_config(ProxyConfig, {"format_version": version}, "proxy config")


def test_field_checks_name_the_file_and_field():
    with pytest.raises(UserError, match="f.json: field 'rope_theta' must be a number"):
        check_fields(Shape, {"rope_theta": "abc"}, "f.json")
    with pytest.raises(UserError, match="'tie_embeddings' must be true or false"):
        check_fields(Shape, {"tie_embeddings": "no"}, "f.json")
    with pytest.raises(UserError, match="'d_model' must be a whole number"):
        check_fields(Shape, {"d_model": True}, "f.json")
    with pytest.raises(UserError, match="finite"):
        check_fields(Shape, {"rope_theta": float("nan")}, "f.json")
    with pytest.raises(UserError, match="'rope_theta' must be above 0"):
        check_fields(Shape, {"rope_theta": 0}, "f.json")
    check_fields(Shape, {"rope_theta": 500000, "d_model": 64}, "f.json")  # ints are numbers


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


class _ClosedPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_pipe_ends_quietly(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["inspect", "AF", "--shape", "tiny", "--json"]) == 0
    assert capsys.readouterr().err == ""
