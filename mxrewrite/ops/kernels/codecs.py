"""Triton device functions for the number formats: E8M0 scale exponents, e4m3 and e2m1 encodes, and the
widening of bfloat16 pairs.

Each one computes exactly what the PyTorch reference in :mod:`mxrewrite.formats`
computes (integer arithmetic on float32 bit patterns; IEEE divisions, or for the
NVFP4 block scales float64 arithmetic that gives the same quotients without a
branch), so a kernel built from them reproduces the reference bit for bit; the
tests compare them over millions of values.

float32 -> float8_e4m3fn has two implementations behind a constexpr switch:
the hardware conversion (``cvt.rn.satfinite.e4m3x2.f32`` on sm_89+: :func:`has_fp8_conversion`) for GPU
kernels, and a software encoder (c10's ``fp8e4m3fn_from_fp32_value``, round to
nearest even) for Triton's interpreter, whose float8 casts neither round to
nearest even nor saturate. The e2m1 byte pack likewise: byte permutes in inline
PTX on the GPU, the same bits from integer arithmetic under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# float32 layout
_MANTISSA_MASK = tl.constexpr(0x7FFFFF)
_ABS_MASK = tl.constexpr(0x7FFFFFFF)

# E8M0 (mxrewrite.formats.e8m0)
_E8M0_MAX_FINITE = tl.constexpr(254)
_E8M0_NAN = tl.constexpr(255)

# float8_e4m3fn (c10/util/Float8_e4m3fn.h)
_F8E4M3_MAX = tl.constexpr(448.0)
_F8E4M3_NAN_CODE = tl.constexpr(0x7F)
_F8E4M3_OVERFLOW_BITS = tl.constexpr(1087 << 20)  # float32 bits of 480: NaN or beyond the range
_F8E4M3_MIN_NORMAL_BITS = tl.constexpr(121 << 23)  # float32 bits of 2**-6
_F8E4M3_DENORM_MAGIC = tl.constexpr(16384.0)  # 2**14: its float32 ulp is e4m3's subnormal step 2**-9
_F8E4M3_DENORM_MAGIC_BITS = tl.constexpr(141 << 23)
_F8E4M3_REBIAS = tl.constexpr(((7 - 127) << 23) + 0x7FFFF)  # new bias, plus half an ulp minus one

# float4_e2m1 (mxrewrite.formats.e2m1)
_F4E2M1_MAX = tl.constexpr(6.0)
_ONE_SIXTH = tl.constexpr(1 / 6)  # float64(1 / 6): the NVFP4 block scale divides the block maximum by 6
_E2M1_SIGN = tl.constexpr(8)
_E2M1_GRID_BASE = tl.constexpr(8388608.0)  # 2**23, whose float32 ulp is 1


def has_fp8_conversion(device) -> bool:
    """sm_89+ converts float32 to e4m3 in hardware (round to nearest even, saturating): the ``HARDWARE`` switch
    of :func:`e4m3_encode` for a kernel running on ``device`` (not under the interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def to_float32(x, INTERPRET: tl.constexpr):
    """Exact upcast to float32; bfloat16 by its bits under the interpreter, whose cast mangles subnormals."""
    if INTERPRET and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def bf16_pairs_to_float32(words):
    """float32 of the bfloat16 pairs in 32-bit words, ``[..., K] -> [..., 2K]`` (the low half first).

    One shift or mask an element: widening a bfloat16 load took a byte permute and a shift for the high
    half of every word (NVFP4's cast is instruction-bound on sm_90).
    """
    low = (words << 16).to(tl.float32, bitcast=True)
    high = (words & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.interleave(low, high)


@triton.jit
def clamp_keep_nan(x, lo: tl.constexpr, hi: tl.constexpr):
    """``torch.clamp(x, lo, hi)``: NaN stays NaN."""
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def e8m0_rceil_exponent(amax):
    """Biased E8M0 exponent ``ceil(log2(amax / 448))`` from the bits (``e8m0_exponent``, rceil, e4m3)."""
    descale = tl.div_rn(amax, _F8E4M3_MAX)
    bits = descale.to(tl.int32, bitcast=True)
    exp_field = (bits >> 23) & 0xFF
    mantissa = bits & _MANTISSA_MASK
    normal = tl.minimum(exp_field + (mantissa != 0).to(tl.int32), _E8M0_MAX_FINITE)
    subnormal = (mantissa > (1 << 22)).to(tl.int32)
    biased = tl.where(exp_field == 0, subnormal, normal)
    biased = tl.where(descale == float("inf"), _E8M0_MAX_FINITE, biased)
    return tl.where(amax != amax, _E8M0_NAN, biased)


@triton.jit
def e8m0_rceil_multiplier(biased):
    """``e8m0_encode_multiplier(b, "rceil")``: ``2**(127 - b)``, 1.0 for byte 0, NaN for 0xFF."""
    bits = tl.where(biased == _E8M0_MAX_FINITE, 1 << 22, (_E8M0_MAX_FINITE - biased) << 23)
    factor = tl.where(biased == 0, 1.0, bits.to(tl.float32, bitcast=True))
    return tl.where(biased == _E8M0_NAN, float("nan"), factor)


@triton.jit
def e8m0_floor_exponent(amax):
    """Biased E8M0 exponent ``floor(log2(amax)) - 8`` (OCP rule for e4m3), clamped at 0; NaN -> 0xFF."""
    exp_field = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.maximum(exp_field - 8, 0)
    return tl.where(amax != amax, _E8M0_NAN, biased)


@triton.jit
def e8m0_floor_multiplier(biased):
    """``e8m0_encode_multiplier(b, "floor")``: ``1 / max(2**(b - 127), 2**-126)`` (0 for 0xFF)."""
    scale = tl.maximum((biased << 23).to(tl.float32, bitcast=True), 1.1754943508222875e-38)
    return tl.div_rn(1.0, scale)


@triton.jit
def e4m3_encode_software(y):
    """float32 (already clamped to +-448) -> e4m3 code in an int32, round to nearest even; NaN -> 0x7F | sign."""
    bits = y.to(tl.int32, bitcast=True)
    mag_bits = bits & _ABS_MASK
    mag = mag_bits.to(tl.float32, bitcast=True)
    # |y| < 2**-6: the float32 adder rounds |y| + 2**14 onto e4m3's subnormal grid
    denormal = (mag + _F8E4M3_DENORM_MAGIC).to(tl.int32, bitcast=True) - _F8E4M3_DENORM_MAGIC_BITS
    mantissa_odd = (mag_bits >> 20) & 1
    normal = (mag_bits + _F8E4M3_REBIAS + mantissa_odd) >> 20
    code = tl.where(mag_bits < _F8E4M3_MIN_NORMAL_BITS, denormal, normal)
    code = tl.where(mag_bits >= _F8E4M3_OVERFLOW_BITS, _F8E4M3_NAN_CODE, code)
    return code | tl.where(bits < 0, 0x80, 0)


@triton.jit
def e4m3_encode(y, HARDWARE: tl.constexpr):
    """Saturating float32 -> float8_e4m3fn bytes (uint8): ``clamp(y, -448, 448).to(float8_e4m3fn)``."""
    if HARDWARE:
        # cvt.rn.satfinite saturates by itself and keeps NaN
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return e4m3_encode_software(clamp_keep_nan(y, -_F8E4M3_MAX, _F8E4M3_MAX)).to(tl.uint8)


@triton.jit
def e4m3_decode_normal(code):
    """e4m3 code (int32) of a positive normal value or NaN -> float32 (NVFP4 block scales are >= 2**-6)."""
    value = (((code >> 3) + 120) << 23 | (code & 7) << 20).to(tl.float32, bitcast=True)
    return tl.where(code == _F8E4M3_NAN_CODE, float("nan"), value)


@triton.jit
def e4m3_round(y, HARDWARE: tl.constexpr):
    """``clamp(y, -448, 448).to(float8_e4m3fn)`` as its code (int32) and its value (float32), for ``y``
    in [2**-6, 448] or NaN of either sign (the NVFP4 block scales)."""
    if HARDWARE:
        fp8 = y.to(tl.float8e4nv)
        return fp8.to(tl.uint8, bitcast=True).to(tl.int32), fp8.to(tl.float32)
    else:
        code = e4m3_encode(y, False).to(tl.int32)
        return code, e4m3_decode_normal(code & 0x7F)


@triton.jit
def f32_quotient_by_reciprocal(a, reciprocal):
    """``float32(a / b)`` rounded as IEEE division rounds it, from ``reciprocal = float64(1 / b)``
    correctly rounded (``a``, ``b`` float32; no branch, no division).

    ``a * reciprocal`` in float64 is within 2**-52 (relative) of ``a / b``, while a quotient of two
    24-bit significands that is not a float32 is at least 2**-49 (relative) away from the nearest
    midpoint of float32 neighbours: rounding the float64 product to float32 lands on the same side.
    This holds wherever the quotient is a normal float32 or overflows; below 2**-126 the result may
    differ from IEEE division in the last subnormal bit (callers clamp such values away).
    Zeros, infinities and NaNs come out as the division gives them (``1 / inf = 0``, ``inf * 0 = NaN``
    as ``inf / inf``).
    """
    return (a.to(tl.float64) * reciprocal).to(tl.float32)


@triton.jit
def f32_divide(a, b, APPROX_RCP: tl.constexpr):
    """``float32(a / b)`` correctly rounded, for ``a`` float64 holding a finite float32 value and ``b`` a
    float32 with few significant bits (e4m3 values), without IEEE division's slow-path branch.

    Markstein's iteration in float64 from a float32 seed ``y ~ 1 / b`` (relative error <= 2**-22; PTX's
    ``rcp.approx`` with ``APPROX_RCP``, outside Triton's interpreter):
    ``q <- q + (a - q * b) * y`` twice. Every residual ``a - q * b`` is exact in float64 (``b`` has 4
    significant bits, ``q * b`` at most 57), so each step squares the error: 2**-44, then 2**-66, below
    float64's rounding. The float64 quotient is thus within 2**-52 of ``a / b``, and exactly ``a / b``
    where that is a float64; rounding it to float32 gives ``a / b`` rounded once: a float32 tie (a
    subnormal midpoint) is a float64 and comes out exactly, and any other quotient is further from a
    float32 midpoint than the float64 error.
    Zeros and NaNs propagate as in the division, for ``b`` in [2**-9, 448] or NaN (an infinite ``a``
    would give NaN: the kernels divide ``1 / t <= 2**120``).
    """
    if APPROX_RCP:  # one MUFU.RCP; ``1.0 / b`` also scales operands beyond 2**126 (not needed here)
        seed = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        seed = 1.0 / b
    seed = seed.to(tl.float64)
    b64 = b.to(tl.float64)
    q = a * seed
    q = tl.fma(tl.fma(-q, b64, a), seed, q)
    q = tl.fma(tl.fma(-q, b64, a), seed, q)
    return q.to(tl.float32)


@triton.jit
def nvfp4_tensor_scale_inverses(tscale):
    """``float64(1 / t)`` and ``float32(1 / t)`` widened to float64 (IEEE divisions), once per program:
    the arguments of :func:`nvfp4_block_scales` for the per-tensor scale ``t``."""
    return 1.0 / tscale.to(tl.float64), tl.div_rn(1.0, tscale).to(tl.float64)


@triton.jit
def nvfp4_block_scales(amax, tscale_rcp, tscale_inv, HARDWARE: tl.constexpr):
    """The e4m3 code of each NVFP4 block scale and the factor that casts its block (int32, float32):
    ``code = e4m3(clamp(amax / 6 / t, 2**-6, 448))``, ``factor = (1 / t) / decode(code)``,
    rounded as the IEEE divisions of :func:`mxrewrite.formats.nvfp4.nvfp4_quantize`.

    ``tscale_rcp`` and ``tscale_inv`` come from :func:`nvfp4_tensor_scale_inverses`; ``HARDWARE`` takes the
    GPU's e4m3 conversions and approximate reciprocal (sm_89+, not under the interpreter). The divisions are
    branch-free (:func:`f32_quotient_by_reciprocal`, :func:`f32_divide`): an IEEE float32 division
    checks its operands and may branch to a slow path, and each such branch ends a basic block, so the
    compiler could not interleave the arithmetic of a thread's blocks (on the H100, NVFP4 MXNorm with
    rows in registers went from 64-78% to 79-87% of the bandwidth floor without it). The two quotients by
    reciprocal may differ from IEEE division only below 2**-126, which the clamp at 2**-6 sends to the
    same scale: ``amax / 6 <= 2**-126`` gives ``amax / 6 / t <= 2**-6`` as ``t >= 2**-120``.
    """
    sixth = tl.full((), _ONE_SIXTH, tl.float64)
    block_scale = f32_quotient_by_reciprocal(f32_quotient_by_reciprocal(amax, sixth), tscale_rcp)
    code, value = e4m3_round(clamp_keep_nan(block_scale, 0.015625, _F8E4M3_MAX), HARDWARE)
    return code, f32_divide(tscale_inv, value, HARDWARE)


# PTX for e2m1_pack on the GPU, 4 pairs at a time: $1-$4 and $5-$8 the float32 bits of the low and high
# elements, $9-$12 and $13-$16 their magnitude codes (in the low byte), $0 the four bytes. prmt gathers
# the low bytes of four registers into one (0x0040, 0x4000, 0x7610), or copies the sign bit of each
# element across a byte (selector nibbles 0xB and 0xF: byte 3 of either source, sign-extended); masks
# then keep bit 3 of each byte from the low signs and bit 7 from the high ones. (One line: torch 2.11's
# Inductor copies the string into the module it generates as a one-line literal.)
_E2M1_PACK4_ASM = tl.constexpr(" ".join([
    "{",
    ".reg .b32 a, b, low, high, sl, sh;",
    "prmt.b32 a, $9, $10, 0x0040;",
    "prmt.b32 b, $11, $12, 0x4000;",
    "prmt.b32 low, a, b, 0x7610;",
    "prmt.b32 a, $13, $14, 0x0040;",
    "prmt.b32 b, $15, $16, 0x4000;",
    "prmt.b32 high, a, b, 0x7610;",
    "prmt.b32 a, $1, $2, 0x00FB;",
    "prmt.b32 b, $3, $4, 0xFB00;",
    "prmt.b32 sl, a, b, 0x7610;",
    "prmt.b32 a, $5, $6, 0x00FB;",
    "prmt.b32 b, $7, $8, 0xFB00;",
    "prmt.b32 sh, a, b, 0x7610;",
    "shl.b32 high, high, 4;",
    "or.b32 low, low, high;",
    "and.b32 sl, sl, 0x08080808;",
    "and.b32 sh, sh, 0x80808080;",
    "or.b32 sl, sl, sh;",
    "or.b32 $0, low, sl;",
    "}",
]))


@triton.jit
def e2m1_pack(low, high, HARDWARE: tl.constexpr):
    """The bytes (uint8) holding the e2m1 codes of ``low`` (low nibble) and ``high``: the codes
    ``mxrewrite.formats.e2m1.e2m1_encode(clamp(y, -6, 6))`` gives every non-NaN ``y`` (NaN gets an
    arbitrary code, as in the reference).

    On the GPU (``HARDWARE``) a few byte permutes assemble four bytes at once from the magnitude codes and
    the sign bits (``_E2M1_PACK4_ASM``: 15 instructions for 8 elements, against 27 for shifting each sign
    into place and packing pair by pair); the interpreter runs the same arithmetic on whole integers.
    """
    low_code = _e2m1_magnitude_code(low)
    high_code = _e2m1_magnitude_code(high)
    if HARDWARE:
        return tl.inline_asm_elementwise(
            _E2M1_PACK4_ASM, "=r" + ",r" * 16,
            [low.to(tl.int32, bitcast=True), high.to(tl.int32, bitcast=True), low_code, high_code],
            dtype=tl.uint8, is_pure=True, pack=4)
    else:
        signs = _sign_bit(low) * _E2M1_SIGN + _sign_bit(high) * (_E2M1_SIGN * 16)
        return (low_code + high_code * 16 + signs).to(tl.uint8)  # (the bits of 2**23 leave no low bits)


@triton.jit
def _e2m1_magnitude_code(y):
    """The e2m1 code of ``min(|y|, 6)`` in the low three bits of an int32, the next five zero (the bits
    of ``2**23`` plus the code).

    ``m = min(|y|, 6)`` is rounded onto e2m1's three grids by the float32 adder next to ``B = 2**23``,
    whose ulp is 1: ``B + 2m`` rounds ``m`` to halves (the code below 2), ``B + 2 + m`` to integers
    (the code between 2 and 4) and ``B + 4 + m / 2`` to even integers (above 4), each with ties to
    even, as e2m1 rounds. The code is the smallest of the three (the map from value to code is
    concave); checked against the reference for every float32 in [0, 6]. Mostly floating-point and
    multiply-add instructions: on sm_90 the integer/logic pipe, half as wide, is what limits the
    NVFP4 cast.
    """
    mag = tl.minimum(tl.abs(y), _F4E2M1_MAX)
    halves = tl.fma(mag, 2.0, _E2M1_GRID_BASE).to(tl.int32, bitcast=True)
    units = (mag + (_E2M1_GRID_BASE + 2.0)).to(tl.int32, bitcast=True)
    twos = tl.fma(mag, 0.5, _E2M1_GRID_BASE + 4.0).to(tl.int32, bitcast=True)
    return tl.minimum(tl.minimum(halves, units), twos)


@triton.jit
def _sign_bit(y):
    """1 where the float ``y`` has its sign bit set (-0.0 included), else 0, as int32."""
    return (y.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
