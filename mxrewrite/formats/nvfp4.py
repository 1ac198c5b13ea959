"""NVFP4: e2m1 elements packed two per byte, blocks of 16 with float8_e4m3fn scales,
and one float32 per-tensor scale above them (two-level scaling).

For a block with absolute maximum ``amax`` and per-tensor scale ``t``:
``s = e4m3(clamp(amax / 6 / t, 2**-6, 448))`` and ``q = e2m1(clamp(x / (t * s), -6, 6))``,
with ``x / (t * s)`` computed as ``x * ((1 / t) / s)``. Bit-identical to torchao's
``nvfp4_quantize(x, 16, per_tensor_scale=t)``.

Edge cases: block scales never go below 2**-6 (float8_e4m3fn's smallest normal),
so a block far below the tensor's range flushes towards zero; NaN in a block
makes its scale NaN and its codes arbitrary (e2m1 has no NaN, as in torchao). The
default per-tensor scale is ``amax(x) / (6 * 448)`` (torchao's
``per_tensor_amax_to_scale``), except that an all-zero tensor gets 1.0 instead of
0 so that it encodes to zeros rather than NaN.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import BlockShapeError, LayoutError
from mxrewrite.formats.constants import F4E2M1_MAX, F8E4M3_MAX, F8E4M3_MIN_NORMAL, NVFP4_BLOCK_SIZE
from mxrewrite.formats.e2m1 import e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from mxrewrite.formats.spec import check_cast_input

NVFP4_SCALE_RANGE = F8E4M3_MAX * F4E2M1_MAX  # 2688: largest value one (block, tensor) scale pair reaches


def tensor_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 per-tensor scale that maps ``amax`` onto the largest block scale (448) times 6."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax == 0, 1.0, amax / NVFP4_SCALE_RANGE)


def nvfp4_quantize(
    x: torch.Tensor,
    tensor_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cast ``x`` to NVFP4: returns ``(packed, scales, tensor_scale)``.

    ``packed`` is uint8 of shape ``x.shape[:-1] + (D // 2,)``; ``scales`` is
    float8_e4m3fn of shape ``x.shape[:-1] + (D // 16,)``; ``tensor_scale`` is a
    0-d float32 tensor (computed from ``amax(x)`` when not given).
    """
    check_cast_input(x, NVFP4_BLOCK_SIZE, "NVFP4")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    amax = blocks.abs().amax(-1)
    if tensor_scale is None:
        tensor_scale = tensor_scale_from_amax(amax.amax() if amax.numel() else 0.0)
    tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    scales = torch.clamp(amax / F4E2M1_MAX / tensor_scale, min=F8E4M3_MIN_NORMAL, max=F8E4M3_MAX)
    scales = scales.to(torch.float8_e4m3fn)
    factor = (1.0 / tensor_scale) / scales.float()
    scaled = torch.clamp(blocks * factor.unsqueeze(-1), -F4E2M1_MAX, F4E2M1_MAX)
    packed = pack_nibbles(e2m1_encode(scaled.reshape(x.shape)))
    return packed, scales, tensor_scale


def nvfp4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | float,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`nvfp4_quantize`: ``e2m1 * (tensor_scale * block_scale)`` in float32, then ``out_dtype``."""
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise LayoutError(
            "NVFP4 packed data and scales must be contiguous: two elements share a byte along the "
            "last dim, so a transposed packed tensor cannot be decoded - dequantize before transposing"
        )
    hidden = packed.shape[-1] * 2
    if scales.shape[-1] * NVFP4_BLOCK_SIZE != hidden:
        raise BlockShapeError(
            f"NVFP4 scales of shape {tuple(scales.shape)} do not match packed data of shape "
            f"{tuple(packed.shape)} (expected {hidden // NVFP4_BLOCK_SIZE} scales per row)"
        )
    values = e2m1_decode(unpack_nibbles(packed))
    blocks = values.reshape(*values.shape[:-1], hidden // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=packed.device)
    block_scale = (tensor_scale * scales.float()).unsqueeze(-1)
    return (blocks * block_scale).reshape(values.shape).to(out_dtype)
