"""``hcomposer convert``: the run folder it writes, its placement strategies, resume, export of
the student, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from hcomposer.cli import main
from hcomposer.io import read_json

transformers = pytest.importorskip("transformers")

SMALL = ["--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1K", "--no-progress"]


@pytest.fixture
def llama_folder(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_even_conversion_writes_the_run_folder_and_exports(small_teacher, convert_text, tmp_path):
    out = tmp_path / "conv"
    argv = ["convert", str(small_teacher), "--keep", "1", "--to", "S", "--out", str(out)]
    argv += ["--tokens", "1K", "--data", str(convert_text), *SMALL]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"convert.json", "run.json", "placement.json", "conversion.json", "student"} <= names
    assert read_json(out / "placement.json")["keep"] == [1]
    assert read_json(out / "convert.json")["to"] == "S"
    assert read_json(out / "run.json")["command"][:2] == ["hcomposer", "convert"]
    student = json.loads((out / "student" / "architecture.json").read_text())
    assert student["pattern"] == "SFAFSF"
    assert read_json(out / "student" / "summary.json")["status"] == "completed"
    assert set(read_json(out / "conversion.json")) == {"0", "4"}
    assert "kept attention layers: [1]" in (out / "report.md").read_text()
    # Run again: without --resume refused; with it, the finished conversion is reported.
    assert main(argv) == 2
    assert main([*argv, "--resume"]) == 0
    # The student exports like any other run (a native Bamba folder for (XF)*n, X in A, S).
    assert main(["export", str(out / "student"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bamba"


def test_hf_teacher_with_given_layers(llama_folder, convert_text, tmp_path):
    out = tmp_path / "conv"
    argv = ["convert", str(llama_folder), "--keep-layers", "2", "--to", "D", "--out", str(out)]
    argv += ["--tokenizer", "byte", "--tokens", "1K", "--data", str(convert_text), *SMALL]
    assert main(argv) == 0
    assert read_json(out / "placement.json") == {"strategy": "given", "keep": [2], "scores": {}}
    student = json.loads((out / "student" / "architecture.json").read_text())
    assert student["pattern"] == "DFDFAF"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--keep-layers", "5"], "layer index 5 is out of range"),
        (["--keep", "4"], "--keep 4 is larger than the teacher's 3 attention layers"),
        (["--keep", "1", "--tokenizer", "bpe:400"], "vocabulary mismatch"),
        (["--keep", "1"], "no tokenizer.json; pass --tokenizer"),
        (["--keep", "1", "--to", "F"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    llama_folder, convert_text, tmp_path, capsys, extra, words
):
    out = tmp_path / "conv"
    argv = ["convert", str(llama_folder), "--out", str(out), "--data", str(convert_text), *extra]
    if "--tokenizer" not in extra and "no tokenizer" not in words:
        argv += ["--tokenizer", "byte"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not out.exists()


def test_not_a_model_folder_exits_2(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    out = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "notes"), "--keep", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a Hugging Face model folder" in err and "\n" not in err
    assert not out.exists()


def test_greedy_scores_every_layer_and_keeps_k(small_teacher, convert_text, tmp_path):
    out = tmp_path / "greedy"
    argv = ["convert", str(small_teacher), "--keep", "1", "--to", "D", "--out", str(out)]
    argv += ["--strategy", "greedy", "--probe-tokens", "512", "--tokens", "256"]
    argv += ["--data", str(convert_text), *SMALL]
    assert main(argv) == 0
    placement = read_json(out / "placement.json")
    assert set(placement["scores"]) == {"0", "1", "2"}
    assert len(placement["keep"]) == 1 and len(placement["replacement_order"]) == 2
    assert placement["keep"][0] not in placement["replacement_order"]
    # The first replacement is the layer whose replacement alone hurt least.
    first = placement["replacement_order"][0]
    assert placement["scores"][str(first)] == min(placement["scores"].values())
    assert all((out / "placement" / f"layer-{j}" / "summary.json").is_file() for j in range(3))


def test_optuna_study_in_the_folder_and_resumes(small_teacher, convert_text, tmp_path):
    import optuna

    out = tmp_path / "optuna"
    argv = ["convert", str(small_teacher), "--keep", "2", "--to", "S", "--out", str(out)]
    argv += ["--strategy", "optuna", "--trials", "3", "--probe-tokens", "256", "--tokens", "256"]
    argv += ["--data", str(convert_text), *SMALL]
    assert main(argv) == 0
    storage = f"sqlite:///{out}/placement/study.db"
    study = optuna.load_study(study_name="placement", storage=storage)
    probed = [t for t in study.trials if t.user_attrs.get("probed")]
    # Three distinct keep-sets of 2 out of 3 layers: every one probed once, repeats told free.
    assert sorted(tuple(t.user_attrs["keep"]) for t in probed) == [(0, 1), (0, 2), (1, 2)]
    assert sorted(p.name for p in (out / "placement").iterdir() if p.is_dir()) == sorted(
        f"trial-{t.number}" for t in probed
    )
    placement = read_json(out / "placement.json")
    best = min(placement["trials"], key=lambda t: t["val_loss"])
    assert placement["keep"] == best["keep"]
    assert placement["keep"] == min(probed, key=lambda t: t.value).user_attrs["keep"]
    # A resumed conversion finds the study done and runs no new trial.
    attempts = len(study.trials)
    assert main([*argv, "--resume"]) == 0
    assert len(optuna.load_study(study_name="placement", storage=storage).trials) == attempts


def test_eval_every_and_dtype_reach_the_distillation(small_teacher, convert_text, tmp_path):
    out = tmp_path / "conv"
    argv = ["convert", str(small_teacher), "--keep-layers", "0", "--out", str(out)]
    argv += ["--tokens", "1K", "--data", str(convert_text), *SMALL]
    assert main([*argv, "--eval-every", "2", "--dtype", "bf16"]) == 0
    config = read_json(out / "student" / "run.json")["config"]["train"]
    assert (config["eval_every"], config["dtype"]) == (2, "bf16")
    # 1K tokens of 4 x 32: 8 steps, validated at 2, 4, 6 and 8 (the curve a study reads).
    metrics = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().split("\n")
               if x.strip()]  # fmt: skip
    assert [r["step"] for r in metrics if r.get("val_loss") is not None] == [2, 4, 6, 8]
    # A conversion started before these options existed resumes: absent means the default.
    plain = tmp_path / "plain"
    argv[5] = str(plain)
    assert main(argv) == 0
    request = read_json(plain / "convert.json")
    del request["eval_every"], request["dtype"]
    (plain / "convert.json").write_text(json.dumps(request))
    assert main([*argv, "--resume"]) == 0
    # ... but not with another value than the default it was run with.
    assert main([*argv, "--resume", "--eval-every", "3"]) == 2
