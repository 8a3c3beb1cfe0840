"""E: the routed computation equals a dense reference; balancing, load and accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hcomposer import Architecture, build_model, count_costs
from hcomposer.primitives.moe import MixtureOfExperts
from hcomposer.shapes import get_shape


def _moe(seed: int = 0, **changes) -> MixtureOfExperts:
    shape = get_shape("tiny").replace(**changes)
    torch.manual_seed(seed)
    m = MixtureOfExperts(shape)
    # Default nn.Linear init is fine here; make the router decisive enough to matter.
    with torch.no_grad():
        m.router.weight.normal_(0.0, 0.5)
    return m


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def _dense_reference(m: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by an independently computed top-k."""
    flat = x.reshape(-1, x.shape[-1])
    logits = (flat @ m.router.weight.T).float()
    if m.router_kind == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
    choice = scores + (m.expert_bias if m.balance == "bias" else 0.0)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    # Rank-based top-k: expert e is chosen when fewer than k experts beat it.
    for e in range(m.n_experts):
        beats = (choice > choice[:, e : e + 1]).sum(-1)
        chosen[:, e] = beats < m.top_k
    gates = torch.where(chosen, scores, torch.zeros_like(scores))
    if m.router_kind == "sigmoid" and m.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    all_out = torch.stack(
        [
            _swiglu(flat, e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)
            for e in m.experts
        ],
        dim=1,
    )  # [N, E, d]
    y = (gates[:, :, None].to(all_out.dtype) * all_out).sum(1)
    if m.shared is not None:
        s = m.shared
        y = y + _swiglu(flat, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "changes",
    [
        dict(router="sigmoid", top_k=2, n_shared_experts=1),
        dict(router="softmax", top_k=2, n_shared_experts=0),
        dict(router="sigmoid", top_k=1, n_shared_experts=2),
        dict(router="softmax", top_k=1, n_shared_experts=1, moe_balance="none"),
        dict(router="sigmoid", top_k=3, n_experts=6, n_shared_experts=0),
    ],
)
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_equals_dense_outputs_and_gradients(changes, dispatch):
    m = _moe(**changes).eval()
    m.dispatch = dispatch
    # A non-zero bias so that selection and gates come from different scores.
    m.expert_bias.copy_(torch.linspace(-0.2, 0.2, m.n_experts))
    x = torch.randn(3, 11, m.shape.d_model, requires_grad=True)
    y = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _dense_reference(m, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *m.parameters()])
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=name)
    # The router learns through the gates (also at top-1).
    assert grads[names.index("router.weight")].abs().sum() > 0


def test_bias_changes_selection_not_gates():
    for router in ("sigmoid", "softmax"):
        m = _moe(router=router, top_k=1).eval()
        x = torch.randn(64, m.shape.d_model)
        logits = m.router(x).float()
        scores = logits.sigmoid() if router == "sigmoid" else logits.softmax(-1)
        idx0, _ = m.select(x)
        # Push every token to the expert it used least.
        target = int(torch.bincount(idx0[:, 0], minlength=m.n_experts).argmin())
        m.expert_bias.zero_()
        m.expert_bias[target] = 10.0
        idx, gates = m.select(x)
        assert (idx[:, 0] == target).all()
        # Gates are the un-biased scores of the chosen expert.
        torch.testing.assert_close(gates[:, 0], scores[:, target])


def test_bias_update_only_in_training_and_towards_balance():
    m = _moe(router="sigmoid", top_k=1, moe_bias_rate=0.05)
    with torch.no_grad():
        # Skew the router hard towards expert 0.
        m.router.weight[0] += 0.3 * torch.ones(m.shape.d_model)
    x = torch.randn(128, m.shape.d_model).abs()
    m.eval()
    m(x)
    assert m.expert_bias.abs().sum() == 0  # eval never moves the bias
    first = m.last_load.clone()
    m.train()
    m(x)
    load = m.last_load.float()
    expected = 0.05 * torch.sign(load.mean() - load)
    torch.testing.assert_close(m.expert_bias, expected)
    with torch.no_grad():
        for _ in range(40):
            m(x)
        # The sign rule oscillates around balance: judge the load averaged over 20 steps.
        m.reset_load()
        for _ in range(20):
            m(x)
    mean_load = m.load_total.float() / 20
    spread, first_spread = (
        float(mean_load.max() - mean_load.min()),
        float(first.max() - first.min()),
    )
    assert spread < first_spread / 5


def test_auto_dispatch_picks_the_loop_for_uneven_load():
    m = _moe(top_k=1).eval()
    assert m._use_grouped([3, 3, 2, 2], 10)
    assert not m._use_grouped([10, 0, 0, 0], 10)
    # All tokens on one expert (the loop path under "auto") still equals the dense reference.
    m.expert_bias[1] = 100.0
    x = torch.randn(30, m.shape.d_model)
    torch.testing.assert_close(m(x), _dense_reference(m, x), atol=1e-5, rtol=1e-5)
    assert int(m.last_load[1]) == 30


def test_load_counts():
    m = _moe(top_k=2).eval()
    x = torch.randn(2, 9, m.shape.d_model)
    m.reset_load()
    m(x)
    assert int(m.last_load.sum()) == 2 * 9 * m.top_k
    idx, _ = m.select(x)
    assert torch.equal(m.last_load, torch.bincount(idx.reshape(-1), minlength=m.n_experts))
    m(x[:, :4])
    assert int(m.load_total.sum()) == (18 + 8) * m.top_k


def test_bias_stays_fp32_and_bf16_forward_runs():
    m = _moe().to(torch.bfloat16)
    assert m.expert_bias.dtype == torch.float32
    y = m(torch.randn(2, 5, m.shape.d_model, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_params_active_hand_formula():
    shape = get_shape("tiny").replace(
        n_experts=6, top_k=2, n_shared_experts=1, tie_embeddings=False
    )
    arch = Architecture.parse("AEFE", shape=shape)
    costs = count_costs(arch)
    d, v, h, hd = shape.d_model, shape.vocab_size, shape.expert_ffn_dim, shape.head_dim
    attn = d * shape.n_heads * hd * 2 + d * shape.n_kv_heads * hd * 2
    expert = 3 * d * h
    moe_total = d * shape.n_experts + shape.n_experts * expert + shape.n_shared_experts * expert
    mlp = 3 * d * shape.ffn_dim
    norms = 4 * d + d
    total = 2 * v * d + attn + mlp + 2 * moe_total + norms
    active = total - 2 * (shape.n_experts - shape.top_k) * expert
    assert costs.params_total == total
    assert costs.params_active == active
    model = build_model(arch, seed=0)
    assert sum(p.numel() for p in model.parameters()) == total
    # The inactive experts do no work per token: FLOPs follow the active count.
    attn_extra = sum(blk.mixer.extra_flops_per_token(costs.seq_len) for blk in model.layers)
    assert costs.flops_per_token == 2 * (active - v * d) + attn_extra


def test_no_python_loop_over_tokens_many_tokens_fast():
    # 4096 tokens through 4 experts: a per-token loop would take seconds; indexing takes ms.
    m = _moe().eval()
    x = torch.randn(4096, m.shape.d_model)
    import time

    t0 = time.perf_counter()
    with torch.no_grad():
        m(x)
    assert time.perf_counter() - t0 < 1.0


def _balance_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        m = _moe(0).train()
        m(_balance_input(rank))
        Path(out_dir, f"{rank}.json").write_text(json.dumps(m.expert_bias.tolist()))
    finally:
        torch.distributed.destroy_process_group()


def _balance_input(rank: int) -> torch.Tensor:
    d = get_shape("tiny").d_model
    # Rank 0's tokens favour other experts than rank 1's: local and global loads disagree.
    x = torch.randn(2, 16, d, generator=torch.Generator().manual_seed(rank + 1))
    return x + (3.0 if rank == 0 else -3.0) * _moe(0).router.weight[0]


@pytest.mark.slow
def test_ddp_balancing_bias_moves_by_the_global_load(tmp_path):
    """Two gloo processes, one MoE each, different tokens: both biases equal the update from
    the summed load (what one process seeing all tokens would do), not each rank's own."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_balance_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    got = [torch.tensor(json.loads((tmp_path / f"{r}.json").read_text())) for r in range(2)]
    loads = []
    for r in range(2):
        m = _moe(0).train()
        m(_balance_input(r))
        loads.append(m.last_load.float())
    rate = _moe(0).bias_rate
    total = loads[0] + loads[1]
    want = rate * torch.sign(total.mean() - total)
    local = [rate * torch.sign(load.mean() - load) for load in loads]
    assert not all(torch.equal(want, lo) for lo in local), "the inputs do not tell the two apart"
    for g in got:
        torch.testing.assert_close(g, want)
