"""MX casts with E8M0 block scales: MXFP8 (float8_e4m3fn elements) and MX-e5m2 for gradients.

Blocks of ``block_size`` consecutive elements along the last dim share one
power-of-two scale (see :mod:`mxrewrite.formats.e8m0`). Bit-identical to
torchao's ``to_mx`` / ``to_dtype`` (``tests/formats/test_mx.py`` compares raw
bits), apart from the rceil ``log2`` corner documented in ``e8m0``.

Input strides do not matter here: blocks always run along the logical last
dim. Casting is a saturating round-to-nearest-even: values beyond the element
range clamp to +-elem_max (+-inf too); NaN stays NaN.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import BlockShapeError, LayoutError, UnsupportedDtypeError
from mxrewrite.formats.constants import MX_ELEMENTS, MXFP8_BLOCK_SIZE
from mxrewrite.formats.e8m0 import check_scale_mode, e8m0_encode_multiplier, e8m0_exponent, e8m0_to_float32
from mxrewrite.formats.spec import check_cast_input


def _elem_range(elem_dtype: torch.dtype) -> tuple[float, int]:
    try:
        _, max_pow2 = MX_ELEMENTS[elem_dtype]
    except KeyError:
        raise UnsupportedDtypeError.for_dtype(elem_dtype, tuple(MX_ELEMENTS), "MX element type") from None
    # (torch.finfo, not the table's float: under torch.compile(dynamic=True) a float read from a global
    # becomes symbolic, which dynamo cannot lift into an autograd.Function's backward)
    return torch.finfo(elem_dtype).max, max_pow2


def block_amax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 absolute maximum of each block along the last dim (NaN if the block has a NaN)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    return blocks.abs().amax(-1).float()


def mx_quantize(
    x: torch.Tensor,
    *,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = MXFP8_BLOCK_SIZE,
    scale_mode: str = "rceil",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x`` to MX: returns ``(data, scales)``.

    ``data`` has ``x``'s shape and dtype ``elem_dtype``; ``scales`` has shape
    ``x.shape[:-1] + (x.shape[-1] // block_size,)`` and dtype ``float8_e8m0fnu``.
    """
    check_scale_mode(scale_mode)
    elem_max, elem_max_pow2 = _elem_range(elem_dtype)
    check_cast_input(x, block_size, "MX")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    amax = blocks.abs().amax(-1)
    biased = e8m0_exponent(amax, elem_max, elem_max_pow2, scale_mode)
    factor = e8m0_encode_multiplier(biased, scale_mode).unsqueeze(-1)
    # torch < 2.12 does not saturate on the eager float8 cast: clamp first (NaN passes through)
    data = torch.clamp(blocks * factor, -elem_max, elem_max).to(elem_dtype).reshape(x.shape)
    return data, biased.view(torch.float8_e8m0fnu)


def mx_dequantize(
    data: torch.Tensor,
    scales: torch.Tensor,
    *,
    block_size: int = MXFP8_BLOCK_SIZE,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`mx_quantize`: ``data * scale`` computed in ``out_dtype`` (exact for bf16/fp32)."""
    if not (data.is_contiguous() and scales.is_contiguous()):
        raise LayoutError(
            "MX data and scales must be contiguous (blocks run along the last dim); "
            "a transposed MX tensor has its blocks along the wrong dim - dequantize before transposing"
        )
    whole_blocks = data.dim() > 0 and data.shape[-1] % block_size == 0
    if not whole_blocks or scales.shape != (*data.shape[:-1], data.shape[-1] // block_size):
        # without this check, scales of a broadcastable shape would silently decode the wrong blocks
        raise BlockShapeError(
            f"MX scales of shape {tuple(scales.shape)} do not match data of shape {tuple(data.shape)} "
            f"with block size {block_size} (expected one scale per {block_size} elements along the last dim)"
        )
    blocks = data.to(out_dtype).reshape(*data.shape[:-1], data.shape[-1] // block_size, block_size)
    scale = e8m0_to_float32(scales).to(out_dtype).unsqueeze(-1)
    return (blocks * scale).reshape(data.shape)
