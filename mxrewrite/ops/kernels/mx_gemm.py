"""Block-scaled GEMM for GPUs without MX tensor cores (Hopper): ``A @ B.T`` from the raw bytes.

The fused kernel (method ``"dequant"``) loads the low-precision tiles of ``A``
and ``B`` (uint8 codes plus block scales), dequantises them in registers to
bfloat16 and feeds ``tl.dot``, accumulating in float32: no dequantised copy of
either operand is written to memory. The NVFP4 per-tensor scales multiply the
float32 accumulator once, in the epilogue.

Dequantisation is exact, so the result differs from the emulated backend
(:func:`mxrewrite.ops.matmul._emulated_mm`) only in accumulation order and in
that backend's bfloat16 output rounding (this kernel writes float32):

* MX (block 32, E8M0 scales): an e4m3/e5m2 value times a power of two is a
  bfloat16 (3 or 2 mantissa bits). Scale byte 0xFF (NaN) makes its block NaN, as
  in the reference. Values below float32's normal range (2**-126, only reachable
  with scale bytes below ~10) are flushed to zero by the tensor cores, as in
  cuBLAS (the emulated backend on CUDA).
* NVFP4 (block 16, float8_e4m3fn scales): e2m1 (1 mantissa bit) times e4m3
  (3 mantissa bits) has at most 5 significant bits and stays within bfloat16's
  normal range.

How the codes become bfloat16 decides the speed: through the hardware
(e4m3 -> f16 -> bf16) each element costs two F2F conversions, which run at a
quarter of the integer rate on Hopper (~230 TFLOP/s); the PTX bit-moving
unpackers below (integer ops on two elements per register) reach ~300 TFLOP/s,
where the integer pipe is still the limit. Element types are per operand, so the
backward GEMMs' e5m2 x e4m3 MX operands run through the same kernel.

Methods (``benchmarks/results_mx_gemm.md`` has the H100 numbers):

* ``"dequant"`` (every format; chosen below :data:`MATERIALIZE_FROM_ROWS` rows): the fused kernel above.
* ``"dot_scaled"`` (MX only): ``tl.dot_scaled``, which Triton 3.6 lowers on
  sm_90 to its own upcast to bfloat16. About 30% slower than ``"dequant"``, and
  it flushes blocks whose E8M0 scale byte is 0 (2**-127) to zero. Kept for
  comparison.
* ``"materialize"``: :func:`triton_dequantize` both operands (bandwidth-bound,
  ~2.5 TB/s), then cuBLAS with a float32 output. Transient bfloat16 copies of
  both operands, but 1.5-2.3x faster than the fused kernel from M ~ 2048
  tokens on (chosen from :data:`MATERIALIZE_FROM_ROWS` rows); the fused kernel
  wins at small M (<= 256).

Shapes: any ``M`` and ``N`` (edge rows are wrapped on load and masked on store);
``K`` a multiple of the format's block (the last K tile is masked when ``K`` is
not a multiple of the K tile). Under Triton's interpreter (CPU tensors) the
kernels take a float32 path with Triton's own casts (see :func:`_load_dequantized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mxrewrite.errors import ConfigError, UnsupportedDtypeError
from mxrewrite.ops.block_matrix import ELEM_DTYPES, BlockScaledMatrix, check_operands

# Element codes the kernel understands (constexpr switch inside the kernel).
_E4M3, _E5M2, _E2M1 = 0, 1, 2
# One code per operand element type check_operands admits (e4m3, e5m2, packed e2m1), in its order.
_ELEM_CODES = dict(zip(ELEM_DTYPES, (_E4M3, _E5M2, _E2M1), strict=True))
_DOT_SCALED_FORMATS = {_E4M3: "e4m3", _E5M2: "e5m2"}

# NVFP4 tiles enter the GEMM as value * 2**-8 (one multiply per element, see _load_dequantized);
# the epilogue multiplies the accumulator by 2**16.
_E2M1_GEMM_SHIFT = 8
# Codes per unpacking call for the A tile: Hopper's wgmma reads A from registers, where each
# thread holds pairs of consecutive K elements (B is staged through shared memory: 4).
_A_OPERAND_PACK = 2

METHODS = ("dequant", "dot_scaled", "materialize")
DEFAULT_MX_METHOD = "dequant"
# Below this many rows the fused kernel wins; from here on dequantising into cuBLAS does
# (H100: 86 vs 54 TFLOP/s at M=256, 276 vs 414 at M=2048, results_mx_gemm.md).
MATERIALIZE_FROM_ROWS = 1024


def auto_method(rows: int) -> str:
    """The faster method for an ``A`` of ``rows`` rows on Hopper."""
    return "materialize" if rows >= MATERIALIZE_FROM_ROWS else DEFAULT_MX_METHOD


@dataclass(frozen=True)
class TileConfig:
    """A fixed launch configuration (bypasses the autotuner: interpreter runs, config sweeps)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_stages: int = 3
    num_warps: int = 4


# Small enough for Triton's CPU interpreter, large enough for tl.dot (>= 16) and two scale blocks.
INTERPRETER_CONFIG = TileConfig(16, 16, 64, group_m=2, num_stages=1, num_warps=1)


def _configs() -> list[triton.Config]:
    """A short Hopper list, from the sweep in ``benchmarks/results_mx_gemm.md``; 64 rows for small M."""
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 128, 64, 3, 4),  # best for MX at M = 16384
        (128, 256, 128, 2, 8),  # best for NVFP4 at M = 16384
        (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (M = 1 decode, tiny tests): they only waste compile time."""
    m, n = named_args["M"], named_args["N"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(n))]
    return kept or configs[:1]


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 scale bytes -> float32 ``2**(s - 127)``; byte 0 is the subnormal 2**-127, 0xFF is NaN."""
    bits = s.to(tl.uint32) << 23
    bits = tl.where(s == 0, 0x00400000, bits)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_pairs_to_e4m3(packed):
    """Packed e2m1 bytes ``[R, C]`` -> float8_e4m3fn bytes ``[R, 2C]`` holding each value times 2**-6.

    The e2m1 magnitude bits ``e e m`` moved to e4m3's ``0 0 e e m 0 0`` (a shift)
    read as ``2**(e-7) * (1 + m/2)`` for ``e >= 1`` and as the subnormal ``2**-7``
    for code 1 (0.5): exactly the e2m1 value times 2**-6, zero included. The
    caller folds 2**6 into the block scale. Element ``2i`` is the low nibble.
    """
    lo = ((packed & 0x7) << 2) | ((packed & 0x8) << 4)
    hi = ((packed >> 2) & 0x1C) | (packed & 0x80)
    return tl.interleave(lo.to(tl.uint8), hi.to(tl.uint8))


# Fast unpacking on the GPU (the module docstring says why not the hardware conversions). These
# PTX snippets move each code's bits into place in a bfloat16, two elements per 32-bit register,
# with integer ops only: the result is the element's value times 2**-bias, bias = 127 - (the
# element's exponent bias), and the caller multiplies the bias back in (bfloat16 products of
# exact values: exact). Subnormal elements land on bfloat16 subnormals, which Hopper's bf16
# multiply keeps (tests/ops/kernels/test_mx_gemm.py checks every code under every scale).
# Codes that encode NaN/inf decode to finite values: the casts only produce them inside blocks
# whose scale is NaN, which makes the block NaN anyway.
_E4M3_BIAS = tl.constexpr(120)
_E5M2_BIAS = tl.constexpr(112)
_E2M1_BIAS = tl.constexpr(126)


def _fp8_unpack_asm(shift: int, magnitude_mask: int, pack: int) -> tl.constexpr:
    """PTX for :func:`_fp8_codes_to_bf16_biased`: ``pack`` codes in, ``pack // 2`` bfloat16 pairs out."""
    if pack == 4:  # $2 = 4 codes; $0 = codes 0,1 and $1 = codes 2,3 (low half first)
        body = f"""
        .reg .b32 q, u, t;
        prmt.b32 q, $2, 0, 0x1302;
        shl.b32 u, q, 8;
        shr.b32 t, q, {shift};
        and.b32 t, t, {magnitude_mask:#010x};
        and.b32 q, q, 0x80008000;
        or.b32 $0, q, t;
        shr.b32 t, u, {shift};
        and.b32 t, t, {magnitude_mask:#010x};
        and.b32 u, u, 0x80008000;
        or.b32 $1, u, t;"""
    else:  # $1 = 2 codes in a 16-bit register; $0 = both as a bfloat16 pair
        body = f"""
        .reg .b32 x, q, t;
        cvt.u32.u16 x, $1;
        prmt.b32 q, x, 0, 0x1404;
        shr.b32 t, q, {shift};
        and.b32 t, t, {magnitude_mask:#010x};
        and.b32 q, q, 0x80008000;
        or.b32 $0, q, t;"""
    return tl.constexpr("{" + body + "\n}")


# e4m3: 7 magnitude bits from bits 14..8 of the lane to 10..4 (bias 120); e5m2: to 11..5 (bias 112)
_E4M3_X4_ASM = _fp8_unpack_asm(4, 0x07F007F0, 4)
_E4M3_X2_ASM = _fp8_unpack_asm(4, 0x07F007F0, 2)
_E5M2_X4_ASM = _fp8_unpack_asm(3, 0x0FE00FE0, 4)
_E5M2_X2_ASM = _fp8_unpack_asm(3, 0x0FE00FE0, 2)


@triton.jit
def _fp8_codes_to_bf16_biased(codes, ELEM: tl.constexpr, PACK: tl.constexpr):
    """uint8 e4m3 (ELEM 0) or e5m2 (ELEM 1) codes -> bfloat16 ``value * 2**-bias``.

    Each code is permuted (prmt) into the high byte of a 16-bit lane; magnitude
    and sign are then moved to their bfloat16 positions with a shift and masks.
    ``PACK`` codes go to one call: 4 where a thread holds 4 consecutive bytes
    (operands staged through shared memory), 2 where it holds pairs (the
    register operand of Hopper's wgmma), so that no repacking is needed.
    """
    if PACK == 4:
        if ELEM == 0:
            out = tl.inline_asm_elementwise(asm=_E4M3_X4_ASM, constraints="=r,=r,r", args=[codes],
                                            dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(asm=_E5M2_X4_ASM, constraints="=r,=r,r", args=[codes],
                                            dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        if ELEM == 0:
            out = tl.inline_asm_elementwise(asm=_E4M3_X2_ASM, constraints="=r,h", args=[codes],
                                            dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(asm=_E5M2_X2_ASM, constraints="=r,h", args=[codes],
                                            dtype=tl.bfloat16, is_pure=True, pack=2)
    return out


def _e2m1_unpack_asm(pack: int) -> tl.constexpr:
    """PTX for :func:`_e2m1_packed_to_bf16_biased`: ``pack`` bytes in, low and high nibbles out."""
    nibbles = """
        and.b32 a, x, 0x00070007;
        shl.b32 a, a, 6;
        and.b32 b, x, 0x00080008;
        shl.b32 b, b, 12;
        or.b32 {lo}, a, b;
        and.b32 a, x, 0x00700070;
        shl.b32 a, a, 2;
        and.b32 b, x, 0x00800080;
        shl.b32 b, b, 8;
        or.b32 {hi}, a, b;"""
    if pack == 4:  # $4 = 4 bytes; low nibbles to $0 (bytes 0,1), $1 (bytes 2,3); high nibbles to $2, $3
        body = ("\n.reg .b32 x, a, b;\nprmt.b32 x, $4, 0, 0x4140;" + nibbles.format(lo="$0", hi="$2")
                + "\nprmt.b32 x, $4, 0, 0x4342;" + nibbles.format(lo="$1", hi="$3"))
    else:  # $2 = 2 bytes in a 16-bit register; low nibbles to $0, high nibbles to $1
        body = ("\n.reg .b32 x, y, a, b;\ncvt.u32.u16 y, $2;\nprmt.b32 x, y, 0, 0x4140;"
                + nibbles.format(lo="$0", hi="$1"))
    return tl.constexpr("{" + body + "\n}")


_E2M1_X4_ASM = _e2m1_unpack_asm(4)
_E2M1_X2_ASM = _e2m1_unpack_asm(2)


@triton.jit
def _e2m1_packed_to_bf16_biased(packed, PACK: tl.constexpr):
    """Packed e2m1 bytes ``[R, C]`` -> bfloat16 ``[R, 2C]`` of ``value * 2**-126`` (element 2i: low nibble).

    A code ``s e e m`` becomes the bfloat16 bits ``s 0000000 e e m 000000``:
    ``2**(e-127) * (1 + m/2)`` for ``e >= 1`` and the subnormal ``2**-127`` for 0.5.
    Each byte is placed in a 16-bit lane by prmt; ``PACK`` as in :func:`_fp8_codes_to_bf16_biased`.
    """
    if PACK == 4:
        lo, hi = tl.inline_asm_elementwise(asm=_E2M1_X4_ASM, constraints="=r,=r,=r,=r,r", args=[packed],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        lo, hi = tl.inline_asm_elementwise(asm=_E2M1_X2_ASM, constraints="=r,=r,h", args=[packed],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    return tl.interleave(lo, hi)


@triton.jit
def _load_dequantized(data_ptr, scale_ptr, rows, stride_d, stride_s, k0, K,
                      ELEM: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr,
                      E2M1_SHIFT: tl.constexpr, PACK: tl.constexpr = 4):
    """One ``[BLOCK_R, BLOCK_K]`` tile of an operand starting at element column ``k0``.

    On the GPU: bfloat16 through the PTX unpackers. Under the interpreter
    (``INTERPRETED``): float32 through Triton's own float8 casts, because the
    interpreter has no inline PTX and stores bfloat16 as raw uint16 (its bfloat16
    arithmetic is wrong, Triton 3.9). NVFP4 tiles come out multiplied by
    ``2**-E2M1_SHIFT`` (the GEMM folds 2**8 per operand into its epilogue so that
    one multiply per element suffices); MX tiles are the exact values.
    """
    N_SCALES: tl.constexpr = BLOCK_K // SCALE_BLOCK
    offs_s = k0 // SCALE_BLOCK + tl.arange(0, N_SCALES)
    s_ptrs = scale_ptr + rows[:, None] * stride_s + offs_s[None, :]
    if EVEN_K:
        s = tl.load(s_ptrs)
    else:
        # masked blocks: byte 0 is a finite scale in both scale formats (2**-127 / 0.0); codes are 0
        s = tl.load(s_ptrs, mask=offs_s[None, :] < K // SCALE_BLOCK, other=0)

    if ELEM == 2:  # e2m1 packed two per byte, element 2i in the low nibble
        HALF_K: tl.constexpr = BLOCK_K // 2
        offs_b = k0 // 2 + tl.arange(0, HALF_K)
        d_ptrs = data_ptr + rows[:, None] * stride_d + offs_b[None, :]
        if EVEN_K:
            packed = tl.load(d_ptrs)
        else:
            packed = tl.load(d_ptrs, mask=offs_b[None, :] < K // 2, other=0)
        scale = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if INTERPRETED:
            values = _e2m1_pairs_to_e4m3(packed).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            scale = scale * (2.0 ** (6 - E2M1_SHIFT))
        else:
            values = _e2m1_packed_to_bf16_biased(packed, PACK)
            if E2M1_SHIFT < 8:  # value * scale * 2**-shift without overflowing the scale factor
                values = values * tl.full((1, 1), 2.0 ** (8 - E2M1_SHIFT), tl.bfloat16)
            scale = (scale * (2.0 ** (_E2M1_BIAS - 8))).to(tl.bfloat16)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        d_ptrs = data_ptr + rows[:, None] * stride_d + offs_k[None, :]
        if EVEN_K:
            codes = tl.load(d_ptrs)
        else:
            codes = tl.load(d_ptrs, mask=offs_k[None, :] < K, other=0)
        scale = _e8m0_to_f32(s)
        if INTERPRETED:
            if ELEM == 0:
                values = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                values = codes.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            # The bias goes back in by a separate multiply: 2**(bias) * scale can overflow.
            if ELEM == 0:
                unbias = tl.full((1, 1), 2.0 ** _E4M3_BIAS, tl.bfloat16)
            else:
                unbias = tl.full((1, 1), 2.0 ** _E5M2_BIAS, tl.bfloat16)
            values = _fp8_codes_to_bf16_biased(codes, ELEM, PACK) * unbias
            scale = scale.to(tl.bfloat16)

    # Exact operands, so the product is exact (rounding aside below bfloat16's subnormals).
    blocks = tl.reshape(values, (BLOCK_R, N_SCALES, SCALE_BLOCK)) * scale[:, :, None]
    return tl.reshape(blocks, (BLOCK_R, BLOCK_K))


@triton.jit
def _tile_rows(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (GROUP_M row tiles share their B column panels in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


@triton.jit
def _store_output(c_ptr, acc, tensor_scale_ptr, pid_m, pid_n, M, N, stride_cm,
                  HAS_TENSOR_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_TENSOR_SCALE:
        acc = acc * tl.load(tensor_scale_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _mx_gemm_dequant_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, tensor_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    A_ELEM: tl.constexpr, B_ELEM: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_TENSOR_SCALE: tl.constexpr,
    INTERPRETED: tl.constexpr, E2M1_SHIFT: tl.constexpr, A_PACK: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_rows(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Rows past the edge re-read valid rows (wrapped); their results are masked on store.
    rows_a = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rows_b = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_dequantized(a_ptr, a_scale_ptr, rows_a, stride_am, stride_asm, k0, K,
                              A_ELEM, SCALE_BLOCK, BLOCK_M, BLOCK_K, EVEN_K, INTERPRETED, E2M1_SHIFT, A_PACK)
        b = _load_dequantized(b_ptr, b_scale_ptr, rows_b, stride_bn, stride_bsn, k0, K,
                              B_ELEM, SCALE_BLOCK, BLOCK_N, BLOCK_K, EVEN_K, INTERPRETED, E2M1_SHIFT)
        acc = tl.dot(a, tl.trans(b), acc)
    if E2M1_SHIFT != 0:  # exact: a power of two, far from float32's limits
        acc = acc * (2.0 ** (2 * E2M1_SHIFT))
    _store_output(c_ptr, acc, tensor_scale_ptr, pid_m, pid_n, M, N, stride_cm,
                  HAS_TENSOR_SCALE, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _mx_gemm_dot_scaled_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, tensor_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    A_FORMAT: tl.constexpr, B_FORMAT: tl.constexpr, HAS_TENSOR_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_rows(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_a = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rows_b = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    N_SCALES: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_s = k0 // 32 + tl.arange(0, N_SCALES)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        sa_ptrs = a_scale_ptr + rows_a[:, None] * stride_asm + offs_s[None, :]
        sb_ptrs = b_scale_ptr + rows_b[:, None] * stride_bsn + offs_s[None, :]
        if EVEN_K:
            a, b, sa, sb = tl.load(a_ptrs), tl.load(b_ptrs), tl.load(sa_ptrs), tl.load(sb_ptrs)
        else:
            k_ok = offs_k < K
            s_ok = offs_s < K // 32
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
            sa = tl.load(sa_ptrs, mask=s_ok[None, :], other=127)
            sb = tl.load(sb_ptrs, mask=s_ok[None, :], other=127)
        acc = tl.dot_scaled(a, sa, A_FORMAT, b, sb, B_FORMAT, acc)
    _store_output(c_ptr, acc, tensor_scale_ptr, pid_m, pid_n, M, N, stride_cm,
                  HAS_TENSOR_SCALE, BLOCK_M, BLOCK_N)


@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, out_ptr, R, K, stride_d, stride_s, stride_o,
                       ELEM: tl.constexpr, SCALE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    values = _load_dequantized(data_ptr, scale_ptr, rows % R, stride_d, stride_s, k0, K,
                               ELEM, SCALE_BLOCK, BLOCK_R, BLOCK_K, False, INTERPRETED, 0)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], values, mask=mask)


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


# M_BUCKET (M rounded up to a power of two, unused by the kernels) keys the tuning, so a
# new token count reuses the tuning of its bucket instead of benchmarking every config again.
_AUTOTUNE_KEYS = {"dequant": ["M_BUCKET", "N", "K", "A_ELEM", "B_ELEM", "SCALE_BLOCK"],
                  "dot_scaled": ["M_BUCKET", "N", "K", "A_FORMAT", "B_FORMAT"]}
_KERNELS = {
    "dequant": triton.heuristics({"EVEN_K": _even_k})(_mx_gemm_dequant_kernel),
    "dot_scaled": triton.heuristics({"EVEN_K": _even_k})(_mx_gemm_dot_scaled_kernel),
}
_AUTOTUNED = {
    method: triton.autotune(configs=_configs(), key=_AUTOTUNE_KEYS[method],
                            prune_configs_by={"early_config_prune": _prune_configs})(kernel)
    for method, kernel in _KERNELS.items()
}


def triton_block_scaled_mm(a: BlockScaledMatrix, b: BlockScaledMatrix, *, method: str | None = None,
                           config: TileConfig | None = None,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A @ B.T`` for ``A`` ``(M, K)`` and ``B`` ``(N, K)`` block-scaled along K, accumulated in float32
    and rounded once to ``out_dtype`` (float32, bfloat16 or float16).

    ``method`` picks ``"dequant"`` (the fused kernel), ``"dot_scaled"`` (MX only;
    NVFP4 falls back to ``"dequant"``) or ``"materialize"`` (:func:`triton_dequantize`
    both operands, then cuBLAS with a float32 output: faster at large M on the
    H100, at the cost of transient bfloat16 copies, see ``benchmarks/results_mx_gemm.md``);
    ``None`` picks by size (:func:`auto_method`). ``config`` fixes the tiles instead
    of autotuning; CPU tensors (Triton's interpreter) default to :data:`INTERPRETER_CONFIG`.
    """
    M, N, K = check_operands(a, b)
    method = method or (auto_method(M) if a.data.is_cuda else DEFAULT_MX_METHOD)
    if method not in METHODS:
        raise ConfigError(f"unknown MX GEMM method {method!r}; use one of {METHODS}")
    if a.spec.tensor_scale and method == "dot_scaled":
        method = "dequant"
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedDtypeError.for_dtype(out_dtype, (torch.float32, torch.bfloat16, torch.float16),
                                              "MX GEMM output")
    out = torch.empty((M, N), dtype=out_dtype, device=a.data.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    tensor_scale = (a.tensor_scale.float() * b.tensor_scale.float()).reshape(1)
    if method == "materialize":
        if a.spec.tensor_scale:
            out = _mm_out(triton_dequantize(a), triton_dequantize(b).t(), torch.float32)
            return out.mul_(tensor_scale).to(out_dtype)
        return _mm_out(triton_dequantize(a), triton_dequantize(b).t(), out_dtype)
    a_elem, b_elem = _ELEM_CODES[a.elem_dtype], _ELEM_CODES[b.elem_dtype]
    args = (a.data, a.scales, b.data, b.scales, out, tensor_scale, M, N, K, triton.next_power_of_2(M),
            a.data.stride(0), a.scales.stride(0), b.data.stride(0), b.scales.stride(0), out.stride(0))
    if method == "dequant":
        kwargs = dict(A_ELEM=a_elem, B_ELEM=b_elem, SCALE_BLOCK=a.spec.block_size,
                      HAS_TENSOR_SCALE=a.spec.tensor_scale, INTERPRETED=not a.data.is_cuda,
                      E2M1_SHIFT=_E2M1_GEMM_SHIFT if a_elem == _E2M1 else 0,
                      A_PACK=_A_OPERAND_PACK)
    else:
        kwargs = dict(A_FORMAT=_DOT_SCALED_FORMATS[a_elem], B_FORMAT=_DOT_SCALED_FORMATS[b_elem],
                      HAS_TENSOR_SCALE=False)
    if config is None and not a.data.is_cuda:
        config = INTERPRETER_CONFIG
    if config is None:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _AUTOTUNED[method][grid](*args, **kwargs)
    else:
        grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
        _KERNELS[method][grid](*args, **kwargs, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                               BLOCK_K=config.block_k, GROUP_M=config.group_m,
                               num_stages=config.num_stages, num_warps=config.num_warps)
    return out


def last_tuned_config(method: str = DEFAULT_MX_METHOD) -> TileConfig | None:
    """The tile configuration the autotuner chose on its last launch (``None`` before any)."""
    cfg = getattr(_AUTOTUNED[method], "best_config", None)
    if cfg is None:
        return None
    kw = cfg.kwargs
    return TileConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], cfg.num_stages, cfg.num_warps)


def _mm_out(x: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ y`` accumulated in float32 and written once in ``out_dtype`` (cuBLAS's float32-output
    GEMM for bfloat16 inputs: no float32 copy of a bfloat16 result)."""
    if x.dtype == out_dtype:
        return x @ y
    if x.dtype == torch.float32:
        return (x @ y).to(out_dtype)
    try:
        return torch.mm(x, y, out_dtype=torch.float32).to(out_dtype)
    except (TypeError, NotImplementedError):  # a torch without the float32-output overload
        return (x @ y).to(out_dtype)


def triton_dequantize(m: BlockScaledMatrix) -> torch.Tensor:
    """The operand's exact values as a bfloat16 ``(rows, K)`` tensor, without the per-tensor scale.

    One read of the bytes, one bfloat16 write (float32 under the interpreter): the
    first half of the ``"materialize"`` method.
    """
    check_operands(m, m)
    rows, k = m.rows, m.data.shape[1] * m.spec.elems_per_byte
    out = torch.empty((rows, k), dtype=torch.bfloat16 if m.data.is_cuda else torch.float32, device=m.data.device)
    if rows and k:
        block_r, block_k = (64, 128) if m.data.is_cuda else (16, 64)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
        _dequantize_kernel[grid](m.data, m.scales, out, rows, k, m.data.stride(0), m.scales.stride(0), out.stride(0),
                                 ELEM=_ELEM_CODES[m.elem_dtype], SCALE_BLOCK=m.spec.block_size,
                                 INTERPRETED=not m.data.is_cuda, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return out
