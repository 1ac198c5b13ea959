"""float4_e2m1 codec and nibble packing, exhaustively against the format's definition and torchao."""

from __future__ import annotations

import pytest
import torch

from mxrewrite.formats.e2m1 import E2M1_VALUES, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from tests.helpers import assert_same_bits

ao_kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative
INF = torch.tensor(float("inf"))


def test_every_code_decodes():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = torch.tensor([m for m in MAGNITUDES] + [-m for m in MAGNITUDES])
    decoded = e2m1_decode(codes)
    assert_same_bits(decoded, expected, "decode")  # also checks -0.0 for code 8
    assert_same_bits(decoded, ao_kernels.f4_unpacked_to_f32(codes), "decode vs torchao")
    assert E2M1_VALUES == tuple(expected.tolist())
    # only the low nibble counts
    assert_same_bits(e2m1_decode(codes | 0xF0), decoded, "decode ignores the high nibble")


def test_every_value_encodes_to_its_code():
    values = torch.tensor(E2M1_VALUES)
    assert_same_bits(e2m1_encode(values), torch.arange(16, dtype=torch.uint8), "encode")
    assert_same_bits(e2m1_encode(values), ao_kernels.f32_to_f4_unpacked(values), "encode vs torchao")


def test_midpoints_round_to_even():
    """A value halfway between two neighbours takes the one with an even code (mantissa bit 0)."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0, 2, 2, 4, 4, 6, 6], dtype=torch.uint8)  # 0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0
    for sign, sign_bit in ((1, 0), (-1, 8)):
        x = sign * mids
        assert_same_bits(e2m1_encode(x), expected | sign_bit, f"midpoints, sign {sign}")
        assert_same_bits(e2m1_encode(x), ao_kernels.f32_to_f4_unpacked(x), "midpoints vs torchao")
        # one float32 ulp either side of a midpoint goes to the nearer neighbour
        above = torch.nextafter(x, sign * INF)
        below = torch.nextafter(x, -sign * INF)
        lower = torch.tensor([0, 1, 2, 3, 4, 5, 6], dtype=torch.uint8)
        assert_same_bits(e2m1_encode(above), (lower + 1) | sign_bit, "just beyond a midpoint")
        assert_same_bits(e2m1_encode(below), lower | sign_bit, "just short of a midpoint")


def test_saturation_and_specials():
    x = torch.tensor([6.0, 6.5, 7.0, 1e30, float("inf"), -6.5, -float("inf"), 1e-45, -1e-45, 0.2499])
    expected = torch.tensor([7, 7, 7, 7, 7, 15, 15, 0, 8, 0], dtype=torch.uint8)
    assert_same_bits(e2m1_encode(x), expected, "saturation")
    assert_same_bits(e2m1_encode(x), ao_kernels.f32_to_f4_unpacked(x), "saturation vs torchao")


def test_dense_sweep_matches_torchao():
    """Every 997th float32 bit pattern from 0 (subnormals included) to 8, and their negatives:
    ours and torchao's integer encodings agree everywhere, and each code is a nearest value."""
    positive = torch.arange(0, 0x41000000, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([positive, -positive])
    assert_same_bits(e2m1_encode(x), ao_kernels.f32_to_f4_unpacked(x), "sweep")
    # and the code is the nearest value (ties excluded by the check above)
    decoded = e2m1_decode(e2m1_encode(x)).double()
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float64)
    nearest_dist = (x.double().abs().clamp(max=6).unsqueeze(-1) - grid).abs().amin(-1)
    assert torch.equal((decoded.abs() - x.double().abs().clamp(max=6)).abs(), nearest_dist)


def test_pack_layout_and_roundtrip():
    """Element 2i goes to the low nibble, 2i+1 to the high nibble (torchao's pack_uint4)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 64), generator=g, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 4, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed & 0xF, codes[..., 0::2])
    assert torch.equal(packed >> 4, codes[..., 1::2])
    assert_same_bits(packed, ao_kernels.pack_uint4(codes), "pack vs torchao")
    assert torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(unpack_nibbles(packed), ao_kernels.unpack_uint4(packed))
