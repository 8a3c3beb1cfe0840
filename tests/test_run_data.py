"""``hcomposer run --data/--tokenizer``, the paper recipe's real parts, the rehearsal fixtures,
and the one-line errors before any training when a dataset or tokenizer cannot be had."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.parquet as pq
import pytest

from hcomposer.accounting import count_costs
from hcomposer.cli import build_parser, main
from hcomposer.commands import run_cmd
from hcomposer.data import ByteTokenizer, Tokenizer, get_tokenizer, rehearsal_assets
from hcomposer.data.stream import StreamingDataset
from hcomposer.model import build_model
from hcomposer.pipeline.scale import target_architecture
from hcomposer.recipes import PAPER_DATA, PAPER_TOKENIZER, paper
from load_script import script

CORPUS, TOKENIZER = rehearsal_assets()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    # Nothing here may reach the network: names that need it must fail as offline.
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)


class _Llama3Vocab(Tokenizer):
    """Stands in for Llama 3's tokenizer where only its size matters (no download)."""

    kind, name, vocab_size, eos_id = "stub", "llama-3", 128_256, 128_001


def test_the_paper_target_has_llama_3_2_1b_parameters_with_its_vocabulary():
    recipe = paper()
    assert recipe.train.data == PAPER_DATA and PAPER_DATA.startswith("hf:")
    assert recipe.train.tokenizer == PAPER_TOKENIZER and PAPER_TOKENIZER.startswith("hf:")
    llama = target_architecture(recipe, "AF" * 8, _Llama3Vocab())
    model = build_model(llama, device="meta")
    params = sum(p.numel() for p in model.parameters())
    # Llama-3.2-1B: 1,235,814,400 parameters (tied embeddings, 128,256 x 2,048 of them).
    assert params == count_costs(llama).params_total == 1_235_814_400
    byte = target_architecture(recipe, "AF" * 8, ByteTokenizer())
    assert byte.shape.vocab_size == 320
    assert count_costs(byte).params_total == params - (128_256 - 320) * 2048


def test_run_options_set_the_recipe_data_and_tokenizer(tmp_path):
    argv = ["run", "--recipe", "quickstart", "--out", "r", "--data", f"hf:{CORPUS}"]
    argv += ["--tokenizer", str(TOKENIZER)]
    args = build_parser().parse_args(argv)
    recipe, out, inputs = run_cmd.resolve(args)
    assert recipe.train.data == f"hf:{CORPUS}" and recipe.train.tokenizer == str(TOKENIZER)
    # What pipeline.json records, after a JSON round trip.
    stored = json.loads(json.dumps(recipe.to_dict()))["train"]
    assert stored["data"] == f"hf:{CORPUS}" and stored["tokenizer"] == str(TOKENIZER)
    assert inputs == {
        "data": f"hf:{CORPUS}",
        "tokenizer": str(TOKENIZER),
        "source": "hf",
        "splits": ["train"],
        "vocab_size": 1024,
    }
    assert out == Path("r") and not out.exists()
    # Without the options, the recipe's own parts.
    args = build_parser().parse_args(["run", "--recipe", "paper", "--out", "p"])
    assert run_cmd._recipe(args).train.data == PAPER_DATA


def _refused(argv, capsys, match: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize(
    "extra,match",
    [
        # The paper recipe's own dataset, offline: the local alternative is named.
        ([], "--data hf:PATH"),
        (["--data", "hf:no-such-owner/no-such-dataset"], "could not be reached"),
        (["--data", f"hf:{CORPUS}"], "--tokenizer PATH"),
        (["--data", f"hf:{CORPUS}", "--tokenizer", "missing/tokenizer.json"], "does not exist"),
        (["--data", f"hf:{CORPUS}", "--tokenizer", "broken.json"], "could not be read"),
        (["--data", f"hf:{CORPUS}", "--tokenizer", "hf:no/such/repo"], "write hf:OWNER/NAME"),
        (["--data", "missing.jsonl"], "does not exist"),
    ],
)
def test_unusable_data_or_tokenizer_is_one_line_before_anything(tmp_path, capsys, extra, match):
    (tmp_path / "broken.json").write_text("{not json")
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(["run", "--recipe", "paper", "--out", "run", *extra], capsys, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_fixtures_load_and_match_their_generator(tmp_path):
    tok = get_tokenizer(str(TOKENIZER))
    assert tok.vocab_size == 1024 and tok.eos_token == "<|end_of_text|>"
    text = "It is a truth universally acknowledged."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) / 2  # a BPE, not bytes
    rows = pq.read_table(next((CORPUS / "data").glob("*.parquet"))).to_pylist()
    ds = StreamingDataset(f"hf:{CORPUS}", tok)
    assert [r["text"] for r in datasets.load_dataset(str(CORPUS), split="train")] == [
        r["text"] for r in rows
    ]
    assert ds.plan["rule"] == "hash" and len(rows) == 120
    # The committed files are what the script makes (same content, byte for byte).
    module = script("scripts/make_rehearsal_fixtures.py")
    module.build(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_text() == TOKENIZER.read_text()
    again = pq.read_table(tmp_path / "again" / "corpus" / module.SHARD).to_pylist()
    assert again == rows
    assert (tmp_path / "again/corpus/README.md").read_text() == (CORPUS / "README.md").read_text()


def test_no_network_is_one_line_at_once_not_minutes_of_retries(monkeypatch, capsys, tmp_path):
    from hcomposer.data import sources

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def no_route(*a, **kw):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(sources.socket, "create_connection", no_route)
    sources._hub_reached.cache_clear()
    try:
        _refused(["run", "--recipe", "paper", "--out", "run"], capsys, "cannot be reached")
        err = _refused(
            ["run", "--recipe", "paper", "--out", "run", "--data", f"hf:{CORPUS}"], capsys, ""
        )
        assert "tokenizer 'hf:unsloth/Llama-3.2-1B'" in err and "--tokenizer PATH" in err
    finally:
        sources._hub_reached.cache_clear()
    assert not (tmp_path / "run").exists()
