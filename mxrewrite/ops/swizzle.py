"""Block scales in the tiled layout Blackwell's block-scaled GEMMs read (cuBLAS "1D block scaling
factors layout"; torchao's ``to_blocked``).

``torch._scaled_mm`` with MXFP8 (e8m0 scales, one per 32 elements) or NVFP4 (e4m3 scales,
one per 16) operands takes the scales of an ``(rows, K)`` operand not as the row-major
``(rows, K / block)`` matrix the casts write but tiled: the matrix is zero-padded to
multiples of 128 rows and 4 scale columns and cut into 128x4 tiles, stored one after
the other (row-tile major, column tile minor), 512 bytes each. Inside a tile, the scale
of row ``r`` (0..127) and column ``c`` (0..3) sits at byte ``(r % 32) * 16 + (r // 32) * 4 + c``:
the four 32-row groups are interleaved so that one 16-byte load gives a thread the
scales of one row from all four groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mxrewrite.errors import LayoutError, UnsupportedDtypeError

TILE_ROWS = 128  # operand rows per scale tile
TILE_COLS = 4  # scale columns (blocks along K) per scale tile
_ROW_GROUP = 32  # rows per interleaved group inside a tile


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def swizzled_numel(rows: int, scale_cols: int) -> int:
    """Bytes the tiled layout of a ``(rows, scale_cols)`` scale matrix takes (padding included)."""
    return _round_up(rows, TILE_ROWS) * _round_up(scale_cols, TILE_COLS)


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """The ``(rows, scale_cols)`` block scales in the tiled layout, as a contiguous 1-D tensor.

    Bit-identical to ``torchao.prototype.mx_formats.utils.to_blocked`` (padding bytes are
    zero) without importing torchao. Any one-byte dtype (raw uint8, float8_e8m0fnu,
    float8_e4m3fn) goes in and comes back; the bytes are moved, never converted. Pure
    PyTorch view/permute/copy, so it runs on any device and on meta or fake tensors.
    """
    if scales.dim() != 2:
        raise LayoutError(f"block scales must be a 2-D (rows, blocks along K) matrix, got shape {tuple(scales.shape)}")
    if scales.element_size() != 1:
        raise UnsupportedDtypeError.for_dtype(
            scales.dtype, (torch.uint8, torch.float8_e8m0fnu, torch.float8_e4m3fn), "block scales to swizzle")
    dtype = scales.dtype
    raw = scales.view(torch.uint8)
    rows, cols = raw.shape
    padded_rows, padded_cols = _round_up(rows, TILE_ROWS), _round_up(cols, TILE_COLS)
    if (padded_rows, padded_cols) != (rows, cols):
        # zero bytes, as torchao writes; F.pad rather than a slice copy, which FakeTensorMode
        # cannot run on a fake CUDA tensor in a CPU-only build (the Blackwell checks use one)
        raw = F.pad(raw, (0, padded_cols - cols, 0, padded_rows - rows))
    groups = TILE_ROWS // _ROW_GROUP
    # (row tile, row group, row in group, column tile, column in tile)
    tiles = raw.reshape(padded_rows // TILE_ROWS, groups, _ROW_GROUP, padded_cols // TILE_COLS, TILE_COLS)
    # -> (row tile, column tile, row in group, row group, column in tile): byte (r % 32) * 16 + (r // 32) * 4 + c
    swizzled = tiles.permute(0, 3, 2, 1, 4).reshape(-1)
    return swizzled.view(dtype)
