"""Matrix products of block-scaled operands: ``A @ B.T`` with both blocked along the shared dim K.

Backends, chosen automatically from the device (override with the environment
variable ``MXREWRITE_MATMUL=emulated|triton|scaled_mm``):

* ``scaled_mm`` - sm_100+ (Blackwell): ``torch._scaled_mm`` on the raw MX/NVFP4
  operands with swizzled scales, the hardware's native block-scaled GEMM.
* ``triton`` - other CUDA GPUs (Hopper has no MX units): a Triton GEMM that
  dequantises the MX tiles in its prologue, so no dequantised copy of either
  operand is written to memory (:mod:`mxrewrite.ops.kernels.mx_gemm`). Needs
  Triton and an NVIDIA GPU (the kernel uses PTX); ROCm builds stay emulated.
* ``emulated`` - everywhere else: exact dequantisation, then a high-precision
  GEMM. On CPU operands are float32; on CUDA bfloat16, which holds every
  MXFP8 value and every e2m1 * e4m3 NVFP4 product exactly (the NVFP4 per-tensor
  scales are applied to the float32 accumulator afterwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mxrewrite.errors import ConfigError
from mxrewrite.formats import FormatSpec, get_format, mx_quantize, nvfp4_quantize
from mxrewrite.formats.e2m1 import e2m1_decode, unpack_nibbles
from mxrewrite.formats.e8m0 import e8m0_to_float32

BACKENDS = ("emulated", "triton", "scaled_mm")


@dataclass(frozen=True)
class BlockScaledMatrix:
    """A 2-D operand blocked along its last dim. ``data``/``scales`` are raw uint8 bytes."""

    data: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor
    spec: FormatSpec
    elem_dtype: torch.dtype  # float8_e4m3fn / float8_e5m2 for MX, float4_e2m1fn_x2 for NVFP4

    @property
    def rows(self) -> int:
        return self.data.shape[0]


def quantize_matrix(t: torch.Tensor, fmt: str | FormatSpec, *, scale_mode: str = "rceil",
                    elem_dtype: torch.dtype | None = None) -> BlockScaledMatrix:
    """Cast a 2-D tensor along its last dim (NVFP4 takes a per-tensor scale from ``amax(t)``).

    Data and scales come back contiguous whatever ``t``'s strides (a transposed ``t`` is
    how the backward GEMMs get operands blocked along their reduction dim)."""
    spec = get_format(fmt)
    t = t.contiguous()
    if spec.tensor_scale:
        data, scales, tscale = nvfp4_quantize(t)
        elem_dtype = spec.elem_dtype
    else:
        elem_dtype = elem_dtype or spec.elem_dtype
        data, scales = mx_quantize(t, elem_dtype=elem_dtype, block_size=spec.block_size, scale_mode=scale_mode)
        tscale = torch.ones((), dtype=torch.float32, device=t.device)
    return BlockScaledMatrix(data.view(torch.uint8), scales.view(torch.uint8), tscale, spec, elem_dtype)


def dequantize_matrix(m: BlockScaledMatrix, dtype: torch.dtype, *, with_tensor_scale: bool = True) -> torch.Tensor:
    """Exact values of ``m`` in ``dtype`` (the per-tensor scale optionally left out)."""
    block = m.spec.block_size
    if m.spec.tensor_scale:
        values = e2m1_decode(unpack_nibbles(m.data))
        scale = m.scales.view(torch.float8_e4m3fn).float()
    else:
        values = m.data.view(m.elem_dtype).float()
        scale = e8m0_to_float32(m.scales)
    rows, cols = values.shape
    out = (values.reshape(rows, cols // block, block) * scale.unsqueeze(-1)).reshape(rows, cols)
    if with_tensor_scale and m.spec.tensor_scale:
        out = out * m.tensor_scale
    return out.to(dtype)


def default_backend(device: torch.device) -> str:
    forced = os.environ.get("MXREWRITE_MATMUL")
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"MXREWRITE_MATMUL={forced!r} is not a backend; use one of {BACKENDS}")
        return forced
    if device.type != "cuda" or torch.version.hip is not None:
        return "emulated"
    if torch.cuda.get_device_capability(device)[0] >= 10:
        return "scaled_mm"
    from mxrewrite.ops import kernels

    return "triton" if kernels.available() else "emulated"


def _emulated_mm(a: BlockScaledMatrix, b: BlockScaledMatrix) -> torch.Tensor:
    dtype = torch.bfloat16 if a.data.is_cuda else torch.float32
    out = dequantize_matrix(a, dtype, with_tensor_scale=False) @ dequantize_matrix(b, dtype, with_tensor_scale=False).t()
    return out.float() * (a.tensor_scale * b.tensor_scale)


def _scaled_mm(a: BlockScaledMatrix, b: BlockScaledMatrix) -> torch.Tensor:
    from torchao.prototype.mx_formats.utils import to_blocked

    if a.spec.tensor_scale:
        out = torch._scaled_mm(
            a.data.view(torch.float4_e2m1fn_x2), b.data.view(torch.float4_e2m1fn_x2).t(),
            to_blocked(a.scales).view(torch.float8_e4m3fn), to_blocked(b.scales).view(torch.float8_e4m3fn),
            out_dtype=torch.bfloat16,
        )
    else:
        out = torch._scaled_mm(
            a.data.view(a.elem_dtype), b.data.view(b.elem_dtype).t(),
            to_blocked(a.scales).view(torch.float8_e8m0fnu), to_blocked(b.scales).view(torch.float8_e8m0fnu),
            out_dtype=torch.bfloat16,
        )
    return out.float() * (a.tensor_scale * b.tensor_scale)


def block_scaled_mm(a: BlockScaledMatrix, b: BlockScaledMatrix, backend: str | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A @ B.T`` in ``out_dtype`` (accumulated in float32) for ``A`` of shape ``(M, K)`` and ``B`` of
    shape ``(N, K)``."""
    backend = backend or default_backend(a.data.device)
    if backend == "scaled_mm" and a.elem_dtype == b.elem_dtype:
        out = _scaled_mm(a, b)
    elif backend == "triton":
        from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm

        out = triton_block_scaled_mm(a, b, out_dtype=out_dtype)
    else:
        out = _emulated_mm(a, b)
    return out.to(out_dtype)


@torch.library.custom_op("mxrewrite::block_scaled_mm", mutates_args=())
def _block_scaled_mm_op(
    a_data: torch.Tensor, a_scales: torch.Tensor, a_tensor_scale: torch.Tensor, a_elem: torch.dtype,
    b_data: torch.Tensor, b_scales: torch.Tensor, b_tensor_scale: torch.Tensor, b_elem: torch.dtype,
    fmt: str, out_dtype: torch.dtype,
) -> torch.Tensor:
    spec = get_format(fmt)
    # contiguous as traced, but Inductor may hand a custom op other strides
    a = BlockScaledMatrix(a_data.contiguous(), a_scales.contiguous(), a_tensor_scale, spec, a_elem)
    b = BlockScaledMatrix(b_data.contiguous(), b_scales.contiguous(), b_tensor_scale, spec, b_elem)
    return block_scaled_mm(a, b, out_dtype=out_dtype)


@_block_scaled_mm_op.register_fake
def _(a_data, a_scales, a_tensor_scale, a_elem, b_data, b_scales, b_tensor_scale, b_elem, fmt, out_dtype):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


def mx_matmul(a: BlockScaledMatrix, b: BlockScaledMatrix, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`block_scaled_mm` through the opaque op ``mxrewrite::block_scaled_mm``.

    torch.compile traces the casts around it (Inductor fuses them with their
    neighbours) but not the GEMM, whose kernels launch Triton or cuBLAS themselves.
    """
    return _block_scaled_mm_op(a.data, a.scales, a.tensor_scale, a.elem_dtype,
                               b.data, b.scales, b.tensor_scale, b.elem_dtype, a.spec.name, out_dtype)
