"""Converting attention sublayers to S, D or W: what is copied, how grouped heads repeat, what a
width mismatch leaves fresh, and (on real text, a briefly trained teacher) that the attention
initialisation beats a random one and a zero output at step 0."""

from __future__ import annotations

import pytest
import torch

from hcomposer.architecture import Architecture
from hcomposer.convert import load_teacher
from hcomposer.convert.mapping import (
    convert_model,
    layer_inputs,
    student_architecture,
)
from hcomposer.data import ByteTokenizer, embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.model import build_model


def _held_out(n_rows: int, length: int, offset: int) -> torch.Tensor:
    # Text after the teacher's 200K training characters.
    ids = ByteTokenizer().encode(embedded_corpus_text()[offset : offset + n_rows * length])
    return torch.tensor(ids[: n_rows * length]).view(n_rows, length)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("to", ["S", "D"])
def test_attention_init_beats_random_and_zero_on_real_text(small_teacher, to):
    teacher = load_teacher(small_teacher)
    calib = _held_out(8, 128, 300_000)
    held = _held_out(8, 128, 320_000)
    for layer in teacher.attention_layers:
        student_arch = student_architecture(teacher.arch, [layer], to)
        x = layer_inputs(teacher.model, held, layer)
        with torch.no_grad():
            want = teacher.model.layers[layer].mixer(x)
        errors = {}
        for init in ("attention", "random"):
            # Both calibrated the same way (gate and norm scale fitted on other text).
            student, _ = convert_model(
                teacher.model, student_arch, init=init, calib_tokens=calib, seed=1
            )
            with torch.no_grad():
                errors[init] = _rel_err(student.layers[layer].mixer(x), want)
        # A zero output's relative error is exactly 1.
        assert errors["attention"] < 0.95, errors
        assert errors["attention"] < errors["random"] - 0.05, errors


def test_w_keeps_attention_exactly(small_teacher):
    teacher = load_teacher(small_teacher)
    layer = teacher.attention_layers[1]
    student, report = convert_model(
        teacher.model, student_architecture(teacher.arch, [layer], "W"), seed=3
    )
    assert student.arch.pattern == "AFWFAF"
    t_sd, s_sd = teacher.model.state_dict(), student.state_dict()
    assert t_sd.keys() == s_sd.keys()
    for name in t_sd:
        torch.testing.assert_close(s_sd[name], t_sd[name], rtol=0, atol=0)
    assert report[layer] == {"q_proj k_proj v_proj o_proj": "kept exactly"}
    # Within the window (32) the logits are the teacher's; beyond it they differ.
    tokens = _held_out(2, 96, 300_000)
    with torch.no_grad():
        t_logits, s_logits = teacher.model(tokens), student(tokens)
    torch.testing.assert_close(s_logits[:, :32], t_logits[:, :32])
    assert not torch.allclose(s_logits[:, 40:], t_logits[:, 40:], atol=1e-3)


def test_everything_but_the_converted_mixer_is_the_teachers(small_teacher):
    teacher = load_teacher(small_teacher)
    student, reports = convert_model(
        teacher.model, student_architecture(teacher.arch, [0, 4], "S"), seed=0
    )
    assert student.arch.pattern == "SFAFSF" and set(reports) == {0, 4}
    t_sd = teacher.model.state_dict()
    for name, value in student.state_dict().items():
        if name.startswith(("layers.0.mixer.", "layers.4.mixer.")):
            continue
        torch.testing.assert_close(value, t_sd[name], rtol=0, atol=0)


def test_grouped_heads_repeat_as_attention_reads_them():
    # 4 query heads, 2 key/value heads: query heads 0,1 read KV head 0; heads 2,3 KV head 1.
    teacher_arch = Architecture.parse("AF", shape="tiny")
    from hcomposer.convert.teacher import for_conversion

    teacher_arch = for_conversion(teacher_arch)
    teacher = build_model(teacher_arch, seed=0)
    attn = teacher.layers[0].mixer
    hd, d = attn.head_dim, teacher_arch.shape.d_model
    k = attn.k_proj.weight.view(2, hd, d)
    v = attn.v_proj.weight.view(2, hd, d)
    q = attn.q_proj.weight.view(4, hd, d)
    for to in ("S", "D"):
        student, report = convert_model(teacher, student_architecture(teacher_arch, [0], to))
        mixer = student.layers[0].mixer
        assert all(v == "mapped" for key, v in report[0].items() if "<-" in key), report
        w = mixer.in_proj.weight
        if to == "S":
            inner, gn = mixer.inner_dim, mixer.n_groups * mixer.d_state
            x_rows = w[inner : 2 * inner].view(4, hd, d)
            b_rows = w[2 * inner : 2 * inner + gn].view(4, hd, d)
            c_rows = w[2 * inner + gn : 2 * inner + 2 * gn].view(4, hd, d)
            torch.testing.assert_close(c_rows, q / hd**0.5)
        else:
            kd = mixer.key_dim
            torch.testing.assert_close(w[:kd].view(4, hd, d), q)
            b_rows = w[kd : 2 * kd].view(4, hd, d)
            x_rows = w[2 * kd : 2 * kd + mixer.inner_dim].view(4, hd, d)
        for h in range(4):
            torch.testing.assert_close(b_rows[h], k[h // 2])
            torch.testing.assert_close(x_rows[h], v[h // 2])
        torch.testing.assert_close(mixer.out_proj.weight, attn.o_proj.weight)


def test_width_mismatch_says_what_is_fresh():
    from hcomposer.convert.teacher import for_conversion

    arch = for_conversion(Architecture.parse("AF", shape="tiny"))
    teacher = build_model(arch, seed=0)
    hd = arch.shape.head_dim
    narrow = arch.with_shape(arch.shape.replace(ssm_state=hd // 2))
    _, report = convert_model(teacher, student_architecture(narrow, [0], "S"))
    assert report[0]["x <- V"] == "mapped"
    assert report[0]["B <- K"] == ("partly mapped (leading 4x8x64 of the attention's 4x16x64 used)")
    wide = arch.with_shape(arch.shape.replace(dn_v_head_dim=2 * hd))
    student, report = convert_model(teacher, student_architecture(wide, [0], "D"))
    assert report[0]["q <- Q"] == "mapped"
    assert report[0]["v <- V"] == "partly mapped (64x64 of 128x64 mapped, the rest fresh)"


def test_only_attention_sublayers_convert():
    arch = Architecture.parse("AF", shape="tiny")
    with pytest.raises(UserError, match="not an attention sublayer"):
        student_architecture(arch, [1], "S")
    with pytest.raises(UserError, match="not an attention sublayer"):
        student_architecture(arch, [5], "S")
    with pytest.raises(UserError, match="converts to one of"):
        student_architecture(arch, [0], "F")
