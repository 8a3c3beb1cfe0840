"""Shapes: how wide everything is. The pattern says which primitive sits where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hcomposer.config_io import Config, migrate, read_json_file
from hcomposer.errors import ShapeError, UserError
from hcomposer.fields import spec

__all__ = ["Shape", "PRESETS", "get_shape", "resolve_shape"]

_ROUTERS = ("softmax", "sigmoid")
_BALANCE = ("bias", "none")
_FUSIONS = ("diff", "concat", "add")


# Widths: a typo of three extra zeros is refused rather than allocated.
_HEADS = 2**12
_DIM = 2**14


@dataclass(frozen=True, kw_only=True)
class Shape(Config):
    """Every width of a model. Frozen, keyword-only, round-trips to JSON.

    ``n_layers`` is the reference depth in sublayers (the Llama baseline at this
    shape, e.g. 32 for Llama-3.2-1B's 16 attention + 16 MLP); the pattern decides
    the real depth of any given model.
    """

    _what: ClassVar[str] = "shape"
    _error: ClassVar[type[UserError]] = ShapeError

    name: str = spec("custom", help="preset name, or 'custom'")
    d_model: int = spec(ge=1, le=2**17, help="residual width")
    n_heads: int = spec(ge=1, le=_HEADS, help="attention query heads")
    n_kv_heads: int = spec(ge=1, le=_HEADS, help="attention key/value heads (GQA)")
    head_dim: int = spec(0, ge=0, le=_DIM, help="attention head width; 0: d_model // n_heads")
    ffn_dim: int = spec(ge=1, le=2**20, help="SwiGLU hidden width")
    vocab_size: int = spec(ge=1, le=2**23, unit="tokens")
    max_seq_len: int = spec(ge=1, le=2**24, unit="tokens")
    n_layers: int = spec(0, ge=0, le=2**16, help="reference depth in sublayers")
    tie_embeddings: bool = spec(True, help="output head shares the embedding matrix")
    rope_theta: float = spec(10000.0, gt=0, le=1e12, help="RoPE base")
    norm_eps: float = spec(1e-5, gt=0, le=1.0, help="RMSNorm epsilon")
    init_std: float = spec(0.02, gt=0, le=10.0, help="standard deviation of the initial weights")
    # A/W options of pretrained families (off: the Llama attention every model had before).
    attn_bias: bool = spec(False, help="A/W: biases on the q, k and v projections (Qwen2)")
    qk_norm: bool = spec(False, help="A/W: RMSNorm of every query and key head before RoPE (Qwen3)")
    # W: each query sees itself and the window - 1 tokens before it.
    window: int = spec(128, ge=1, le=2**24, unit="tokens", help="W: sliding window")
    # S: Mamba-2.
    ssm_state: int = spec(64, ge=1, le=_DIM, help="S: state size per head")
    ssm_expand: int = spec(2, ge=1, le=64, help="S: inner width / d_model")
    ssm_head_dim: int = spec(64, ge=1, le=_DIM, help="S: head width")
    ssm_conv: int = spec(4, ge=1, le=1024, help="S: causal conv width")
    ssm_groups: int = spec(1, ge=1, le=_HEADS, help="S: B/C groups")
    ssm_chunk: int = spec(64, ge=1, le=2**16, unit="tokens", help="S: scan chunk")
    # D: Gated DeltaNet. 0 = derived from the width in __post_init__: head dim min(64,
    # d_model/4); q/k heads d_model / (2 head dim), so keys are d_model/2 wide; v heads = q/k
    # heads; v head dim 2x the q/k one (values twice as wide as keys, as in the paper and
    # Qwen3-Next). The layer then holds about 4 d_model^2 weights, like MHA attention.
    dn_heads: int = spec(0, ge=0, le=_HEADS, help="D: q/k heads; 0: derived")
    dn_head_dim: int = spec(0, ge=0, le=_DIM, help="D: q/k head width; 0: derived")
    dn_v_heads: int = spec(0, ge=0, le=_HEADS, help="D: value heads; 0: dn_heads")
    dn_v_head_dim: int = spec(0, ge=0, le=_DIM, help="D: value head width; 0: derived")
    dn_conv: int = spec(4, ge=1, le=1024, help="D: short conv width")
    dn_chunk: int = spec(64, ge=1, le=2**16, unit="tokens", help="D: scan chunk")
    # E: mixture of experts (hybrid paper: 1 shared + top-1 of 8, halved experts, sigmoid).
    n_experts: int = spec(8, ge=1, le=4096, help="E: routed experts")
    top_k: int = spec(1, ge=1, le=4096, help="E: experts per token")
    n_shared_experts: int = spec(1, ge=0, le=4096, help="E: always-on experts")
    expert_ffn_dim: int = spec(0, ge=0, le=2**20, help="E: expert hidden width; 0: ffn_dim // 2")
    router: str = spec("sigmoid", choices=_ROUTERS, help="E: router gate")
    moe_balance: str = spec("bias", choices=_BALANCE, help="E: load balancing")
    moe_bias_rate: float = spec(1e-3, ge=0, le=1.0, help="E: balance-bias update rate")
    # [X|Y]: intra-layer hybrid fusion.
    fusion: str = spec("diff", choices=_FUSIONS, help="[X|Y]: how the branches are fused")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ShapeError(
                    f"shape {self.name!r}: n_heads={self.n_heads} does not divide "
                    f"d_model={self.d_model}; set head_dim or change n_heads",
                    field="n_heads",
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.expert_ffn_dim == 0:
            object.__setattr__(self, "expert_ffn_dim", max(self.ffn_dim // 2, 1))
        self._derive_deltanet()
        self._validate()

    def _where(self) -> str:
        return f"shape {self.name!r}"

    def _derive_deltanet(self) -> None:
        def put(name: str, value: int) -> None:
            if getattr(self, name) == 0:
                object.__setattr__(self, name, value)

        put("dn_head_dim", max(1, min(64, self.d_model // 4)))
        put("dn_heads", max(1, self.d_model // (2 * self.dn_head_dim)))
        put("dn_v_head_dim", 2 * self.dn_head_dim)
        put("dn_v_heads", self.dn_heads)

    def _fail(self, field_name: str, why: str) -> None:
        sep = "" if why.startswith("=") else " "
        raise ShapeError(f"shape {self.name!r}: {field_name}{sep}{why}", field=field_name)

    def _validate(self) -> None:
        # Types and ranges are the fields' declarations (checked by Config); here what
        # spans several fields.
        if self.n_heads % self.n_kv_heads:
            self._fail(
                "n_kv_heads",
                f"={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)",
            )
        if self.head_dim % 2:
            self._fail("head_dim", f"={self.head_dim} must be even for rotary embeddings")
        d_inner = self.ssm_expand * self.d_model
        if d_inner % self.ssm_head_dim:
            self._fail(
                "ssm_head_dim",
                f"={self.ssm_head_dim} must divide ssm_expand*d_model={d_inner}",
            )
        if (d_inner // self.ssm_head_dim) % self.ssm_groups:
            self._fail("ssm_groups", f"={self.ssm_groups} must divide the number of SSM heads")
        if self.dn_v_heads % self.dn_heads:
            self._fail(
                "dn_v_heads",
                f"={self.dn_v_heads} must be a multiple of dn_heads={self.dn_heads} (each q/k "
                "head serves dn_v_heads/dn_heads value heads)",
            )
        if self.top_k > self.n_experts:
            self._fail("top_k", f"={self.top_k} must not exceed n_experts={self.n_experts}")

    @property
    def ssm_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.ssm_inner // self.ssm_head_dim


# The columns of a ladder row (``n_layers`` counts sublayers).
_COLUMNS = (
    "name", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "n_layers", "window",
    "ssm_state", "ssm_head_dim",
)  # fmt: skip
_LADDER = [
    ("2m", 128, 4, 2, 384, 2048, 12, 128, 32, 32),
    ("10m", 256, 4, 2, 768, 2048, 24, 256, 64, 64),
    ("50m", 512, 8, 4, 1536, 2048, 32, 512, 64, 64),
    ("150m", 768, 12, 4, 2048, 4096, 48, 1024, 128, 64),
    ("350m", 1024, 16, 4, 4096, 4096, 48, 1024, 128, 64),
]


def _ladder(*row: str | int, **rest: Any) -> Shape:
    """One rung of the size ladder (a row of ``_COLUMNS``): a 32K vocabulary unless ``rest``
    says otherwise, the fields not given at their defaults."""
    return Shape(**dict(zip(_COLUMNS, row, strict=True)), **{"vocab_size": 32768, **rest})


def _llama(name: str, d: int, heads: int, kv: int, ffn: int, layers: int, tie: bool) -> Shape:
    """A Llama 3 model's real dimensions (``layers`` decoder blocks, two sublayers each)."""
    return _ladder(
        name, d, heads, kv, ffn, 131072, 2 * layers, 4096, 128, 128,
        vocab_size=128256, tie_embeddings=tie, rope_theta=500000.0, norm_eps=1e-5,
        ssm_chunk=256, dn_head_dim=128, dn_chunk=64,
    )  # fmt: skip


PRESETS: dict[str, Shape] = {
    s.name: s
    for s in [
        # Unit tests: everything tiny, but every divisibility rule exercised.
        Shape(
            name="tiny",
            d_model=64,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=128,
            vocab_size=256,
            max_seq_len=256,
            n_layers=4,
            window=16,
            ssm_state=16,
            ssm_head_dim=16,
            ssm_chunk=16,
            dn_chunk=16,
            n_experts=4,
            top_k=2,
            expert_ffn_dim=64,
        ),
        # Search proxy (Composer shrank width and depth for search): width 64 and a larger
        # initial scale than 0.02, calibrated on MAD recall (docs/proxies.md). At width 64-128
        # with init_std 0.02, attention's induction circuit had not formed after 1,500 steps;
        # with 0.15 it forms in 200-350; width 64 costs about half of width 128 per step.
        Shape(
            name="proxy",
            d_model=64,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=192,
            init_std=0.15,
            vocab_size=256,
            max_seq_len=1024,
            n_layers=6,
            window=64,
            ssm_state=32,
            ssm_head_dim=32,
            ssm_chunk=32,
            dn_chunk=32,
            n_experts=8,
            top_k=1,
            expert_ffn_dim=96,
        ),
        # The size ladder. ``2m`` is the quickstart's target: a 12-sublayer model a 2-core CPU
        # trains at a few thousand tokens per second (``10m`` trains at about 1,000 there in
        # fp32).
        *(_ladder(*row) for row in _LADDER),
        _llama("llama-3.2-1b", 2048, 32, 8, 8192, 16, True),
        _llama("llama-3.2-3b", 3072, 24, 8, 8192, 28, True),
        _llama("llama-3.1-8b", 4096, 32, 8, 14336, 32, False),
    ]
}


def get_shape(name: str) -> Shape:
    """A named preset; an unknown name lists the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown shape {name!r}; presets: {', '.join(PRESETS)}, or a path to a JSON file"
        ) from None


def resolve_shape(spec: str | Path | Shape | dict) -> Shape:
    """A Shape from a preset name, a JSON file path, a dict or a Shape."""
    if isinstance(spec, Shape):
        return spec
    if isinstance(spec, dict):
        return Shape.from_dict(spec)
    text = str(spec)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if text.endswith(".json") or path.exists():
        if not path.is_file():
            raise UserError(f"shape file {text!r} does not exist; give a preset or a JSON file")
        data = migrate(read_json_file(path, "shape file"), f"shape file {text!r}")
        base = data.pop("preset", None)
        try:
            if base is not None:
                if not isinstance(base, str):
                    raise UserError(f"field 'preset' must be a preset name, got {base!r}")
                return get_shape(base).replace(**data)
            return Shape.from_dict(data)
        except UserError as e:
            raise ShapeError(f"shape file {text!r}: {e}") from None
    return get_shape(text)
