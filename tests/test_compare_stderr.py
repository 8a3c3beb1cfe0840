"""The comparison table shows lm-eval scores with their standard errors beside them."""

from __future__ import annotations

import pytest

from hcomposer.reporting.compare import _fmt, comparison_rows


def _run(acc, stderr=None):
    lm = {"tasks": {"hc_tiny_mc": {"acc": acc}}}
    if stderr is not None:
        lm["stderr"] = {"hc_tiny_mc": {"acc": stderr}}
    return {"label": "x", "eval": {"lm-eval": lm}}


def test_lm_eval_row_carries_stderr_and_ratio_uses_the_value():
    rows = {name: (values, ratios) for name, values, ratios in comparison_rows(
        [_run(0.5, 0.1443), _run(0.75, 0.1306), _run(0.25)]
    )}  # fmt: skip
    values, ratios = rows["lm-eval hc_tiny_mc"]
    assert [_fmt(v) for v in values] == ["0.5 ± 0.14", "0.75 ± 0.13", "0.25"]
    assert ratios[1] == pytest.approx(1.5) and ratios[2] == pytest.approx(0.5)
    assert _fmt(ratios[1]) == "1.5"
