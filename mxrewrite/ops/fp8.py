"""``mxrewrite::fp8_mm``: the GEMM of two FP8 operands with float32 per-tensor scales.

``fp8_mm(a, b, scale_a, scale_b, out_dtype) = (a * scale_a) @ (b * scale_b).T``
for ``a`` of shape ``(M, K)`` and ``b`` of shape ``(N, K)``, both row-major
(float8_e4m3fn or float8_e5m2), accumulated in float32. On a GPU with FP8 tensor
cores (sm_89+: Ada, Hopper, Blackwell) it is one ``torch._scaled_mm``, which wants
its second operand column-major: ``b.t()`` is exactly that, so no copy is made.
cuBLAS needs every dim divisible by 16: other shapes are zero-padded (a handful
of decode tokens, a reduction over an odd number of tokens) and the result cut
back. Elsewhere (CPU, older GPUs) the product is computed from the dequantised
operands in float32, which is exact up to the float32 accumulation.

The op is opaque to torch.compile (a ``custom_op``): Inductor traces and fuses
the casts that produce the operands, and calls cuBLAS for the product itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mxrewrite.errors import UnsupportedDtypeError
from mxrewrite.formats.fp8 import FP8_DTYPES

_ALIGN = 16

__all__ = ["fp8_matmul", "fp8_mm", "has_fp8_tensor_cores"]


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """sm_89 and newer run ``torch._scaled_mm`` with per-tensor scales on FP8 tensor cores."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if not rows and not cols:
        return t
    # (F.pad has no float8 kernels on every backend: pad the bytes)
    return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FP8_DTYPES:
            raise UnsupportedDtypeError.for_dtype(t.dtype, FP8_DTYPES, f"fp8_mm operand {name}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_mm multiplies (M, K) by (N, K).T; got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_scales(scale_a: torch.Tensor, scale_b: torch.Tensor) -> None:
    if scale_a.dim() or scale_b.dim():
        raise ValueError(f"fp8_mm takes 0-d (per-tensor) scales; got shapes {tuple(scale_a.shape)} and "
                         f"{tuple(scale_b.shape)}")


@torch.library.custom_op("mxrewrite::fp8_mm", mutates_args=())
def fp8_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b).T`` in ``out_dtype``; see the module docstring.

    ``fast_accum`` lets Hopper's tensor cores accumulate without the periodic promotion to float32 (faster,
    slightly less precise; torchao's float8 training uses it for the forward GEMM only, as we do)."""
    _check(a, b)
    _check_scales(scale_a, scale_b)
    (m, k), n = a.shape, b.shape[0]
    if not has_fp8_tensor_cores(a.device):
        out = (a.float() * scale_a) @ (b.float() * scale_b).t()
        return out.to(out_dtype)
    pad_m, pad_n, pad_k = (-m) % _ALIGN, (-n) % _ALIGN, (-k) % _ALIGN
    a = _pad(a.contiguous(), pad_m, pad_k)
    b = _pad(b.contiguous(), pad_n, pad_k)
    out = torch._scaled_mm(a, b.t(), scale_a.float(), scale_b.float(), out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out[:m, :n] if pad_m or pad_n else out


@fp8_mm.register_fake
def _(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False) -> torch.Tensor:
    """``torch._scaled_mm``'s contract (``b`` of shape ``(K, N)``, column-major) through ``mxrewrite::fp8_mm``."""
    return fp8_mm(a, b.t(), scale_a, scale_b, out_dtype, fast_accum)
