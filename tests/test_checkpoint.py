"""Checkpoints through torch.distributed.checkpoint.state_dict: the optimiser state keyed by
parameter name, tied weights, refusals that name what differs, and exact resume from a
checkpoint written in the previous (index-keyed) layout. The two-process DDP and FSDP
checkpoints are compared with one process's in tests/test_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, read_json, read_jsonl, sha256_file
from hcomposer.model import build_model, lm_loss
from hcomposer.runs import RunDir
from hcomposer.training import TrainConfig, load_run, train
from hcomposer.training.checkpoint import (
    FORMAT,
    FORMAT_V1,
    find_checkpoint,
    load_checkpoint,
    param_names,
    read_optimizer_state,
    save_checkpoint,
)
from hcomposer.training.step import make_optimizer, train_step

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))


def _trained(pattern: str = "AF", steps: int = 2, seed: int = 0, **shape):
    """A tiny model and its AdamW after ``steps`` steps of the training core."""
    model = build_model(pattern, shape="tiny", seed=seed)
    if shape:
        model = build_model(model.arch.with_shape(model.arch.shape.replace(**shape)), seed=seed)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _step(model, opt, torch.randint(0, model.arch.shape.vocab_size, (2, 17), generator=g))
    return model, opt


def _step(model, opt, x) -> None:
    train_step(
        lambda a, b: lm_loss(model(a), b), [(x[:, :-1], x[:, 1:])], opt,
        device=torch.device("cpu"), dtype="fp32", grad_clip=1.0,
    )  # fmt: skip


def _same_state(opt_a, model_a, opt_b, model_b) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
        assert opt_a.state[a].keys() == opt_b.state[b].keys(), name
        for key, value in opt_a.state[a].items():
            assert torch.equal(value, opt_b.state[b][key]), (name, key)


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, opt = _trained()
    folder = save_checkpoint(tmp_path, model, opt, {"step": 2})
    tensors = load_file(folder / "optimizer.safetensors")
    q = model.layers[0].mixer.q_proj.weight
    assert torch.equal(tensors["layers.0.mixer.q_proj.weight.exp_avg"], opt.state[q]["exp_avg"])
    names = {n for n, _ in model.named_parameters()}
    assert {key.rsplit(".", 1)[0] for key in tensors} == names
    assert {key.rsplit(".", 1)[1] for key in tensors} == {"step", "exp_avg", "exp_avg_sq"}
    state = read_json(folder / "state.json")
    assert state["format"] == FORMAT == "hcomposer.checkpoint/2"
    groups = [g["params"] for g in state["optimizer"]["param_groups"]]
    assert groups == param_names(model, opt) and "embed.weight" in groups[1]
    assert read_optimizer_state(folder)["state"].keys() == names

    # Loaded into another model and optimiser: the same state, and the next step agrees bitwise.
    again, opt2 = _trained(seed=1, steps=0)
    assert load_checkpoint(folder, again, opt2)["step"] == 2
    _same_state(opt, model, opt2, again)
    x = torch.randint(0, model.arch.shape.vocab_size, (2, 17), generator=torch.Generator())
    _step(model, opt, x)
    _step(again, opt2, x)
    _same_state(opt, model, opt2, again)


def test_a_parameter_without_state_starts_fresh_after_loading(tmp_path):
    # A parameter that had no gradient yet (an expert no token chose) has no AdamW state; the
    # loader must not leave the state it creates for it (a zero step at lr 0) behind.
    model, opt = _trained()
    del opt.state[model.norm.weight]
    folder = save_checkpoint(tmp_path, model, opt, {"step": 2})
    assert "norm.weight" not in read_optimizer_state(folder)["state"]
    again, opt2 = _trained(seed=1, steps=0)
    load_checkpoint(folder, again, opt2)
    assert again.norm.weight not in opt2.state
    _same_state(opt, model, opt2, again)
    # Its first step is a first step (AdamW's bias correction) in both.
    x = torch.randint(0, model.arch.shape.vocab_size, (2, 17), generator=torch.Generator())
    _step(model, opt, x)
    _step(again, opt2, x)
    _same_state(opt, model, opt2, again)


def test_a_checkpoint_before_the_first_step_leaves_the_optimizer_untouched(tmp_path):
    model, opt = _trained(steps=0)
    folder = save_checkpoint(tmp_path, model, opt, {"step": 0})
    assert not opt.state and not load_file(folder / "optimizer.safetensors")
    again, opt2 = _trained(seed=1, steps=0)
    load_checkpoint(folder, again, opt2)
    assert not opt2.state
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embedding_and_head_survive_the_round_trip(tmp_path, tie):
    model, opt = _trained(tie_embeddings=tie)
    assert (model.lm_head.weight is model.embed.weight) == tie
    folder = save_checkpoint(tmp_path, model, opt, {"step": 2})
    stored = load_file(folder / "model.safetensors")
    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata() or {}
    # Stored once, under its first name, the way safetensors' save_model stores it.
    assert ("lm_head.weight" in stored) == (not tie)
    assert metadata.get("lm_head.weight") == ("embed.weight" if tie else None)
    reference = tmp_path / "save_model.safetensors"
    save_model(model, str(reference))
    assert load_file(reference).keys() == stored.keys()
    again, opt2 = _trained(seed=1, steps=0, tie_embeddings=tie)
    load_checkpoint(folder, again, opt2)
    assert (again.lm_head.weight is again.embed.weight) == tie
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    _same_state(opt, model, opt2, again)
    # What save_model wrote before, safetensors' own loader reads from ours.
    fresh = build_model(model.arch, seed=2)
    load_model(fresh, str(folder / "model.safetensors"))
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def _rename(module: torch.nn.Module, old: str, new: str | None) -> None:
    value = getattr(module, old)
    delattr(module, old)
    if new is not None:
        module.register_parameter(new, value)


def test_a_renamed_or_removed_parameter_is_refused_by_name(tmp_path):
    model, opt = _trained()
    folder = save_checkpoint(tmp_path, model, opt, {"step": 2})

    renamed, _ = _trained(seed=1, steps=0)
    _rename(renamed.norm, "weight", "scale")
    before = {k: v.clone() for k, v in renamed.state_dict().items()}
    both = (
        r"does not fit this model: it lacks the model's \['norm\.scale'\] "
        r"and it holds \['norm\.weight'\]"
    )
    with pytest.raises(UserError, match=both):
        load_checkpoint(folder, renamed, make_optimizer(renamed, lr=1e-3, weight_decay=0.1))
    # Refused before anything was loaded.
    assert all(torch.equal(v, renamed.state_dict()[k]) for k, v in before.items())

    removed, _ = _trained(seed=1, steps=0)
    _rename(removed.norm, "weight", None)
    extra = r"does not fit this model: it holds \['norm\.weight'\], which the model lacks"
    with pytest.raises(UserError, match=extra):
        load_checkpoint(folder, removed)

    # The weights fit, but the optimiser holds one parameter fewer (frozen).
    frozen, _ = _trained(seed=1, steps=0)
    frozen.norm.weight.requires_grad_(False)
    extra = r"optimiser state: it holds \['norm\.weight'\], which this optimiser lacks"
    with pytest.raises(UserError, match=extra):
        load_checkpoint(folder, frozen, make_optimizer(frozen, lr=1e-3, weight_decay=0.1))

    # A different width is refused with the shapes.
    wider = build_model(model.arch.with_shape(model.arch.shape.replace(ffn_dim=96)), seed=0)
    with pytest.raises(UserError, match=r"does not fit this model: .* is \("):
        load_checkpoint(folder, wider)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "austen.txt"
    path.write_text(embedded_corpus_text()[:40_000], encoding="utf-8")
    return path


def _rewrite_as_format_1(run_dir, config: TrainConfig) -> None:
    """Rewrite a run's checkpoint exactly as hcomposer wrote it before the state went through
    torch.distributed.checkpoint.state_dict: the weights by ``save_model``, the optimiser's
    ``state_dict()`` keyed by parameter index, format ``hcomposer.checkpoint/1``."""
    folder = find_checkpoint(run_dir)
    model = build_model(RunDir(run_dir).read_architecture())
    opt = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    load_checkpoint(folder, model, opt, restore_rng=False)
    # The previous save_checkpoint, line for line.
    save_model(model, str(folder / "model.safetensors"))
    osd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in osd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    state = read_json(folder / "state.json")
    state["format"] = FORMAT_V1
    state["optimizer"] = {"param_groups": osd["param_groups"], "scalars": scalars}
    files = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
    state["sha256"] = {name: sha256_file(folder / name) for name in files}
    atomic_write_json(folder / "state.json", state)


def test_resume_from_a_checkpoint_of_the_index_keyed_format(tmp_path, text_file):
    arch = build_model("AE", shape="tiny", device="meta").arch  # E: router bias buffers too
    cfg = TrainConfig(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2,
        dtype="fp32", eval_every=3, eval_tokens=256, log_every=1, checkpoint_every=0,
        data=str(text_file),
    )  # fmt: skip
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    train(arch, cfg, tmp_path / "old", progress=False, stop_at=3)
    _rewrite_as_format_1(tmp_path / "old", cfg)
    folder = find_checkpoint(tmp_path / "old")
    assert read_json(folder / "state.json")["format"] == FORMAT_V1
    assert "0.exp_avg" in load_file(folder / "optimizer.safetensors")

    resumed = train(arch, cfg, tmp_path / "old", resume=True, progress=False)
    assert resumed.status == "completed" and resumed.val_loss == straight.val_loss

    def losses(name):
        return {r["step"]: r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")}

    assert list(losses("straight")) == list(range(1, 7)) and losses("old") == losses("straight")
    # Written again in the current format, the same bytes as the uninterrupted run's.
    folder = find_checkpoint(tmp_path / "old")
    assert read_json(folder / "state.json")["format"] == FORMAT
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours = load_file(find_checkpoint(tmp_path / "straight") / name)
        again = load_file(folder / name)
        assert ours.keys() == again.keys()
        assert all(torch.equal(ours[k], again[k]) for k in ours), name
    m1, *_ = load_run(tmp_path / "straight")
    m2, *_ = load_run(tmp_path / "old")
    assert all(
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values())
    )
