"""E8M0 block scales: a power of two stored as a biased 8-bit exponent.

Two rounding modes (torchao's names, MXNORM.md):

* ``"rceil"``: ``s = 2**ceil(log2(amax / elem_max))`` - the smallest power of two
  that keeps the block inside the element range. This is what Blackwell's
  ``cvt.rp.satfinite.ue8m0x2.f32`` computes and what MXFP8 training recipes use.
* ``"floor"``: ``s = 2**(floor(log2(amax)) - elem_max_pow2)`` - the OCP MX v1.0
  rule; the largest block value may land above ``elem_max`` and saturate.

Everything here is integer arithmetic on float32 bit patterns, so the same
formula gives the same bits in PyTorch, in a Triton kernel and in hardware.

Edge cases (each matches torchao's ``to_mx`` bit for bit unless stated):

* ``amax`` NaN: scale byte 0xFF (NaN); the block dequantises to NaN.
* ``amax`` +inf: rceil gives 0xFE (2**127); floor gives ``2**(128 - elem_max_pow2)``.
* ``amax`` 0 or tiny (``amax / elem_max <= 2**-127``): scale byte 0 (2**-127).
* rceil and ``log2`` rounding: torchao's eager fallback computes
  ``ceil(torch.log2(amax / elem_max))`` in float32, and ``log2`` of a value just
  above a power of two (within 2-3 ulp) rounds down to the integer, so torchao
  picks a scale one binade too small and the block's largest value saturates by
  up to 3 ulp. We compute the exact ceiling from the bits, as the Blackwell
  instruction (and torchao's own compiled sm_100 path) does. Only float32 inputs
  can hit this: a bfloat16 ``amax`` divided by 448 is never that close to a power
  of two. ``tests/formats`` pins the case.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import ConfigError
from mxrewrite.formats.constants import E8M0_EXP_BIAS, E8M0_NAN, F32_MANTISSA_BITS, F32_MIN_NORMAL

SCALE_MODES = ("rceil", "floor")

_MANTISSA_MASK = (1 << F32_MANTISSA_BITS) - 1


def check_scale_mode(mode: str) -> None:
    if mode not in SCALE_MODES:
        raise ConfigError(f"unknown E8M0 scale mode {mode!r}; use one of {SCALE_MODES}")


def _exponent_and_mantissa(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = t.contiguous().view(torch.int32)
    return (bits >> F32_MANTISSA_BITS) & 0xFF, bits & _MANTISSA_MASK


def e8m0_exponent(amax: torch.Tensor, elem_max: float, elem_max_pow2: int, mode: str) -> torch.Tensor:
    """Biased E8M0 exponent (uint8) of the block scale for float32 block maxima ``amax``."""
    check_scale_mode(mode)
    amax = amax.float()
    if mode == "rceil":
        descale = amax / elem_max
        exp_field, mantissa = _exponent_and_mantissa(descale)
        # exact ceil(log2(descale)) + bias; descale <= 2**-127 clamps to byte 0
        normal = torch.clamp(exp_field + (mantissa != 0).int(), max=254)
        subnormal = (mantissa > (1 << (F32_MANTISSA_BITS - 1))).int()
        biased = torch.where(exp_field == 0, subnormal, normal)
        biased = torch.where(torch.isinf(descale), 254, biased)
    else:
        exp_field, _ = _exponent_and_mantissa(amax)
        biased = torch.clamp(exp_field - elem_max_pow2, min=0)
    biased = torch.where(torch.isnan(amax), E8M0_NAN, biased)
    return biased.to(torch.uint8)


def e8m0_to_float32(biased: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes to float32: ``2**(b - 127)``, NaN for 0xFF (2**-127 for 0 is subnormal)."""
    b = biased.view(torch.uint8).to(torch.int32)
    bits = torch.where(b == 0, 1 << (F32_MANTISSA_BITS - 1), b << F32_MANTISSA_BITS)
    scale = bits.view(torch.float32)
    return torch.where(b == E8M0_NAN, float("nan"), scale)


def e8m0_encode_multiplier(biased: torch.Tensor, mode: str) -> torch.Tensor:
    """The float32 factor that maps a block into the element range: ``x * factor``.

    rceil follows TransformerEngine/torchao: ``2**(127 - b)``; byte 0 uses 1.0 (a
    block that small encodes to zeros either way) and 0xFF gives NaN, so the
    whole block becomes NaN.
    floor follows torchao: ``1 / max(2**(b - 127), 2**-126)``, so 0xFF (bits of
    +inf) gives 0 and only the NaN elements stay NaN; a block whose scale byte is
    0 is encoded with 2**-126 but decoded with 2**-127 (torchao's behaviour, kept
    for bit-identity; it only concerns values below 2**-118).
    """
    b = biased.to(torch.int32)
    if mode == "rceil":
        # 2**(127 - b) for 1 <= b <= 253, 2**-127 (subnormal) for b = 254
        bits = torch.where(b == 254, 1 << (F32_MANTISSA_BITS - 1), (254 - b) << F32_MANTISSA_BITS)
        factor = torch.where(b == 0, 1.0, bits.view(torch.float32))
        return torch.where(b == E8M0_NAN, float("nan"), factor)
    scale = torch.clamp((b << F32_MANTISSA_BITS).view(torch.float32), min=F32_MIN_NORMAL)
    return 1.0 / scale


__all__ = [
    "SCALE_MODES",
    "E8M0_EXP_BIAS",
    "check_scale_mode",
    "e8m0_exponent",
    "e8m0_to_float32",
    "e8m0_encode_multiplier",
]
