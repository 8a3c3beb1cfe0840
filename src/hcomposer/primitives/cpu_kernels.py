"""Fused bf16 decode kernels for CPUs (``csrc/decode_cpu.c``), built on first use.

On a CPU without a native bf16 dot product (AVX2), PyTorch's bf16 matrix-vector kernels read
memory at about a third of the machine's bandwidth, and a decode step of a small model is
hundreds of small operations at several microseconds of dispatch each, so single-token decoding
-- which only has to read every weight and the cache once -- runs far below its roofline. The
C kernels read each bf16 element once and accumulate in fp32 registers: linear layers with a
few rows (``linear``), SwiGLU (``swiglu``), RMSNorm (``rmsnorm``), single-query attention over
the ordinary KV cache layout (``attn_decode``; ``attn_step`` adds RoPE and the cache write),
Mamba-2's step (``ssm_step``), and whole decode blocks ``x + mixer(norm(x))`` in one call
(``block_attn``, ``block_mlp``, ``block_ssm``).

The C file is compiled with the system compiler (``$CC``, else ``cc``; ``-O3 -march=native``,
OpenMP when the compiler has it, sharing PyTorch's ``libgomp``) into a per-user cache
(``$HCOMPOSER_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/hcomposer/kernels``), keyed by a hash of the
source, the flags, the compiler and the CPU, and loaded with ctypes. Nothing is downloaded. If
there is no compiler, the build fails, the cache folder cannot be written, or
``HCOMPOSER_CPU_KERNELS=0`` is set, every call returns ``None`` and the callers keep their
PyTorch paths; ``status()`` says which it is.

The kernels are used only where they stand in for the PyTorch operation: CPU tensors in bf16,
no autograd (``torch.no_grad()`` or tensors that need no gradient), not under
``torch.compile``, shapes checked here and again in C, and only while ``fast_decoding()`` holds
(``reference_decoding()`` turns them off with the other fast paths). Linear layers, norms,
SwiGLU and the SSM step round where PyTorch rounds; attention keeps q, the scores and the
weights in fp32, so it is closer to an fp64 reference than PyTorch's bf16 decode path
(``tests/test_cpu_kernels.py``). A call that returns ``None`` has changed nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from hcomposer.primitives.decoding import fast_decoding

__all__ = [
    "available",
    "enabled",
    "status",
    "linear",
    "swiglu",
    "rmsnorm",
    "attn_decode",
    "attn_step",
    "ssm_step",
    "kernels_disabled",
    "MAX_ROWS",
]

# A linear layer takes the kernel when its input has at most this many rows (decoding).
MAX_ROWS = 8
_MAX_X = 8 * 8192  # the C side's fp32 copy of the input lives on its stack
_SOURCE = "decode_cpu.c"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_OFF = [False]


def _cache_dir() -> Path:
    env = os.environ.get("HCOMPOSER_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hcomposer" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(src: Path, out: Path, cc: list[str], flags: tuple[str, ...]) -> str | None:
    """Compile into ``out`` atomically; the compiler's error text on failure, else None."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
        os.close(fd)
        proc = subprocess.run([*cc, *flags, "-o", tmp, str(src), "-lm"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip() or f"{cc[0]} exited {proc.returncode}"
        os.chmod(tmp, 0o755)  # mkstemp's 0600: let other users of a shared cache load it
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("HCOMPOSER_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None, "off (HCOMPOSER_CPU_KERNELS=0)"
    cc_text = (
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )
    cc = shlex.split(cc_text or "")
    if not cc:
        return None, "off (no C compiler found; set CC)"
    try:
        src = resources.files("hcomposer.primitives") / "csrc" / _SOURCE
    except ImportError:  # the flat copy in an exported model's remote code: no C source
        return None, "off (no C source next to this module)"
    if not src.is_file():
        return None, "off (no C source next to this module)"
    with resources.as_file(src) as path:
        text = path.read_bytes()
        errors = []
        for extra in (("-fopenmp",), ()):
            flags = _FLAGS + extra
            key = hashlib.sha256(
                b"\0".join(
                    [
                        text,
                        " ".join(flags).encode(),
                        " ".join(cc).encode(),
                        _compiler_id(cc),
                        _cpu_signature().encode(),
                    ]
                )  # fmt: skip
            ).hexdigest()[:16]
            lib_path = _cache_dir() / f"decode_cpu-{key}.so"
            if not lib_path.is_file():
                err = _compile(path, lib_path, cc, flags)
                if err is not None:
                    errors.append(err)
                    continue
            try:
                lib = ctypes.CDLL(str(lib_path))
            except OSError as e:
                errors.append(str(e))
                continue
            _declare(lib)
            openmp = lib.hc_openmp() > 0
            return lib, f"on ({lib_path.name}, {'OpenMP' if openmp else 'one thread'})"
    last = (errors[-1].splitlines() or ["?"])[-1][:200] if errors else "?"
    return None, f"off (the build failed: {last})"


def _compiler_id(cc: list[str]) -> bytes:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.hc_gemv_bf16.argtypes = [p, i64, p, p, p, i64, i64, i64, i32]
    lib.hc_gemv_bf16.restype = i32
    lib.hc_swiglu_bf16.argtypes = [p, p, i64, p, p, i64, i64, i64, i32]
    lib.hc_swiglu_bf16.restype = i32
    lib.hc_rmsnorm_bf16.argtypes = [p, p, p, i64, i64, f32]
    lib.hc_rmsnorm_bf16.restype = i32
    lib.hc_attn_step.argtypes = [p, p, p, p, p, p, p, *([i64] * 5), p, *([i64] * 6), f32, p, i32]
    lib.hc_attn_step.restype = i32
    lib.hc_attn_decode.argtypes = [p, p, p, p, *([i64] * 11), f32, p, i32]
    lib.hc_attn_decode.restype = i32
    lib.hc_ssm_step.argtypes = [p, i64, *([p] * 9), *([i64] * 7), f32]
    lib.hc_ssm_step.restype = i32
    lib.hc_block_mlp.argtypes = [p, p, i64, i64, p, f32, p, p, i64, i64, p, i64, i32]
    lib.hc_block_ssm.argtypes = [p, p, i64, i64, p, f32, p, i64, i64, p, i64, *([p] * 8),
                                 *([i64] * 6), f32, i32]  # fmt: skip
    lib.hc_block_attn.argtypes = [p, p, i64, i64, p, f32, p, p, p, p, *([i64] * 7), p, p, i64,
                                  p, *([i64] * 6), p, i32]  # fmt: skip
    for fn in (lib.hc_block_mlp, lib.hc_block_ssm, lib.hc_block_attn):
        fn.restype = i32
    lib.hc_openmp.argtypes = []
    lib.hc_openmp.restype = i32


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                try:
                    lib, why = _build()
                except Exception as e:  # never let a broken build break the model
                    lib, why = None, f"off (the build failed: {type(e).__name__}: {e})"
                _STATE["status"] = why
                _STATE["lib"] = lib
    return _STATE["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call)."""
    return _lib() is not None


def enabled() -> bool:
    """True when the kernels are available and not turned off by ``kernels_disabled()``."""
    return not _OFF[0] and available()


def status() -> str:
    """'on (...)' or 'off (why)': for reports."""
    _lib()
    return str(_STATE["status"])


@contextmanager
def kernels_disabled(disabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel call returns None (the PyTorch fast paths run):
    for tests and benchmarks that compare the two in one process."""
    before = _OFF[0]
    _OFF[0] = disabled or before
    try:
        yield
    finally:
        _OFF[0] = before


def _usable(*tensors: torch.Tensor) -> bool:
    if _OFF[0] or not fast_decoding() or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.bfloat16 or (grad and t.requires_grad):
            return False
    return True


def _ready(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The loaded library if the kernels may take these tensors now, else None."""
    return _lib() if _usable(*tensors) else None


def _rows_ok(x: torch.Tensor, K: int) -> bool:
    return x.shape[-1] == K and 0 < x.numel() <= MAX_ROWS * K and x.numel() <= _MAX_X


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)`` for bf16 inputs of at most ``MAX_ROWS`` rows, else None."""
    if weight.dim() != 2 or weight.stride(1) != 1 or not _rows_ok(x, weight.shape[1]):
        return None
    if bias is not None and (bias.shape != (weight.shape[0],) or not _usable(bias)):
        return None
    lib = _ready(x, weight)
    if lib is None:
        return None
    N, K = weight.shape
    xc = x.contiguous()
    bc = None if bias is None else bias.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    rc = lib.hc_gemv_bf16(weight.data_ptr(), weight.stride(0), xc.data_ptr(),
                          None if bc is None else bc.data_ptr(), y.data_ptr(), xc.numel() // K,
                          N, K, torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """``F.silu(F.linear(x, gate)) * F.linear(x, up)`` (bf16, few rows) in one pass, or None."""
    if (gate.dim() != 2 or gate.shape != up.shape or gate.stride() != up.stride()
            or gate.stride(1) != 1 or not _rows_ok(x, gate.shape[1])):  # fmt: skip
        return None
    lib = _ready(x, gate, up)
    if lib is None:
        return None
    N, K = gate.shape
    xc = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    rc = lib.hc_swiglu_bf16(gate.data_ptr(), up.data_ptr(), gate.stride(0), xc.data_ptr(),
                            y.data_ptr(), xc.numel() // K, N, K,
                            torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """hcomposer's RMSNorm (fp32 inside, one bf16 rounding) for bf16 rows, or None."""
    if weight.dim() != 1 or not weight.is_contiguous() or not _rows_ok(x, weight.shape[0]):
        return None
    lib = _ready(x, weight)
    if lib is None:
        return None
    xc = x.contiguous()
    out = torch.empty_like(xc)
    lib.hc_rmsnorm_bf16(xc.data_ptr(), weight.data_ptr(), out.data_ptr(),
                        xc.numel() // weight.shape[0], weight.shape[0], eps)  # fmt: skip
    return out


def _kv_ok(q, k_cache, v_cache) -> bool:
    """q [B, H, 1, hd] against caches [B, Hkv, L, hd]: the shapes the C side takes."""
    return (
        q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
        and q.shape[2] == 1 and q.shape[0] == k_cache.shape[0] >= 1
        and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
        and q.shape[1] % k_cache.shape[1] == 0 and q.shape[1] // k_cache.shape[1] <= 16
        and 0 < q.shape[3] <= 256 and q.shape[3] == k_cache.shape[3]
    )  # fmt: skip


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``decode_attention(q, k, v)`` through the C kernel, or None where it does not apply.

    q [B, H, 1, hd]; k, v [B, Hkv, L, hd] with the head dimension contiguous (``stride(3) ==
    1``: the ordinary cache layout, which the kernel reads as one stream per head). The scores
    and the softmax stay in fp32 (``decode_attention`` rounds the scores to bf16 first).
    """
    if q.dim() != 4 or q.shape[2] != 1 or k.shape[2] < 1 or not _kv_ok(q, k, v):
        return None
    lib = _ready(q, k, v)
    if lib is None:
        return None
    B, H, _, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qc = q.contiguous()
    out = torch.empty(B, H, 1, hd, dtype=torch.bfloat16)
    work = torch.empty(B * H * L, dtype=torch.float32)
    rc = lib.hc_attn_decode(qc.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                            B, H, Hkv, hd, L, k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), hd**-0.5, work.data_ptr(),
                            torch.get_num_threads())  # fmt: skip
    return out if rc == 0 else None


def attn_step(q, k, v, k_cache, v_cache, pos: int, inv_freq: torch.Tensor):
    """One whole decode step of global attention, or None (nothing written) if it does not
    apply: rotate q [B, H, 1, hd] and k [B, Hkv, 1, hd] to ``pos`` (RoPE, half-split), store
    k and v in the caches [B, Hkv, max_len, hd] at ``pos``, attend over positions 0..pos.
    Returns [B, H, 1, hd] bf16. q, k, v may be views of the projections' outputs."""
    if (not _kv_ok(q, k_cache, v_cache) or not 0 <= pos < k_cache.shape[2]
            or k.shape != v.shape or tuple(k.shape) != (q.shape[0], k_cache.shape[1], 1, q.shape[3])
            or q.shape[3] % 2
            or inv_freq.dtype != torch.float32 or inv_freq.numel() * 2 != q.shape[3]):  # fmt: skip
        return None
    lib = _ready(q, k, v, k_cache, v_cache)
    if lib is None:
        return None
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(B, H, 1, hd, dtype=torch.bfloat16)
    qr = torch.empty(B, H, 1, hd, dtype=torch.bfloat16)
    work = torch.empty(B * H * (pos + 1), dtype=torch.float32)
    inv = inv_freq.contiguous()
    rc = lib.hc_attn_step(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), k_cache.data_ptr(),
                          v_cache.data_ptr(), out.data_ptr(), qr.data_ptr(), B, H, Hkv, hd, pos,
                          inv.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                          k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                          v_cache.stride(2), hd**-0.5, work.data_ptr(),
                          torch.get_num_threads())  # fmt: skip
    return out if rc == 0 else None


def _ssm_cache_ok(m, cache, batch: int) -> bool:
    """The cache's states have the shapes the step writes (batch rows of this module's)."""
    return (
        batch >= 1
        and tuple(cache.conv_state.shape) == (batch, m.conv_dim, m.d_conv - 1)
        and tuple(cache.ssm_state.shape) == (batch, m.n_heads, m.head_dim, m.d_state)
        and tuple(m.conv1d.weight.shape) == (m.conv_dim, 1, m.d_conv)
    )


def ssm_step(m, zxbcdt: torch.Tensor, cache) -> torch.Tensor | None:
    """Mamba-2's decode step after the input projection (``Mamba2._decode_step``'s arithmetic
    in one kernel), or None where it does not apply (then nothing was changed).

    ``m`` is the Mamba2 module, ``zxbcdt`` [B, inner + conv_dim + H] bf16, ``cache`` its
    Mamba2Cache (bf16 conv state, fp32 SSM state, both updated in place). Returns the gated,
    normed output [B, inner] in bf16, before the output projection."""
    cs, ss = cache.conv_state, cache.ssm_state
    params = (m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight)
    B = zxbcdt.shape[0] if zxbcdt.dim() == 2 else 0
    if (zxbcdt.dim() != 2 or zxbcdt.shape[1] != m.in_proj.out_features
            or not _ssm_cache_ok(m, cache, B)
            or zxbcdt.stride(1) != 1 or ss.dtype != torch.float32
            or not ss.is_contiguous() or not cs.is_contiguous() or m.conv1d.bias is None
            or m.conv_dim > 65536 or not all(t.is_contiguous() for t in params)):  # fmt: skip
        return None
    lib = _ready(zxbcdt, cs, *params)
    if lib is None:
        return None
    B = zxbcdt.shape[0]
    out = torch.empty(B, m.inner_dim, dtype=torch.bfloat16)
    rc = lib.hc_ssm_step(zxbcdt.data_ptr(), zxbcdt.stride(0), cs.data_ptr(),
                         *(t.data_ptr() for t in params), ss.data_ptr(), out.data_ptr(),
                         B, m.n_heads, m.head_dim, m.n_groups, m.d_state, m.d_conv,
                         m.norm.group_size, m.norm.eps)  # fmt: skip
    return out if rc == 0 else None


def _block_ready(x: torch.Tensor, norm) -> bool:
    """A decode block applies: bf16 rows (few) on CPU outside autograd, kernels on."""
    return (
        x.dtype == torch.bfloat16
        and x.is_cpu
        and x.is_contiguous()
        and 0 < x.numel() <= min(MAX_ROWS * x.shape[-1], _MAX_X)
        and norm.weight.dtype == torch.bfloat16
        and norm.weight.is_contiguous()
        and _usable(x, norm.weight)
        and _lib() is not None
    )


def block_mlp(x: torch.Tensor, norm, ffn) -> torch.Tensor | None:
    """``x + ffn(norm(x))`` for the SwiGLU ``ffn`` in one kernel call, or None."""
    g, u, dn = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    if not _block_ready(x, norm) or g.stride() != u.stride() or g.stride(1) != 1:
        return None
    if dn.stride(1) != 1 or x.shape[:-1].numel() * g.shape[0] > _MAX_X or not _usable(g, u, dn):
        return None
    out = torch.empty_like(x)
    rc = _lib().hc_block_mlp(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                             x.shape[-1], norm.weight.data_ptr(), norm.eps, g.data_ptr(),
                             u.data_ptr(), g.stride(0), g.shape[0], dn.data_ptr(), dn.stride(0),
                             torch.get_num_threads())  # fmt: skip
    return out if rc == 0 else None


def block_ssm(x: torch.Tensor, norm, m, cache) -> torch.Tensor | None:
    """``x + m(norm(x), cache)`` for a projecting Mamba2 ``m`` (one decode step), or None
    (then nothing was changed)."""
    if not m.project or cache is None or not _block_ready(x, norm):
        return None
    w_in, w_out = m.in_proj.weight, m.out_proj.weight
    cs, ss = cache.conv_state, cache.ssm_state
    params = (m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight)
    rows = x.numel() // x.shape[-1]
    if (w_in.stride(1) != 1 or w_out.stride(1) != 1 or ss.dtype != torch.float32
            or not ss.is_contiguous() or not cs.is_contiguous() or m.conv1d.bias is None
            or m.conv_dim > 65536 or not _ssm_cache_ok(m, cache, rows)
            or rows * w_in.shape[0] > _MAX_X
            or not all(t.is_contiguous() for t in params)):  # fmt: skip
        return None
    if not _usable(w_in, w_out, cs, *params):
        return None
    out = torch.empty_like(x)
    rc = _lib().hc_block_ssm(x.data_ptr(), out.data_ptr(), rows, x.shape[-1],
                             norm.weight.data_ptr(), norm.eps, w_in.data_ptr(), w_in.stride(0),
                             w_in.shape[0], w_out.data_ptr(), w_out.stride(0), cs.data_ptr(),
                             *(t.data_ptr() for t in params), ss.data_ptr(), m.n_heads,
                             m.head_dim, m.n_groups, m.d_state, m.d_conv, m.norm.group_size,
                             m.norm.eps, torch.get_num_threads())  # fmt: skip
    if rc != 0:
        return None
    cache.pos += 1
    return out


def block_attn(x: torch.Tensor, norm, a, cache, inv_freq: torch.Tensor) -> torch.Tensor | None:
    """``x + a(norm(x), cache)`` for a projecting global Attention ``a`` (one decode step,
    the new key and value written into ``cache``), or None (then nothing was written)."""
    if not a.project or cache is None or not _block_ready(x, norm):
        return None
    kc, vc = cache.k, cache.v
    ws = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight)
    rows, hd = x.numel() // x.shape[-1], a.head_dim
    if (rows != kc.shape[0] or not 0 <= cache.pos < kc.shape[2] or kc.stride(3) != 1
            or kc.dim() != 4 or kc.shape[1] != a.n_kv_heads or kc.shape[3] != hd
            or inv_freq.numel() * 2 != hd
            or vc.stride(3) != 1 or kc.shape != vc.shape or hd % 2 or hd > 256
            or a.n_heads // a.n_kv_heads > 16 or rows * a.n_heads * hd > _MAX_X
            or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous()
            or any(w.stride(1) != 1 for w in ws)):  # fmt: skip
        return None
    if not _usable(kc, vc, *ws):
        return None
    out = torch.empty_like(x)
    work = torch.empty(rows * a.n_heads * (cache.pos + 1), dtype=torch.float32)
    rc = _lib().hc_block_attn(x.data_ptr(), out.data_ptr(), rows, x.shape[-1],
                              norm.weight.data_ptr(), norm.eps, *(w.data_ptr() for w in ws),
                              *(w.stride(0) for w in ws), a.n_heads, a.n_kv_heads, hd,
                              kc.data_ptr(), vc.data_ptr(), cache.pos, inv_freq.data_ptr(),
                              kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0),
                              vc.stride(1), vc.stride(2), work.data_ptr(),
                              torch.get_num_threads())  # fmt: skip
    if rc != 0:
        return None
    cache.pos += 1
    return out
