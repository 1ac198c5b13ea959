"""Descriptions of the supported low-precision formats, and the checks every cast shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxrewrite.errors import BlockShapeError, ConfigError, UnsupportedDtypeError
from mxrewrite.formats.constants import (
    F4E2M1_MAX,
    F8E4M3_MAX,
    MXFP8_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    SUPPORTED_INPUT_DTYPES,
)


@dataclass(frozen=True)
class FormatSpec:
    """One block-scaled number format.

    ``elem_max`` is the largest element magnitude; ``elems_per_byte`` is 2 for the
    packed 4-bit formats; ``tensor_scale`` says whether a float32 per-tensor scale
    sits above the block scales (NVFP4's two-level scaling). ``scaling`` is
    ``"block"`` for the MX formats and ``"tensor"`` for Hopper's FP8, whose only
    scale is one float32 per tensor; its ``block_size`` is that of the blocks
    MXNorm takes its maxima over (no block scale is stored).
    """

    name: str
    block_size: int
    elem_dtype: torch.dtype
    elem_max: float
    scale_dtype: torch.dtype
    elems_per_byte: int
    tensor_scale: bool
    scaling: str = "block"

    @property
    def block_scaled(self) -> bool:
        return self.scaling == "block"

    @property
    def scale_bytes(self) -> int:
        return 1 if self.block_scaled else 0

    def bytes_per_row(self, hidden: int) -> float:
        """Bytes one cast row of ``hidden`` elements occupies: data plus block scales."""
        return hidden / self.elems_per_byte + hidden // self.block_size * self.scale_bytes


MXFP8 = FormatSpec("mxfp8", MXFP8_BLOCK_SIZE, torch.float8_e4m3fn, F8E4M3_MAX, torch.float8_e8m0fnu, 1, False)
NVFP4 = FormatSpec("nvfp4", NVFP4_BLOCK_SIZE, torch.float4_e2m1fn_x2, F4E2M1_MAX, torch.float8_e4m3fn, 2, True)

# e4m3 activations and weights with float32 per-tensor scales (Hopper's FP8 tensor cores)
FP8 = FormatSpec("fp8", MXFP8_BLOCK_SIZE, torch.float8_e4m3fn, F8E4M3_MAX, torch.float32, 1, False, "tensor")

FORMATS = {f.name: f for f in (MXFP8, NVFP4, FP8)}


def get_format(name: str | FormatSpec) -> FormatSpec:
    if isinstance(name, FormatSpec):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; use one of {sorted(FORMATS)}") from None


def check_cast_input(x: torch.Tensor, block_size: int, fmt: str) -> None:
    """Raise our error for an input no cast accepts: wrong dtype or a last dim not divisible by the block."""
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise UnsupportedDtypeError.for_dtype(x.dtype, SUPPORTED_INPUT_DTYPES, f"{fmt} cast input")
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise BlockShapeError.for_shape(x.shape, block_size, fmt)
