"""Fused norm + MXFP8/NVFP4/FP8 cast in one Triton kernel: one read of ``x`` from memory, one write of the cast.

Each program owns ``ROWS`` whole rows, reduces them to the row's ``rho``
(MXNorm from the block maxima, or the exact RMSNorm from the sum of squares)
and casts ``x * rho`` (times the gain) block by block. Two variants
(:func:`launch_config` picks one, as measured on the H100):

* rows in registers (``CHUNK == 0``): the rows are loaded once and stay in
  registers between the reduction and the cast. A row whose length is not a
  power of two is loaded as up to three power-of-two runs of blocks
  (5120 = 4096 + 1024), so no lanes idle on padding.
* two loops (``CHUNK > 0``): the first loop reduces chunks of the rows, the
  second re-reads them from L2 and casts: few registers, many rows in flight, no
  padding (chunks divide the row). The first loop's loads ask L2 to keep the
  lines (``evict_last``), the second's to drop them (``evict_first``); without
  the hints part of the re-read went to memory (MXFP8 16384 x 14336 on the
  H100: 88% of the bandwidth floor, 95% with them).

NVFP4 (and FP8) with a gain: the per-tensor scale is set by the largest ``|gain|``. A
one-program kernel (:func:`_gain_tensor_scale_kernel`) computes it before the
cast, which every program then loads; each program reducing the whole gain
itself took NVFP4 RMSNorm with a gain to 63-69% of the bandwidth floor on the
H100 (65536 rows), 90-100% with the kernel before it.

NVFP4 loads bfloat16 (``x`` and the gain) as 32-bit words holding a pair: one
shift or mask widens each element, and the pair is the one packed into a byte.

A run of blocks is a ``[ROWS, SPLIT, NB, BLOCK // SPLIT]`` tensor (block ``k`` is
``[:, :, k, :]``). With ``SPLIT = 1`` Triton spreads a block over the threads
that load its 16-byte pieces; a larger ``SPLIT`` keeps whole blocks in one
thread (``LaunchConfig.block_split``, a tuning knob).

The arithmetic is that of :func:`mxrewrite.ops.reference.norm_cast_reference`,
step for step, so data and scales are bit-identical:

* MXNorm: ``sum_k m_k**p`` in float64 (every term is exact there),
  ``r = float32(c * M + eps)`` with the product rounded on its own (no fused
  multiply-add), ``rho = 1 / r`` as an IEEE division. ``c`` and ``eps`` are
  loaded from 0-d float64 tensors (the op's arguments).
* the static per-tensor scale (FP8, NVFP4) from the norm's output bound
  ``K**(1/p) / c`` or ``sqrt(D)``, in float64 as the reference computes it
  (FP8: the power of two above ``bound / 448``, from the float64 bits).
* RMSNorm: float32 sum of squares (the summation order differs from torch's, so
  ``rho`` may differ in the last bits), IEEE divide and square root.
* the casts: :mod:`mxrewrite.ops.kernels.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mxrewrite.formats import get_format
from mxrewrite.formats.nvfp4 import MIN_TENSOR_SCALE as _MIN_TENSOR_SCALE
from mxrewrite.formats.nvfp4 import NVFP4_SCALE_RANGE as _NVFP4_SCALE_RANGE
from mxrewrite.ops.kernels.codecs import (
    bf16_pairs_to_float32,
    e2m1_pack,
    e4m3_encode,
    e8m0_floor_exponent,
    e8m0_floor_multiplier,
    e8m0_rceil_exponent,
    e8m0_rceil_multiplier,
    has_fp8_conversion,
    nvfp4_block_scales,
    nvfp4_tensor_scale_inverses,
    to_float32,
)
from mxrewrite.ops.kernels.launch import is_interpreted, launch
from mxrewrite.ops.reference import Scalar, check_norm_args, float32_scalar, norm_constant, static_scale_base

# fmt / norm / scale mode codes passed to the kernel as constexprs
_MXFP8, _NVFP4, _FP8 = 0, 1, 2
_MXNORM, _RMSNORM = 0, 1
_RCEIL, _FLOOR = 0, 1

_MAX_SEGMENTS = 3
MIN_TENSOR_SCALE = tl.constexpr(_MIN_TENSOR_SCALE)  # 2**-120, the NVFP4 per-tensor scale's floor
NVFP4_SCALE_RANGE = tl.constexpr(_NVFP4_SCALE_RANGE)  # 6 * 448
E4M3_MAX = tl.constexpr(448.0)
_FLOAT64_MANTISSA = tl.constexpr((1 << 52) - 1)
# torchao's to_blocked layout: 128 x 4 tiles of scales, each stored as 32 x 16 bytes
_SWIZZLE_ROWS, _SWIZZLE_COLS = 128, 4


@triton.jit
def _mul_no_fma_f64(a, b, INTERPRET: tl.constexpr):
    """``a * b`` rounded to float64 on its own, so the compiler cannot fuse it into a following add."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                         is_pure=True, pack=1)


@triton.jit
def _run_offsets(START, NB: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Offsets ``[SPLIT, NB, BLOCK // SPLIT]`` into a row of the blocks ``START .. START + NB``.

    Block ``k`` is ``[:, k, :]``: its elements come as ``SPLIT`` runs of ``BLOCK // SPLIT``, so that
    Triton, which gives a thread at most 16 contiguous bytes, puts the whole block in one thread
    (its maximum and its scale arithmetic then need no shuffles and are not repeated across threads).
    """
    kk = tl.arange(0, NB)
    ss = tl.arange(0, SPLIT)
    jj = tl.arange(0, BLOCK // SPLIT)
    return (START + kk)[None, :, None] * BLOCK + ss[:, None, None] * (BLOCK // SPLIT) + jj[None, None, :]


@triton.jit
def _load_run(x_ptr, row_offs, row_mask, START, NB: tl.constexpr, VALID: tl.constexpr, BLOCK: tl.constexpr,
              SPLIT: tl.constexpr, PAIRS: tl.constexpr, INTERPRET: tl.constexpr, EVICTION: tl.constexpr):
    """Blocks ``START .. START + NB`` of each row as float32 ``[ROWS, SPLIT, NB, BLOCK // SPLIT]`` (zeros
    where masked); with ``PAIRS`` (NVFP4), bfloat16 is loaded as 32-bit words of two elements."""
    if VALID == NB:
        mask = row_mask[:, None, None, None]
    else:
        mask = row_mask[:, None, None, None] & (tl.arange(0, NB) < VALID)[None, None, :, None]
    if PAIRS and x_ptr.dtype.element_ty == tl.bfloat16:
        words = tl.load(x_ptr.to(tl.pointer_type(tl.uint32)) + row_offs[:, None, None, None] // 2
                        + _run_offsets(START, NB, BLOCK // 2, SPLIT)[None, :, :, :], mask=mask, other=0,
                        eviction_policy=EVICTION)
        return bf16_pairs_to_float32(words)
    cols = _run_offsets(START, NB, BLOCK, SPLIT)[None, :, :, :]
    return to_float32(tl.load(x_ptr + row_offs[:, None, None, None] + cols, mask=mask, other=0.0,
                              eviction_policy=EVICTION), INTERPRET)


@triton.jit
def _max_keep_nan(a, b):
    """``max`` that returns NaN if either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block_abs_max(x):
    """``max |x|`` of each block of a run, float32 ``[ROWS, NB]``, NaN if the block has one (``torch.amax``).

    One floating-point max (``|a|`` and ``|b|`` are operand modifiers) per element: the integer max of
    the bits of ``|x|`` took two integer instructions, and the integer pipe limits the NVFP4 cast on sm_90.
    """
    return tl.reduce(tl.reduce(tl.abs(x), 3, _max_keep_nan), 1, _max_keep_nan)


@triton.jit
def _block_stat(x, NORM: tl.constexpr, P: tl.constexpr):
    """Per-block terms of the row statistic: ``m_k**p`` in float64 (MXNorm) or ``sum x**2`` in float32."""
    if NORM == 0:
        m = _block_abs_max(x).to(tl.float64)
        if P == 2:
            m = m * m
        return m
    else:
        return tl.sum(tl.sum(x * x, axis=3), axis=1)


@triton.jit
def _run_stat(x, NORM: tl.constexpr, P: tl.constexpr):
    """Per-row partial sum: ``sum_k m_k**p`` in float64 (MXNorm) or ``sum x**2`` in float32 (RMSNorm)."""
    return tl.sum(_block_stat(x, NORM, P), axis=1)


@triton.jit
def _load_gain(gamma_ptr, START, NB: tl.constexpr, VALID: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
               ROWS: tl.constexpr, PAIRS: tl.constexpr, INTERPRET: tl.constexpr):
    """The gain of one run of blocks in float32, once for each of ``ROWS`` rows (from L1),
    ``[ROWS, SPLIT, NB, BLOCK // SPLIT]``: laid out as the rows' run is, so multiplying needs no layout
    conversion."""
    every_row = tl.zeros((ROWS,), tl.int64)
    return _load_run(gamma_ptr, every_row, every_row == 0, START, NB, VALID, BLOCK, SPLIT, PAIRS, INTERPRET, "")


@triton.jit
def _cast_run(x, rho, gain, tscale_rcp, tscale_inv, rows, row_mask, data_ptr, scales_ptr,
              START, NB: tl.constexpr, VALID: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
              HIDDEN: tl.constexpr, FMT: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr,
              SWIZZLE: tl.constexpr, SWIZZLE_COL_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Cast ``x * rho (* gain)`` for one run of blocks and store its data and block scales (FP8: data only,
    scaled by the static per-tensor scale)."""
    col = START + tl.arange(0, NB)
    block_mask = row_mask[:, None] & (tl.arange(0, NB) < VALID)[None, :]
    elem_mask = block_mask[:, None, :, None]
    xhat = x * rho[:, None, None, None]
    if HAS_GAMMA:
        xhat = xhat * gain
    if FMT == 2:
        # the static scale is a power of two: multiplying by its inverse is exact
        codes = e4m3_encode(xhat * tscale_inv.to(tl.float32), HW_FP8)
        data_offs = rows[:, None, None, None].to(tl.int64) * HIDDEN + _run_offsets(START, NB, BLOCK, SPLIT)[None]
        tl.store(data_ptr + data_offs, codes, mask=elem_mask)
        return
    # (not max|x| * rho: that misses the NaN of 0 * rho when rho is inf)
    amax = _block_abs_max(xhat)

    if SWIZZLE:
        r = rows[:, None]
        c = col[None, :]
        tile = (r // 128) * SWIZZLE_COL_TILES + c // 4
        within = r % 128
        scale_offs = tile * 512 + (within % 32) * 16 + (within // 32) * 4 + c % 4
    else:
        scale_offs = rows[:, None].to(tl.int64) * (HIDDEN // BLOCK) + col[None, :]

    if FMT == 0:
        if SCALE_MODE == 0:
            biased = e8m0_rceil_exponent(amax)
            factor = e8m0_rceil_multiplier(biased)
        else:
            biased = e8m0_floor_exponent(amax)
            factor = e8m0_floor_multiplier(biased)
        codes = e4m3_encode(xhat * factor[:, None, :, None], HW_FP8)
        data_offs = rows[:, None, None, None].to(tl.int64) * HIDDEN + _run_offsets(START, NB, BLOCK, SPLIT)[None]
        tl.store(data_ptr + data_offs, codes, mask=elem_mask)
        tl.store(scales_ptr + scale_offs, biased.to(tl.uint8), mask=block_mask)
    else:
        scale_code, factor = nvfp4_block_scales(amax, tscale_rcp, tscale_inv, HW_FP8)
        y = xhat * factor[:, None, :, None]
        low, high = tl.split(tl.reshape(y, (y.shape[0], SPLIT, NB, BLOCK // SPLIT // 2, 2)))
        packed = e2m1_pack(low, high, HW_FP8)
        data_offs = (rows[:, None, None, None].to(tl.int64) * (HIDDEN // 2)
                     + _run_offsets(START, NB, BLOCK // 2, SPLIT)[None])
        tl.store(data_ptr + data_offs, packed, mask=elem_mask)
        tl.store(scales_ptr + scale_offs, scale_code.to(tl.uint8), mask=block_mask)


@triton.jit
def _rho(stat, eps, correction, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, P: tl.constexpr,
         EPS_IN_ROOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``rho = 1 / r`` per row from the summed statistic, rounded exactly as the reference rounds it
    (``eps`` and ``correction`` float64 scalars)."""
    if NORM == 0:
        power_mean = stat / (HIDDEN // BLOCK)  # float64 division is IEEE
        if P == 2:
            power_mean = tl.sqrt(power_mean)  # float64 square root is IEEE
        r = (_mul_no_fma_f64(tl.broadcast_to(correction, power_mean.shape), power_mean, INTERPRET) + eps)
        r = r.to(tl.float32)
    else:
        eps_f32 = eps.to(tl.float32)
        mean_sq = tl.div_rn(stat, HIDDEN * 1.0)
        if EPS_IN_ROOT:
            r = tl.sqrt_rn(mean_sq + eps_f32)
        else:
            r = tl.sqrt_rn(mean_sq) + eps_f32
    return tl.div_rn(tl.full(r.shape, 1.0, tl.float32), r)


@triton.jit
def _norm_output_bound(correction, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
                       P: tl.constexpr):
    """The largest ``|x * rho|`` (``reference.norm_output_bound``) in float64: ``K**(1/p) / c`` (MXNorm) or
    ``sqrt(D)`` (RMSNorm)."""
    if NORM == 0:
        blocks = tl.cast(HIDDEN // BLOCK, tl.float64)
        if P == 2:
            blocks = tl.sqrt(blocks)
        return blocks / correction
    return tl.sqrt(tl.cast(HIDDEN, tl.float64))


@triton.jit
def _fp8_static_scale(bound):
    """``formats.fp8.static_scale``: the power of two above ``bound / 448`` (float64), from its float64 bits:
    the exponent, one higher unless the mantissa bits are all zero."""
    bits = tl.cast(bound / E4M3_MAX, tl.int64, bitcast=True)
    exponent = bits >> 52
    exponent += ((bits & _FLOAT64_MANTISSA) != 0).to(tl.int64)
    return tl.cast(exponent << 52, tl.float64, bitcast=True)


@triton.jit
def _static_scale_base(correction, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, FMT: tl.constexpr,
                       NORM: tl.constexpr, P: tl.constexpr):
    """The per-tensor scale before any gain (``reference.static_scale_base``), float32: FP8 the power of two
    above ``bound / 448``, NVFP4 ``bound / (6 * 448)``; 1 for MXFP8."""
    if FMT == 0:
        return tl.cast(1.0, tl.float32)
    bound = _norm_output_bound(correction, HIDDEN, BLOCK, NORM, P)
    if FMT == 2:
        return _fp8_static_scale(bound).to(tl.float32)
    return (bound / NVFP4_SCALE_RANGE).to(tl.float32)


@triton.jit
def _gain_tensor_scale_kernel(gamma_ptr, tscale_ptr, correction_ptr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                              FMT: tl.constexpr, NORM: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr,
                              INTERPRET: tl.constexpr):
    """The per-tensor scale of a cast that applies the gain (``reference.activation_tensor_scale``), by one
    program, before the cast: every program of the cast reads it instead of reducing the gain itself.
    NVFP4: ``max(base * max|gain|, 2**-120)``; FP8: the power of two above ``bound * max|gain| / 448``, at
    least 2**-120; NaN if the gain has one."""
    gain_max = tl.zeros((CHUNK,), tl.float32)
    for start in range(0, HIDDEN, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        gain = to_float32(tl.load(gamma_ptr + offs, mask=offs < HIDDEN, other=0.0), INTERPRET)
        gain_max = _max_keep_nan(gain_max, tl.abs(gain))
    gain_max = tl.reduce(gain_max, 0, _max_keep_nan)
    correction = tl.load(correction_ptr)
    if FMT == 2:
        scale = _fp8_static_scale(_norm_output_bound(correction, HIDDEN, BLOCK, NORM, P) * gain_max.to(tl.float64))
        scale = tl.where(gain_max != gain_max, float("nan"), scale)
        tscale = tl.maximum(scale, MIN_TENSOR_SCALE, propagate_nan=tl.PropagateNan.ALL).to(tl.float32)
    else:
        # (an all-zero gain would make the scale 0 and the cast 0 * (1 / 0) = NaN)
        tscale = tl.maximum(_static_scale_base(correction, HIDDEN, BLOCK, FMT, NORM, P) * gain_max,
                            MIN_TENSOR_SCALE, propagate_nan=tl.PropagateNan.ALL)
    tl.store(tscale_ptr, tscale)


@triton.jit
def _norm_cast_kernel(
    x_ptr, gamma_ptr, data_ptr, scales_ptr, rho_ptr, tscale_ptr, eps_ptr, correction_ptr, n_rows,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    N0: tl.constexpr, V0: tl.constexpr,
    S1: tl.constexpr, N1: tl.constexpr, V1: tl.constexpr,
    S2: tl.constexpr, N2: tl.constexpr, V2: tl.constexpr,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr,
    FMT: tl.constexpr, NORM: tl.constexpr, P: tl.constexpr, EPS_IN_ROOT: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_GAMMA: tl.constexpr,
    SWIZZLE: tl.constexpr, SWIZZLE_COL_TILES: tl.constexpr, HW_FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Each program casts ``ROWS`` rows. ``CHUNK == 0``: the rows stay in registers between the reduction
    and the cast; ``CHUNK > 0``: two loops over chunks of ``CHUNK`` blocks, the second re-reading the rows
    the first just read (from L2): fewer registers, more rows in flight."""
    eps = tl.load(eps_ptr)
    correction = tl.load(correction_ptr)

    # the static per-tensor scale: FP8 or NVFP4 with a gain reads what _gain_tensor_scale_kernel wrote
    GAIN_SETS_SCALE: tl.constexpr = HAS_GAMMA and FMT != 0
    if GAIN_SETS_SCALE:
        tscale = tl.load(tscale_ptr)
    else:
        tscale = _static_scale_base(correction, HIDDEN, BLOCK, FMT, NORM, P)
    tscale_rcp, tscale_inv = nvfp4_tensor_scale_inverses(tscale)

    PAIRS: tl.constexpr = FMT == 1
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    row_offs = rows.to(tl.int64) * HIDDEN
    if CHUNK == 0:
        x0 = _load_run(x_ptr, row_offs, row_mask, 0, N0, V0, BLOCK, SPLIT, PAIRS, INTERPRET, "")
        stat = _run_stat(x0, NORM, P)
        if N1 > 0:
            x1 = _load_run(x_ptr, row_offs, row_mask, S1, N1, V1, BLOCK, SPLIT, PAIRS, INTERPRET, "")
            stat += _run_stat(x1, NORM, P)
        if N2 > 0:
            x2 = _load_run(x_ptr, row_offs, row_mask, S2, N2, V2, BLOCK, SPLIT, PAIRS, INTERPRET, "")
            stat += _run_stat(x2, NORM, P)
        rho = _rho(stat, eps, correction, HIDDEN, BLOCK, NORM, P, EPS_IN_ROOT, INTERPRET)
        # (the gain after the reduction: loaded before it, the float32 gain stayed live across it, 85
        # registers a thread instead of 64 for NVFP4 at D = 4096)
        g0 = 0.0
        g1 = 0.0
        g2 = 0.0
        if HAS_GAMMA:
            g0 = _load_gain(gamma_ptr, 0, N0, V0, BLOCK, SPLIT, ROWS, PAIRS, INTERPRET)
            if N1 > 0:
                g1 = _load_gain(gamma_ptr, S1, N1, V1, BLOCK, SPLIT, ROWS, PAIRS, INTERPRET)
            if N2 > 0:
                g2 = _load_gain(gamma_ptr, S2, N2, V2, BLOCK, SPLIT, ROWS, PAIRS, INTERPRET)
        _cast_run(x0, rho, g0, tscale_rcp, tscale_inv, rows, row_mask, data_ptr, scales_ptr, 0, N0, V0, BLOCK, SPLIT,
                  HIDDEN, FMT, SCALE_MODE, HAS_GAMMA, SWIZZLE, SWIZZLE_COL_TILES, HW_FP8)
        if N1 > 0:
            _cast_run(x1, rho, g1, tscale_rcp, tscale_inv, rows, row_mask, data_ptr, scales_ptr, S1, N1, V1, BLOCK,
                      SPLIT, HIDDEN, FMT, SCALE_MODE, HAS_GAMMA, SWIZZLE, SWIZZLE_COL_TILES, HW_FP8)
        if N2 > 0:
            _cast_run(x2, rho, g2, tscale_rcp, tscale_inv, rows, row_mask, data_ptr, scales_ptr, S2, N2, V2, BLOCK,
                      SPLIT, HIDDEN, FMT, SCALE_MODE, HAS_GAMMA, SWIZZLE, SWIZZLE_COL_TILES, HW_FP8)
    else:
        NUM_CHUNKS: tl.constexpr = HIDDEN // (BLOCK * CHUNK)
        # per-block partial sums, reduced across the row once after the loop (no barrier per chunk)
        if NORM == 0:
            partial = tl.zeros((ROWS, CHUNK), tl.float64)
        else:
            partial = tl.zeros((ROWS, CHUNK), tl.float32)
        for c in range(NUM_CHUNKS):
            xc = _load_run(x_ptr, row_offs, row_mask, c * CHUNK, CHUNK, CHUNK, BLOCK, SPLIT, PAIRS, INTERPRET,
                           "evict_last")
            partial += _block_stat(xc, NORM, P)
        rho = _rho(tl.sum(partial, axis=1), eps, correction, HIDDEN, BLOCK, NORM, P, EPS_IN_ROOT, INTERPRET)
        for c in range(NUM_CHUNKS):
            xc = _load_run(x_ptr, row_offs, row_mask, c * CHUNK, CHUNK, CHUNK, BLOCK, SPLIT, PAIRS, INTERPRET,
                           "evict_first")
            gc = 0.0
            if HAS_GAMMA:
                gc = _load_gain(gamma_ptr, c * CHUNK, CHUNK, CHUNK, BLOCK, SPLIT, ROWS, PAIRS, INTERPRET)
            _cast_run(xc, rho, gc, tscale_rcp, tscale_inv, rows, row_mask, data_ptr, scales_ptr, c * CHUNK, CHUNK,
                      CHUNK, BLOCK, SPLIT, HIDDEN, FMT, SCALE_MODE, HAS_GAMMA, SWIZZLE, SWIZZLE_COL_TILES, HW_FP8)
    tl.store(rho_ptr + rows, rho, mask=row_mask)
    if not GAIN_SETS_SCALE:
        if tl.program_id(0) == 0:
            tl.store(tscale_ptr, tscale)


@dataclass(frozen=True)
class BlockRun:
    """``count`` blocks (a power of two) starting at block ``start``; the first ``valid`` are real."""

    start: int
    count: int
    valid: int


def block_runs(num_blocks: int, max_runs: int = _MAX_SEGMENTS) -> tuple[BlockRun, ...]:
    """Split a row of ``num_blocks`` blocks into power-of-two runs, largest first.

    The last run is padded to a power of two (and masked) when the row needs
    more runs than ``max_runs``.
    """
    runs, start, left = [], 0, num_blocks
    while left and len(runs) < max_runs - 1:
        count = 1 << (left.bit_length() - 1)
        runs.append(BlockRun(start, count, count))
        start, left = start + count, left - count
    if left:
        runs.append(BlockRun(start, triton.next_power_of_2(left), left))
    return tuple(runs)


@dataclass(frozen=True)
class LaunchConfig:
    """Rows per program, warps, the chunk (in blocks) of the two-loop variant (0: rows in registers), and
    the pieces each block is loaded in (``SPLIT``; ``block size * input bytes / 16`` puts a block in one
    thread)."""

    rows_per_program: int
    num_warps: int
    chunk_blocks: int = 0
    block_split: int = 1


def launch_config(hidden: int, n_rows: int, fmt: str = "mxfp8", has_gain: bool = False) -> LaunchConfig:
    """The launch configuration measured best on the H100 (``benchmarks/bench_norm_cast.py --sweep``).

    Power-of-two rows up to 8192 (16384 for MXFP8) stay in registers: 4096
    elements per program with 4 warps up to 4096, one row with 8 warps above
    (4 for NVFP4: 8192 at 90-94% of the floor instead of 81-82%). Longer rows,
    and rows whose length is not a power of two, take the two-loop variant
    (chunks of 4096 elements, or of up to 2048 dividing the row), one row per
    program; chunks of 1024 (D = 5120) take two rows from 32768 rows on for
    MXFP8 (with 8 warps, 65536 x 5120: 351 instead of 401 us), from 16384 rows
    for NVFP4 (with 4; RMSNorm with a gain, 16384 x 5120: 88 instead of 93 us).
    Rows too short or too odd for chunks of 512 take the register path in runs.
    NVFP4 rows of 8192 with a gain take two loops (chunks of 2048): 92-101% of
    the floor against 88-93% in registers, where the gain took 168 registers a
    thread. (The row count is only compared with thresholds, so under dynamic
    shapes each rule is one guard and its value is never pinned.)
    """
    spec = get_format(fmt)
    num_blocks = hidden // spec.block_size
    pow2 = hidden & (hidden - 1) == 0
    gain_in_registers_spills = spec.tensor_scale and has_gain and hidden == 8192
    if gain_in_registers_spills:
        return LaunchConfig(1, 4, chunk_blocks_for(num_blocks, 2048 // spec.block_size))
    if not (pow2 and (hidden <= 8192 or (hidden <= 16384 and not spec.tensor_scale))):
        chunk = chunk_blocks_for(num_blocks, (4096 if pow2 else 2048) // spec.block_size)
        chunk_elems = chunk * spec.block_size
        if chunk_elems == 1024 and n_rows >= (16384 if spec.tensor_scale else 32768):
            return LaunchConfig(2, 4 if spec.tensor_scale else 8, chunk)
        if chunk_elems >= 512:
            return LaunchConfig(1, min(8, max(4, chunk_elems // 256)), chunk)
    padded = triton.next_power_of_2(hidden)
    rows = min(max(1, 4096 // padded), triton.next_power_of_2(max(n_rows, 1)))
    few_warps = rows * padded <= 4096 or (spec.tensor_scale and padded <= 8192)
    return LaunchConfig(rows, 4 if few_warps else 8)


def chunk_blocks_for(num_blocks: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` that divides ``num_blocks`` (chunks need no masks)."""
    largest_divisor = num_blocks & -num_blocks
    return min(largest_divisor, 1 << (wanted.bit_length() - 1))


def swizzled_scales_numel(n_rows: int, num_blocks: int) -> int:
    """Bytes of torchao's ``to_blocked`` layout: rows padded to 128, block columns to 4."""
    return triton.cdiv(n_rows, _SWIZZLE_ROWS) * _SWIZZLE_ROWS * triton.cdiv(num_blocks, _SWIZZLE_COLS) * _SWIZZLE_COLS


def norm_cast_triton(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    *,
    fmt: str,
    norm: str,
    p: int,
    scale_mode: str,
    eps: Scalar,
    correction: Scalar,
    eps_in_root: bool = True,
    swizzle_scales: bool = False,
    launch_cfg: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel behind ``mxrewrite::norm_cast``: same outputs as ``norm_cast_reference``.

    With ``swizzle_scales`` the scales come back flat in the layout Blackwell's
    ``torch._scaled_mm`` reads (torchao's ``to_blocked`` of the ``(rows, blocks)``
    scale matrix, zero padded), instead of ``x.shape[:-1] + (blocks,)``.
    ``launch_cfg`` overrides :func:`launch_config` (tests and tuning). ``eps`` and ``correction`` as
    the op passes them (0-d float64 tensors on ``x``'s device) or as floats.
    Arguments are checked by the op (``check_norm_cast_args``).
    """
    spec = get_format(fmt)
    check_norm_args(norm, p)
    lead, hidden = x.shape[:-1], x.shape[-1]
    num_blocks = hidden // spec.block_size
    x2d = x.reshape(-1, hidden).contiguous()
    n_rows = x2d.shape[0]

    data = torch.empty((n_rows, hidden // spec.elems_per_byte), dtype=torch.uint8, device=x.device)
    if not spec.block_scaled:
        scales = torch.empty((n_rows, 0), dtype=torch.uint8, device=x.device)
    elif swizzle_scales:
        numel = swizzled_scales_numel(n_rows, num_blocks)
        padded = n_rows % _SWIZZLE_ROWS or num_blocks % _SWIZZLE_COLS
        scales = (torch.zeros if padded else torch.empty)(numel, dtype=torch.uint8, device=x.device)
    else:
        scales = torch.empty((n_rows, num_blocks), dtype=torch.uint8, device=x.device)
    rho = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    eps, correction = norm_constant(eps, x.device), norm_constant(correction, x.device)
    norm_code = _MXNORM if norm == "mxnorm" else _RMSNORM
    fmt_code = _FP8 if not spec.block_scaled else _NVFP4 if spec.tensor_scale else _MXFP8

    interpret = is_interpreted(_norm_cast_kernel)
    gamma = gamma.contiguous() if gamma is not None else None
    tscale = torch.empty((), dtype=torch.float32, device=x.device)
    if gamma is not None and (spec.tensor_scale or not spec.block_scaled):
        launch(_gain_tensor_scale_kernel, (1,), gamma, tscale, correction, HIDDEN=hidden, BLOCK=spec.block_size,
               FMT=fmt_code, NORM=norm_code, P=p, CHUNK=min(triton.next_power_of_2(hidden), 4096), INTERPRET=interpret,
               num_warps=4)
    elif n_rows == 0:  # no cast kernel to write it
        tscale = float32_scalar(static_scale_base(hidden, fmt=fmt, norm=norm, p=p, correction=correction), x.device)

    if n_rows:
        runs = block_runs(num_blocks)
        runs = runs + (BlockRun(0, 0, 0),) * (_MAX_SEGMENTS - len(runs))
        cfg = launch_cfg or launch_config(hidden, n_rows, spec.name, has_gain=gamma is not None)
        if spec.block_size % cfg.block_split:
            raise ValueError(f"block_split={cfg.block_split} must divide the block size {spec.block_size}")
        chunk = chunk_blocks_for(num_blocks, cfg.chunk_blocks) if cfg.chunk_blocks else 0
        hardware_fp8 = not interpret and has_fp8_conversion(x.device)
        grid = (triton.cdiv(n_rows, cfg.rows_per_program),)
        launch(
            _norm_cast_kernel, grid,
            x2d, gamma if gamma is not None else x2d, data, scales, rho, tscale, eps, correction, n_rows,
            HIDDEN=hidden, BLOCK=spec.block_size, ROWS=cfg.rows_per_program,
            N0=runs[0].count, V0=runs[0].valid,
            S1=runs[1].start, N1=runs[1].count, V1=runs[1].valid,
            S2=runs[2].start, N2=runs[2].count, V2=runs[2].valid, CHUNK=chunk, SPLIT=cfg.block_split,
            FMT=fmt_code,
            NORM=norm_code, P=p, EPS_IN_ROOT=bool(eps_in_root),
            SCALE_MODE=_RCEIL if scale_mode == "rceil" else _FLOOR,
            HAS_GAMMA=gamma is not None,
            SWIZZLE=bool(swizzle_scales), SWIZZLE_COL_TILES=triton.cdiv(num_blocks, _SWIZZLE_COLS),
            HW_FP8=hardware_fp8, INTERPRET=interpret,
            num_warps=cfg.num_warps,
        )

    data = data.view(*lead, hidden // spec.elems_per_byte)
    if not swizzle_scales:
        scales = scales.view(*lead, scales.shape[-1])
    return data, scales, rho.view(lead), tscale
