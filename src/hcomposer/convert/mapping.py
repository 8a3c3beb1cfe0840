"""Convert chosen attention sublayers of a teacher to ``S``, ``D`` or ``W``, the rest kept.

Everything but the converted mixers is copied from the teacher: embeddings, head, every norm
(the converted sublayers' pre-norms too), MLPs and the attention layers that stay. A converted
mixer starts from its attention layer's weights where the math allows (MambaInLlama, arXiv
2408.15237, for Mamba; the same reading of linear attention for gated DeltaNet):

- ``W`` keeps q/k/v/o exactly (same parameters; it only stops looking past the window).
- ``S`` (Mamba-2 read as linear attention ``y_t = sum_s (C_t . B_s) decay x_s``): C <- Q scaled
  by 1/sqrt(head_dim), B <- K, x <- V, out_proj <- O, one B/C group per query head.
- ``D`` (gated delta rule, ``o_t = S_t q_t`` with ``S`` written by ``k`` and ``v``): q <- Q,
  k <- K, v <- V, out_proj <- O, q/k heads and value heads = the query heads.

A teacher's attention options (Qwen2's q/k/v biases, Qwen3's per-head q/k norms: the shape's
``attn_bias`` and ``qk_norm``) stay in the student's shape, so kept attention layers and ``W``
hold them exactly; ``S`` and ``D`` have no bias on their projections and no per-head norm
before their state update, so those tensors are not carried into them (the report says so).

Grouped key/value heads are repeated as attention reads them: query head ``h`` uses key/value
head ``h // (n_heads / n_kv_heads)`` (SDPA's ``enable_gqa``, ``repeat_interleave``), so K and V
rows of KV head ``j`` are copied to query heads ``j*g .. j*g+g-1``.

What has no counterpart in attention: for ``S`` it keeps the primitive's own initialisation,
as in MambaInLlama (the short convolution, the ``dt`` inputs, ``dt_bias``, ``A_log``, the skip
``D``); for ``D`` the short convolution starts as an identity (last tap 1, the others 0) and
the decay and strength inputs (``a``, ``b``) at zero (per-head constants; beta 0.5). The two
differ on evidence: for ``S``, identities and zeros gave a slightly closer output at step 0 but
trained worse (the placement study, ``benchmarks/results/convert_placement/``, ran both inits);
for ``D``, a fresh convolution lost most of the step-0 advantage over a random start (in the
setting of ``tests/test_convert_mapping.py``), and no training comparison exists.

The output gate has no attention counterpart either and no bias, so ``calibrate`` fits it (all
gate rows one vector ``w`` with ``w . x_t`` ~ constant on real inputs: a per-token scale, which
Mamba-2's gated norm then removes) together with the gated norm's scale (least squares against
the teacher's per-head attention output, pre-``o_proj``).

Width mismatches: a student tensor wider than its attention counterpart keeps its fresh rows
(the model's own initialisation) beyond the copied block; a narrower one takes the leading
block. ``convert_model`` returns, per converted sublayer, what was mapped, fitted and fresh.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.model import HybridLM, build_model
from hcomposer.pattern import format_pattern
from hcomposer.primitives.attention import Attention

__all__ = [
    "TARGETS",
    "student_architecture",
    "convert_model",
    "init_from_attention",
    "calibrate",
    "layer_inputs",
]

TARGETS = ("S", "D", "W")


def student_architecture(teacher: Architecture, convert: list[int], to: str) -> Architecture:
    """The teacher's architecture with the sublayers ``convert`` (indices of ``A`` sublayers)
    turned into ``to``."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r}: attention converts to one of {', '.join(TARGETS)}")
    layers = [list(layer) for layer in teacher.layers]
    for i in convert:
        if not 0 <= i < len(layers) or layers[i] != ["A"]:
            raise UserError(f"sublayer {i} of {teacher.pattern} is not an attention sublayer")
        layers[i] = [to]
    return teacher.with_pattern(format_pattern([tuple(x) for x in layers]))


def _repeat_kv(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """K or V projection rows [n_kv*hd, d] -> one block per query head [n_heads*hd, d]."""
    d = w.shape[-1]
    return w.view(n_kv, head_dim, d).repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, d)


def _copy_block(dst: torch.Tensor, src: torch.Tensor) -> str:
    """Copy the overlapping leading block of ``src`` into ``dst``; say what was left out."""
    block = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
    dst[block] = src[block]
    got = "x".join(str(b.stop) for b in block)
    notes = []
    if any(b.stop < n for b, n in zip(block, dst.shape)):
        notes.append(f"{got} of {'x'.join(map(str, dst.shape))} mapped, the rest fresh")
    if any(b.stop < n for b, n in zip(block, src.shape)):
        notes.append(f"leading {got} of the attention's {'x'.join(map(str, src.shape))} used")
    return "mapped" if not notes else "partly mapped (" + "; ".join(notes) + ")"


def _identity_conv(conv: nn.Conv1d) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_from_attention(mixer: nn.Module, attn: Attention) -> dict[str, str]:
    """Initialise a converted mixer from attention weights in place; what each part got."""
    token = mixer.token
    if token == "W":
        mixer.load_state_dict(attn.state_dict())
        return {"q_proj k_proj v_proj o_proj": "kept exactly"}
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj.weight
    k = _repeat_kv(attn.k_proj.weight, H, Hkv, hd)
    v = _repeat_kv(attn.v_proj.weight, H, Hkv, hd)
    w = mixer.in_proj.weight
    report: dict[str, str] = {}
    if token == "S":
        I, GN, Hs = mixer.inner_dim, mixer.n_groups * mixer.d_state, mixer.n_heads
        z, x, B, C, dt = w.split([I, I, GN, GN, Hs], dim=0)
        report["x <- V"] = _copy_block(x, v)
        report["B <- K"] = _copy_block(_grouped(B, mixer.n_groups, mixer.d_state), _heads(k, H, hd))
        C_src = _heads(q / math.sqrt(hd), H, hd)
        report["C <- Q/sqrt(hd)"] = _copy_block(_grouped(C, mixer.n_groups, mixer.d_state), C_src)
        report["dt inputs, dt_bias, A_log, D"] = "fresh (the primitive's own initialisation)"
        report["conv1d"] = "fresh (the primitive's own initialisation)"
        z.zero_()
        report["z (gate)"] = "zero until calibrated"
    elif token == "D":
        K2, I, Hv = mixer.key_dim, mixer.inner_dim, mixer.n_v_heads
        qd, kd, vd, gate, a, b = w.split([K2, K2, I, I, Hv, Hv], dim=0)
        report["q <- Q"] = _copy_block(qd, q)
        report["k <- K"] = _copy_block(kd, k)
        report["v <- V"] = _copy_block(vd, v)
        a.zero_()
        b.zero_()
        report["a, b inputs"] = "zero (beta 0.5; dt_bias, A_log: fresh draw)"
        _identity_conv(mixer.conv1d)
        report["conv1d"] = "identity"
        gate.zero_()
        report["gate"] = "zero until calibrated"
    else:
        raise ValueError(f"no attention mapping for {token!r}")
    report["out_proj <- O"] = _copy_block(mixer.out_proj.weight, attn.o_proj.weight)
    dropped = [n for n, p in attn.named_parameters() if n.endswith("bias") or "_norm" in n]
    if dropped:
        report[", ".join(dropped)] = f"not carried (no counterpart in {token})"
    return report


def _heads(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """Rows [n*hd, d] as [n, hd, d]."""
    return w.view(n, hd, w.shape[-1])


def _grouped(rows: torch.Tensor, groups: int, state: int):
    return rows.view(groups, state, rows.shape[-1])


@torch.no_grad()
def layer_inputs(model: HybridLM, tokens: torch.Tensor, index: int) -> torch.Tensor:
    """The normed input of sublayer ``index`` (what its mixer sees) for ``tokens``."""
    seen: dict[str, torch.Tensor] = {}
    block = model.layers[index]
    handle = block.mixer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    try:
        model.hidden_states(tokens)
    finally:
        handle.remove()
    return seen["x"]


@torch.no_grad()
def calibrate(mixer: nn.Module, attn: Attention, x: torch.Tensor) -> dict[str, str]:
    """Fit the output gate and the norm scale of a converted S or D mixer on inputs ``x``.

    The gate rows all become one vector ``w`` fitted by ridge least squares so that
    ``w . x_t`` is about ``GATE_TARGET`` on every token; the norm scale is the per-channel least
    squares fit of the mixer's normalised output to the teacher's per-head attention output
    (before ``o_proj``), so that ``out_proj <- O`` reads what it expects.
    """
    if mixer.token not in ("S", "D"):
        return {}
    flat = x.reshape(-1, x.shape[-1]).double()
    lam = 1e-3 * flat.pow(2).mean() * flat.shape[0]
    gram = flat.T @ flat + lam * torch.eye(flat.shape[1], dtype=flat.dtype)
    w = torch.linalg.solve(gram, flat.T @ torch.ones(flat.shape[0], dtype=flat.dtype))
    rows = mixer.in_proj.weight
    start, n = (0, mixer.inner_dim) if mixer.token == "S" else (mixer.conv_dim, mixer.inner_dim)
    target = GATE_TARGET[mixer.token]
    rows[start : start + n] = (target * w).to(rows.dtype)
    positive = float(((flat @ w) > 0).double().mean())
    report = {"gate": f"fitted (w.x ~ {target:g}; positive on {positive:.1%} of tokens)"}
    report["norm scale"] = _fit_norm_scale(mixer, attn, x)
    return report


# Mamba-2's gated norm removes any per-token scale: a large positive gate keeps silu(z) ~ z > 0.
# DeltaNet's gate multiplies after the norm: silu(1.278) = 1, so the gate is about 1.
GATE_TARGET = {"S": 8.0, "D": 1.278}


def _fit_norm_scale(mixer: nn.Module, attn: Attention, x: torch.Tensor) -> str:
    want = _inner(attn, x).double()  # [B, T, H*hd]
    scale = mixer.norm.weight if mixer.token == "S" else mixer.norm_weight
    scale.fill_(1.0)
    got = _inner(mixer, x).double()  # the normed (and gated) output, unscaled
    width = min(got.shape[-1], want.shape[-1])
    got, want = got[..., :width].reshape(-1, width), want[..., :width].reshape(-1, width)
    if mixer.token == "S":
        fit = (got * want).sum(0) / got.pow(2).sum(0).clamp_min(1e-12)
        scale[:width] = fit.to(scale.dtype)
        return f"fitted per channel on {got.shape[0]} tokens"
    V = mixer.v_head_dim
    got, want = got.reshape(-1, V), want.reshape(-1, V)
    fit = (got * want).sum(0) / got.pow(2).sum(0).clamp_min(1e-12)
    scale.copy_(fit.to(scale.dtype))
    return f"fitted per value channel (shared by heads) on {got.shape[0] // (width // V)} tokens"


def _inner(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A mixer's output before its output projection (run with ``project=False`` once)."""
    module.project = False
    try:
        return module(x)
    finally:
        module.project = True


def convert_model(
    teacher: HybridLM,
    student_arch: Architecture,
    *,
    init: str = "attention",
    calib_tokens: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[HybridLM, dict[int, dict[str, str]]]:
    """The student: ``teacher``'s weights, its converted mixers initialised by ``init``.

    ``init``: ``attention`` (the mapping above, then ``calibrate`` when ``calib_tokens`` are
    given) or ``random`` (the primitive's own initialisation, calibrated the same way, for
    comparison). Returns the model and, per converted sublayer, what each part got.
    """
    if init not in ("attention", "random"):
        raise ValueError(f"init must be 'attention' or 'random', got {init!r}")
    t_arch = teacher.arch
    if len(student_arch.layers) != len(t_arch.layers):
        raise UserError(
            f"student {student_arch.pattern} and teacher {t_arch.pattern} differ in depth"
        )
    # The conversion runs on the CPU (the teacher goes back to its device afterwards).
    device = next(teacher.parameters()).device
    teacher.cpu()
    try:
        return _convert(teacher, student_arch, init, calib_tokens, seed)
    finally:
        teacher.to(device)


def _convert(teacher, student_arch, init, calib_tokens, seed):
    t_arch = teacher.arch
    student = build_model(student_arch, seed=seed)
    converted = []
    with torch.no_grad():
        for i, (s_layer, t_layer) in enumerate(zip(student_arch.layers, t_arch.layers)):
            s_blk, t_blk = student.layers[i], teacher.layers[i]
            if s_layer == t_layer:
                s_blk.load_state_dict(t_blk.state_dict())
            elif t_layer == ("A",) and s_layer[0] in TARGETS and len(s_layer) == 1:
                s_blk.norm.load_state_dict(t_blk.norm.state_dict())
                converted.append(i)
            else:
                raise UserError(f"sublayer {i}: {t_layer} cannot become {s_layer}")
        student.embed.load_state_dict(teacher.embed.state_dict())
        student.norm.load_state_dict(teacher.norm.state_dict())
        if not student_arch.shape.tie_embeddings:
            student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    reports: dict[int, dict[str, str]] = {}
    for i in converted:
        mixer, attn = student.layers[i].mixer, teacher.layers[i].mixer
        report = init_from_attention(mixer, attn) if init == "attention" else {"all": "fresh"}
        if init == "random" and mixer.token == "W":
            report = {"all": "fresh"}
        if calib_tokens is not None:
            x = layer_inputs(teacher, calib_tokens.cpu(), i)
            report.update(calibrate(mixer, attn, x))
        reports[i] = report
    return student, reports


def describe(reports: dict[int, dict[str, Any]]) -> list[str]:
    """One line per converted sublayer, for reports."""
    return [
        f"sublayer {i}: " + "; ".join(f"{k}: {v}" for k, v in r.items()) for i, r in reports.items()
    ]
