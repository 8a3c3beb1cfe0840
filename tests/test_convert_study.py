"""The figures of benchmarks/results/convert_placement/README.md, recomputed from raw.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tagged_figures import assert_tagged_figures

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "convert_placement"
RAW = FOLDER / "raw.json"
# The first run of the study, with the earlier S start (identity convolutions, zero dt inputs,
# D = 0); otherwise the same command.
RAW_IDENTITY = FOLDER / "raw_identity_init.json"

pytestmark = pytest.mark.skipif(not RAW.is_file(), reason="the study's raw file is not there")


def figures() -> dict[str, str]:
    """Every number the README states, by name, formatted as it is printed there."""
    raw = json.loads(RAW.read_text())
    means = {k: statistics.mean(v) for k, v in raw["exhaustive"].items()}
    ranked = sorted(means, key=means.get)
    # Seed noise: the standard deviation of a keep-set's two seeds, pooled over keep-sets.
    pooled = statistics.mean(statistics.variance(v) for v in raw["exhaustive"].values()) ** 0.5
    out = {
        "teacher": f"{raw['teacher_val_loss']:.3f}",
        "best": f"{means[ranked[0]]:.3f}",
        "best_set": ranked[0],
        "worst": f"{means[ranked[-1]]:.3f}",
        "worst_set": ranked[-1],
        "median": f"{statistics.median(means.values()):.3f}",
        "seed_sd": f"{pooled:.3f}",
    }
    for name, got in raw["strategies"].items():
        key = ",".join(map(str, got["keep"]))
        out[f"{name}_set"] = key
        out[f"{name}_mean"] = f"{means[key]:.3f}"
        out[f"{name}_rank"] = str(ranked.index(key) + 1)
        out[f"{name}_probe"] = f"{got['probe_tokens']:,}"
    with0 = [v for k, v in means.items() if "0" in k.split(",")]
    out["with0_spread"] = f"{max(with0) - min(with0):.3f}"
    even = ",".join(map(str, raw["strategies"]["even"]["keep"]))
    out["even_attention"] = f"{means[even]:.3f}"
    out["even_random"] = f"{statistics.mean(raw['random_init']):.3f}"
    old = json.loads(RAW_IDENTITY.read_text())
    out["even_identity"] = f"{statistics.mean(old['exhaustive'][even]):.3f}"
    old_means = [statistics.mean(v) for v in old["exhaustive"].values()]
    new_means = [means[k] for k in old["exhaustive"]]
    out["identity_worse"] = str(sum(o > n for o, n in zip(old_means, new_means)))
    return out


def test_readme_states_the_raw_files_figures():
    text = (FOLDER / "README.md").read_text()
    assert not any(f"{{{name}}}" in text for name in figures())  # no unfilled placeholder
    assert_tagged_figures(FOLDER / "README.md", figures())


def test_the_layer_that_must_stay():
    """The README's reading: every keep-set with attention layer 0 is below 1.6, every one
    without it above 1.9."""
    raw = json.loads(RAW.read_text())
    for key, losses in raw["exhaustive"].items():
        mean = statistics.mean(losses)
        assert (mean < 1.6) if "0" in key.split(",") else (mean > 1.9), (key, mean)
