"""float4_e2m1 elements: encode from float32, decode, and pack two per byte.

Encoding is round-to-nearest-even with saturation to +-6, ported bit for bit
from torchao's ``_f32_to_floatx_unpacked`` (integer tricks on the float32 bit
pattern, so the same steps work in a Triton kernel). e2m1 has no NaN or inf:
inputs are expected to be clamped to [-6, 6] first; a NaN input encodes to an
arbitrary code, exactly as in torchao (NVFP4 has no way to carry it).

Packing: element ``2i`` goes to the low nibble of byte ``i``, ``2i+1`` to the
high nibble (torchao's ``pack_uint4``, the layout ``torch._scaled_mm`` reads).
"""

from __future__ import annotations

import torch

_SIGN_BIT_F32 = 0x80000000
_MBITS_F32 = 23
_E2M1_MAX_CODE = 7
_E2M1_SIGN = 0x8
# subnormal e2m1 (|x| < 1): adding 2**22 puts the 0.5-step grid at the float32 ulp
_DENORM_EXP = (127 - 1) + (_MBITS_F32 - 1) + 1
_DENORM_MASK_INT = _DENORM_EXP << _MBITS_F32
# normal e2m1: rebias the exponent and add half an ulp minus one (ties to even below)
_NORMAL_ADD = ((1 - 127) << _MBITS_F32) + (1 << (_MBITS_F32 - 1 - 1)) - 1

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 -> uint8 holding the 4-bit e2m1 code in its low nibble."""
    bits = x.float().contiguous().view(torch.int32)
    sign = bits & _SIGN_BIT_F32
    mag = (bits ^ sign).view(torch.float32)

    saturate = mag >= 6.0
    denormal = ~saturate & (mag < 1.0)
    normal = ~(saturate | denormal)

    denormal_code = ((mag + torch.tensor(_DENORM_MASK_INT, dtype=torch.int32).view(torch.float32)).view(torch.int32)
                     - _DENORM_MASK_INT).to(torch.uint8)
    mag_bits = mag.view(torch.int32)
    mantissa_odd = (mag_bits >> (_MBITS_F32 - 1)) & 1
    normal_code = ((mag_bits + _NORMAL_ADD + mantissa_odd) >> (_MBITS_F32 - 1)).to(torch.uint8)

    code = torch.full_like(mag_bits, _E2M1_MAX_CODE, dtype=torch.uint8)
    code = torch.where(denormal, denormal_code, code)
    code = torch.where(normal, normal_code, code)
    sign_code = ((sign >> 28) & _E2M1_SIGN).to(torch.uint8)
    return code | sign_code


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (low nibble) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack pairs of 4-bit codes along the last dim: shape ``(..., 2n)`` -> ``(..., n)`` uint8."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    packed = packed.view(torch.uint8)
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
