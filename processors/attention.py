"""A faster CPU attention for encoder inference, registered with ``transformers`` as ``cw_cpu``.

PyTorch's CPU flash attention is slow on the narrow heads of small encoders (32 wide in
multilingual-e5-small): in a bfloat16 pass it took ~40% of the time for ~11% of the arithmetic.
``kernels/attention.c`` computes the same thing in float32 from the projections where the linear
layers left them, and writes the layout the model reads next, so nothing is copied around it.

The C file is compiled once per CPU and compiler into the cache
(``~/.cache/coalition-watch/kernels/``) with the system C compiler (``$CC``, else ``cc``); ``model
build`` does it at set-up, and the first load does it when it is missing. Where it cannot be
built (no compiler) or a call is outside what it handles (training, dropout, causal or cross
attention, masks other than right padding, another device or dtype), PyTorch's
``scaled_dot_product_attention`` runs instead, so results never depend on the kernel being there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = "cw_cpu"
SOURCE = Path(__file__).resolve().parent / "kernels" / "attention.c"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
SUPPORTED_DIMS = range(16, 129, 16)  # head widths the kernel takes (MAX_DIM in the C file)
MAX_SEQ = 8192  # longest sequence it takes (MAX_SEQ in the C file)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
# The 4-D padding mask is the same object for every layer of one forward pass: its per-sequence
# lengths are worked out once. Holds (mask, lengths or None when the mask is not right padding).
_mask_cache: tuple[Any, Any] | None = None


class KernelBuildError(RuntimeError):
    """The attention kernel could not be compiled or loaded."""


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


@functools.lru_cache(maxsize=8)
def _compiler_version(compiler: str) -> str:
    """``<compiler> --version``, asked once per process."""
    try:
        return subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def kernel_path(cache: Path | None = None) -> Path:
    """Where the kernel for this source, compiler, flags and CPU is (or will be) built."""
    from processors.e5convert import cache_root
    from processors.encoder import cpu_description

    compiler = _compiler()
    raw = b"|".join(
        [
            SOURCE.read_bytes(),
            compiler.encode(),
            _compiler_version(compiler).encode(),
            " ".join(CFLAGS).encode(),
            cpu_description().encode(),
        ]
    )
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return (cache or cache_root()) / "kernels" / f"attention-{digest}.so"


def build_kernel(cache: Path | None = None) -> Path:
    """Compile the kernel into the cache unless it is there; returns its path."""
    target = kernel_path(cache)
    if target.exists():
        return target
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler {compiler!r} on PATH (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".attention-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, "-o", tmp, str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)  # atomic: a concurrent loader sees all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_kernel(cache: Path | None = None) -> ctypes.CDLL:
    """The compiled kernel, built first if needed; loaded once per process."""
    global _lib, _load_error
    import torch  # noqa: F401  (first: the kernel's OpenMP calls then bind to PyTorch's runtime)

    with _lock:
        if _lib is not None:
            return _lib
        if _load_error is not None:
            raise KernelBuildError(_load_error)
        try:
            lib = ctypes.CDLL(str(build_kernel(cache)))
        except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
            _load_error = f"attention kernel unavailable: {exc}"
            raise KernelBuildError(_load_error) from exc
        lib.cw_attention_isa.restype = ctypes.c_char_p
        fn = lib.cw_attention
        fn.restype = ctypes.c_int
        ptr, i64p, cint = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64p, i64p, i64p,
                       cint, cint, cint, cint, cint, ctypes.c_float, cint]  # fmt: skip
        _lib = lib
        return lib


def kernel_isa(lib: ctypes.CDLL) -> str:
    """What the build targets: "avx512-bf16", "avx512", "avx2" or "generic"."""
    return str(lib.cw_attention_isa().decode())


def register(cache: Path | None = None, *, required: bool = False) -> bool:
    """Register ``cw_cpu`` with transformers where it helps; False (and why, in the log) if not.

    A "generic" build (no AVX2 or AVX-512) is slower than PyTorch's own kernel, so only
    ``required`` registers it.
    """
    try:
        lib = load_kernel(cache)
    except KernelBuildError as exc:
        if required:
            raise
        log.warning("%s; using PyTorch's scaled_dot_product_attention", exc)
        return False
    isa = kernel_isa(lib)
    if isa == "generic" and not required:
        log.info("attention kernel built without AVX2 or AVX-512; using PyTorch's sdpa")
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def _padding_lengths(mask: Any, batch: int, seq: int) -> Any:
    """int32 lengths per sequence if ``mask`` is right padding (None: no padding), else None."""
    import torch

    global _mask_cache
    if mask is None:
        return torch.full((batch,), seq, dtype=torch.int32)
    cached = _mask_cache
    if cached is not None and cached[0] is mask:
        return cached[1]
    lengths = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-1] == seq:
        rows = mask[:, 0]  # [batch or 1, q, k]
        first = rows[:, 0, :]
        counts = first.sum(-1)
        prefix = torch.arange(seq) < counts[:, None]
        if bool((first == prefix).all()) and bool((rows == first[:, None, :]).all()):
            lengths = counts.to(torch.int32).expand(batch).contiguous()
    _mask_cache = (mask, lengths)
    return lengths


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention call: [batch, heads, seq, dim] in, [batch, seq, heads, dim] out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lib = _lib
    batch, heads, seq, dim = query.shape
    usable = (
        not torch.is_grad_enabled()
        and not module.training
        and dropout == 0.0
        and not (is_causal or getattr(module, "is_causal", False))
        and not kwargs.get("output_attentions", False)
        and kwargs.get("position_bias") is None
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
        and key.dtype == query.dtype == value.dtype
        and key.shape == query.shape == value.shape
        and dim in SUPPORTED_DIMS
        and seq <= MAX_SEQ
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    )
    lengths = _padding_lengths(attention_mask, batch, seq) if usable else None
    if lib is not None and lengths is not None:
        out = torch.empty((batch, seq, heads, dim), dtype=query.dtype)

        def strides(t: Any) -> Any:  # batch, seq, head
            return (ctypes.c_int64 * 3)(t.stride(0), t.stride(2), t.stride(1))

        scale = float(scaling if scaling is not None else dim**-0.5)
        with torch.profiler.record_function("cw_attention"):  # named in profiles (--breakdown)
            rc = lib.cw_attention(
                query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(),
                lengths.data_ptr(), strides(query), strides(key), strides(value), batch, seq,
                heads, dim, int(query.dtype == torch.bfloat16), scale, torch.get_num_threads(),
            )  # fmt: skip
        if rc == 0:
            return out, None
        # 2: a thread could not allocate its scratch memory
        log.warning("attention kernel failed (code %d) on a %s batch; using sdpa", rc, query.shape)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        is_causal=is_causal, **kwargs,
    )  # fmt: skip
