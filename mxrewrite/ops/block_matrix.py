"""The operand of every block-scaled GEMM: :class:`BlockScaledMatrix`, its casts and its checks.

A 2-D tensor cast along its last dim (the GEMM's reduction dim K) into raw bytes
plus one scale per block. Every GEMM backend takes this type - the emulation and
the ``torch._scaled_mm`` call in :mod:`mxrewrite.ops.matmul`, the Triton kernels
in :mod:`mxrewrite.ops.kernels.mx_gemm` - so it lives here, below all of them,
and none of them imports another to get it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxrewrite.errors import BlockShapeError, ConfigError, LayoutError, UnsupportedDtypeError
from mxrewrite.formats import FormatSpec, get_format, mx_quantize, nvfp4_quantize
from mxrewrite.formats.e2m1 import e2m1_decode, unpack_nibbles
from mxrewrite.formats.e8m0 import e8m0_to_float32

# Element types a block-scaled operand can hold (MX: e4m3 / e5m2; NVFP4: packed e2m1 pairs).
ELEM_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float4_e2m1fn_x2)


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

    @property
    def cols(self) -> int:
        """K in elements (two per byte for the packed 4-bit formats)."""
        return self.data.shape[1] * self.spec.elems_per_byte


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


def check_operands(a: BlockScaledMatrix, b: BlockScaledMatrix) -> tuple[int, int, int]:
    """Validate the pair of ``A @ B.T`` and return ``(M, N, K)`` in elements.

    One format for both; raw uint8 data and scales, 2-D and contiguous along K; one
    scale per block; a shared K; one device. What every backend needs before it
    reinterprets the bytes.
    """
    if a.spec.block_size != b.spec.block_size or a.spec.tensor_scale != b.spec.tensor_scale:
        raise ConfigError(
            f"cannot multiply a {a.spec.name} operand by a {b.spec.name} operand: cast both to one format")
    for name, m in (("A", a), ("B", b)):
        if m.elem_dtype not in ELEM_DTYPES or (m.elem_dtype == torch.float4_e2m1fn_x2) != m.spec.tensor_scale:
            raise UnsupportedDtypeError.for_dtype(m.elem_dtype, ELEM_DTYPES, f"{m.spec.name} element type of {name}")
        if m.data.dtype != torch.uint8 or m.scales.dtype != torch.uint8:
            raise UnsupportedDtypeError.for_dtype(m.data.dtype, (torch.uint8,),
                                                  f"raw bytes of {name} (data and scales)")
        if m.data.dim() != 2 or m.scales.dim() != 2:
            raise LayoutError(f"{name} must be 2-D data and scales, "
                              f"got {tuple(m.data.shape)} and {tuple(m.scales.shape)}")
        if m.data.stride(1) != 1 or m.scales.stride(1) != 1:
            raise LayoutError(f"{name} data and scales must be contiguous along K (blocks run along the last dim); "
                              "call .contiguous() on them")
        k = m.cols
        if k % m.spec.block_size or m.scales.shape != (m.data.shape[0], k // m.spec.block_size):
            raise BlockShapeError(
                f"{name}: scales of shape {tuple(m.scales.shape)} do not match data of shape {tuple(m.data.shape)} "
                f"({m.spec.name} has one scale per {m.spec.block_size} elements along K)")
    if a.data.shape[1] != b.data.shape[1]:
        raise BlockShapeError(f"A is {tuple(a.data.shape)} and B is {tuple(b.data.shape)} in bytes: "
                              "they must share the reduction dim K")
    if a.data.device != b.data.device:
        raise LayoutError(f"A is on {a.data.device} and B on {b.data.device}: move both to one device")
    return a.rows, b.rows, a.cols
