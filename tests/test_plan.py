"""``hcomposer plan``: its FLOP and memory model against what PyTorch measures, and the command.

FLOPs are checked against ``torch.utils.flop_counter.FlopCounterMode``, which counts only
matmul-like ops (mm, bmm, addmm, convolution, and SDPA where it has a formula for the
kernel in use). What it does not see, and so what each comparison leaves out:

- CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) has no formula: the
  counter sees attention's projections only. The score and value products are checked on
  their own with the math backend, which the counter sees as bmm over the full T x T
  square, where the model counts the causal triangle ((T + 1) / 2T of it).
- The backward of a grouped (depthwise) convolution is counted as if it were dense (its
  weight gradient C x larger): convolution_backward is left out; its forward is compared.

Activation memory is checked against the bytes of the tensors autograd saves for the
backward, counted through ``torch.autograd.graph.saved_tensors_hooks`` (each storage once,
parameters excluded), in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.footprint import activation_bytes_per_token, matmul_flops_per_token
from hcomposer.model import build_model
from hcomposer.recipes import get_recipe
from hcomposer.shapes import resolve_shape
from hcomposer.training.meter import matmul_peak

B, T = 2, 64  # T above the tiny shape's window (16) and chunks (16): several chunks


def _model(pattern: str, shape: str = "tiny"):
    torch.manual_seed(0)
    arch = Architecture.parse(pattern, shape=shape)
    model = build_model(arch)
    for blk in model.layers:
        if hasattr(blk.mixer, "dispatch"):
            # The grouped dispatch pads every expert to the busiest one's load; the looped
            # one does exactly top_k experts' work per token, what the model counts.
            blk.mixer.dispatch = "looped"
    x = torch.randint(0, arch.shape.vocab_size, (B, T))
    return arch, model, x


def _loss(model, x):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))


def _counts(fn) -> dict[str, int]:
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(k).removeprefix("aten."): v for k, v in fc.get_flop_counts()["Global"].items()}


def _attention_extra(model) -> float:
    prims = []
    for blk in model.layers:
        prims += list(getattr(blk.mixer, "branches", [blk.mixer]))
    return sum(p.extra_flops_per_token(T) for p in prims if p.token in ("A", "W"))


# Exact where every matmul is a weight's (F, E, A and W's projections); the chunked scans
# (S, D) within 4%: the model counts the algorithm's products per chunk (delta_rule.
# chunked_flops, Mamba-2's docstring), the code runs some of them as elementwise products
# and triangular solves, which the counter does not see, and pads none.
@pytest.mark.parametrize(
    "pattern,tol",
    [("F", 0), ("E", 0), ("A", 0), ("W", 0), ("AF", 0), ("S", 0.04), ("D", 0.04),
     ("[A|S]F", 0.04), ("AWFESD", 0.04)],
)  # fmt: skip
def test_forward_matmul_flops_match_the_counter(pattern, tol):
    arch, model, x = _model(pattern)
    fwd = _counts(lambda: model(x))
    counted = fwd.get("mm", 0) + fwd.get("bmm", 0) + fwd.get("convolution", 0)
    expected = (matmul_flops_per_token(arch, T) - _attention_extra(model)) * B * T
    assert counted == pytest.approx(expected, rel=tol, abs=0 if tol else 1e-6)


@pytest.mark.parametrize("pattern", ["AF", "E", "S", "D"])
def test_backward_is_twice_the_forward(pattern):
    # The plan's 3 forwards per training token: each matmul's backward is two matmuls of its
    # size (the input's gradient and the weight's). Exact for the weights' matmuls (mm);
    # the scans' batched products within 5% (DeltaNet's chunked backward: 3.125 x).
    arch, model, x = _model(pattern)
    fwd = _counts(lambda: _loss(model, x))
    both = _counts(lambda: _loss(model, x).backward())
    assert both["mm"] == 3 * fwd["mm"]
    assert both.get("bmm", 0) == pytest.approx(3 * fwd.get("bmm", 0), rel=0.05)


def test_attention_scores_match_the_counter_on_the_math_backend():
    arch, model, x = _model("A")
    with sdpa_kernel(SDPBackend.MATH):
        fwd = _counts(lambda: model(x))
    square = fwd["bmm"]  # QK^T and AV over every (query, key) pair
    assert square * (T + 1) / (2 * T) == pytest.approx(_attention_extra(model) * B * T)


def _saved_bytes(model, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, x)
    return sum(storages.values())


# Exact for F and attention (every saved tensor is in the count); the chunked scans, the
# window band's blocks and the router within 15% (measured 0.87-1.04 of the saved bytes).
@pytest.mark.parametrize(
    "pattern,shape,tol",
    [("F", "tiny", 0.001), ("A", "tiny", 0.001), ("AF", "tiny", 0.001), ("W", "tiny", 0.15),
     ("E", "tiny", 0.15), ("S", "tiny", 0.15), ("D", "tiny", 0.15), ("[A|S]F", "tiny", 0.15),
     ("AWFESD", "proxy", 0.15), ("SD", "proxy", 0.15)],
)  # fmt: skip
def test_activation_bytes_match_saved_tensors(pattern, shape, tol):
    arch, model, x = _model(pattern, shape)
    measured = _saved_bytes(model, x)
    estimate = activation_bytes_per_token(arch, seq_len=T, batch=B, dtype_bytes=4) * B * T
    assert estimate == pytest.approx(measured, rel=tol)


def _plan(capsys, *argv) -> tuple[int, dict | str, str]:
    code = main(["plan", *argv])
    out = capsys.readouterr()
    if code == 0 and "--json" in argv:
        return code, json.loads(out.out), out.err
    return code, out.out, out.err


def _target(pattern: str, recipe: str, vocab: int) -> Architecture:
    shape = resolve_shape(get_recipe(recipe).target_shape)
    shape = shape.replace(vocab_size=vocab, max_seq_len=max(shape.max_seq_len, 2048))
    return Architecture(pattern=pattern, shape=shape)


# quickstart: the byte tokenizer's 257 ids rounded up to 64. paper: its Hub tokenizer is not
# loaded by the plan; the target shape's vocabulary is Llama 3's 128,256. Its four micro-steps
# a step make it fit one 8-GPU node.
@pytest.mark.parametrize("recipe,gpus,vocab", [("quickstart", 1, 320), ("paper", 8, 128256)])
def test_plan_table_shows_the_target_built_on_meta(capsys, recipe, gpus, vocab):
    code, plan, _ = _plan(capsys, "--recipe", recipe, "--gpus", str(gpus), "--json")
    assert code == 0 and plan["fits"]
    target = plan["models"][0]
    assert plan["vocab"] == vocab
    arch = _target(target["pattern"], recipe, vocab)
    model = build_model(arch, device="meta")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert target["params_total"] == params
    # Replicated fp32 weights and gradients and two AdamW moments: 16 bytes a parameter.
    mem = target["train_memory"]
    assert mem["weights"] + mem["grads"] + mem["optimizer"] == 16 * target["params_total"]
    rate = gpus * plan["peak_flops_per_gpu"] * plan["mfu"]
    assert plan["total_seconds"] == pytest.approx(plan["total_flops"] / rate)
    # Training: each seed's tokens at 3 forwards, plus the validations' forwards.
    r = get_recipe(recipe)
    t = r.train
    validations = t.total_steps // t.eval_every + 1
    per_seed = 3 * t.tokens + validations * t.eval_tokens
    train = next(s for s in plan["stages"] if s["stage"] == "train target")
    expected = r.train_seeds * per_seed * matmul_flops_per_token(arch, t.seq_len)
    assert train["flops"] == pytest.approx(expected)
    # The table goes to stderr (the commands' rich output; stdout is kept for --json).
    code, _, table = _plan(capsys, "--recipe", recipe, "--gpus", str(gpus))
    assert code == 0 and "warning" not in table
    assert f"{target['params_total']:,}" in table and "MFU 0.4" in table


def test_plan_warns_when_memory_will_not_fit(capsys, tmp_path):
    code, _, err = _plan(capsys, "--recipe", "quickstart", "--memory-gib", "0.01")
    assert code == 0 and "parameters (total)" in err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and err.startswith("warning: training needs")
    out = tmp_path / "plan.json"
    code, _, err = _plan(capsys, "--recipe", "quickstart", "--memory-gib", "0.01", "--strict",
                         "--out", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "more than" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,what",
    [(["--recipe", "nosuch"], "unknown recipe"), (["--recipe", "paper", "--gpu", "tpu"], "--gpu"),
     (["--recipe", "paper", "--gpus", "0"], "--gpus"),
     (["--recipe", "paper", "--mfu", "0"], "--mfu"),
     (["--recipe", "paper", "--mfu", "1.5"], "--mfu"),
     (["--recipe", "paper", "--memory-gib", "-1"], "--memory-gib"),
     (["--recipe", "quickstart", "--gpus", "17"], "--gpus 17")],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, argv, what):
    out = tmp_path / "plan.json"
    code, stdout, err = _plan(capsys, *argv, "--out", str(out))
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and what in err and "Traceback" not in err
    assert not out.exists()


def test_out_writes_the_json_plan(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code, plan, _ = _plan(capsys, "--recipe", "quickstart", "--json", "--out", str(out))
    assert code == 0 and json.loads(out.read_text()) == plan


def test_cpu_card_uses_the_measured_matmul_peak(capsys):
    code, plan, _ = _plan(capsys, "--recipe", "quickstart", "--gpu", "cpu", "--json")
    assert code == 0
    # The meter times the peak once per process: the plan's figure is that same measurement.
    assert plan["peak_flops_per_gpu"] == matmul_peak(torch.device("cpu"), "fp32")
