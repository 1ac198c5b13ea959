"""Numeric constants of the element and scale formats (OCP MX v1.0, NVIDIA NVFP4).

Kept apart from the casts so that kernels, tests and the report read the same
numbers.
"""

import torch

# float32 bit layout
F32_MANTISSA_BITS = 23
F32_EXP_BIAS = 127
F32_MIN_NORMAL = 2.0**-126

# E8M0 block scale: a biased power-of-two exponent, 0xFF is NaN, no zero or infinities.
E8M0_EXP_BIAS = 127
E8M0_NAN = 255

# Elements
F8E4M3_MAX = 448.0
F8E4M3_MAX_POW2 = 8  # largest power of two <= 448
F8E5M2_MAX = 57344.0
F8E5M2_MAX_POW2 = 15
F4E2M1_MAX = 6.0
F4E2M1_MAX_POW2 = 2
# The smallest normal float8_e4m3fn (2**-6); NVFP4 block scales are clamped to it.
F8E4M3_MIN_NORMAL = torch.finfo(torch.float8_e4m3fn).tiny

# Block sizes
MXFP8_BLOCK_SIZE = 32
NVFP4_BLOCK_SIZE = 16

# Input dtypes every cast accepts; float16 is upcast exactly to float32 first.
SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# MX element dtypes: (max finite value, exponent of the largest power of two <= max)
MX_ELEMENTS = {
    torch.float8_e4m3fn: (F8E4M3_MAX, F8E4M3_MAX_POW2),
    torch.float8_e5m2: (F8E5M2_MAX, F8E5M2_MAX_POW2),
}
