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
0 so that it encodes to zeros rather than NaN, and that the scale is never below
2**-120 (:data:`MIN_TENSOR_SCALE`): below that, ``1 / (t * s)`` overflows to inf
for small block scales and the zeros of a tiny tensor would encode as NaN codes
(torchao's rule does that for ``amax`` below about 2e-33).
"""

from __future__ import annotations

import torch

from mxrewrite.errors import BlockShapeError, LayoutError
from mxrewrite.formats.constants import (
    F4E2M1_MAX,
    F8E4M3_MAX,
    F8E4M3_MIN_NORMAL,
    F32_MIN_NORMAL,
    NVFP4_BLOCK_SIZE,
)
from mxrewrite.formats.e2m1 import e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from mxrewrite.formats.spec import check_cast_input

NVFP4_SCALE_RANGE = F8E4M3_MAX * F4E2M1_MAX  # 2688: largest value one (block, tensor) scale pair reaches
# Smallest per-tensor scale t for which t * s stays a normal float32 and (1 / t) / s stays finite
# for every block scale s >= 2**-6 (the e4m3 clamp): 2**-126 / 2**-6.
MIN_TENSOR_SCALE = F32_MIN_NORMAL / F8E4M3_MIN_NORMAL


def tensor_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 per-tensor scale that maps ``amax`` onto the largest block scale (448) times 6.

    1.0 for an all-zero tensor, and at least :data:`MIN_TENSOR_SCALE` otherwise.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax == 0, 1.0, torch.clamp(amax / NVFP4_SCALE_RANGE, min=MIN_TENSOR_SCALE))


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
    # the full shape: scales of a broadcastable shape would otherwise silently decode the wrong blocks
    if hidden % NVFP4_BLOCK_SIZE or scales.shape != (*packed.shape[:-1], hidden // NVFP4_BLOCK_SIZE):
        raise BlockShapeError(
            f"NVFP4 scales of shape {tuple(scales.shape)} do not match packed data of shape "
            f"{tuple(packed.shape)} (expected shape {(*packed.shape[:-1], hidden // NVFP4_BLOCK_SIZE)})"
        )
    values = e2m1_decode(unpack_nibbles(packed))
    blocks = values.reshape(*values.shape[:-1], hidden // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=packed.device)
    block_scale = (tensor_scale * scales.float()).unsqueeze(-1)
    return (blocks * block_scale).reshape(values.shape).to(out_dtype)
