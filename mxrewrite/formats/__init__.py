"""Low-precision number formats: MXFP8, NVFP4 and per-tensor-scaled FP8 casts in plain PyTorch.

These are the bit-exact references every kernel in :mod:`mxrewrite.ops` is
tested against (and they are themselves tested against torchao).
"""

from mxrewrite.formats.fp8 import fp8_dequantize, fp8_quantize
from mxrewrite.formats.e8m0 import SCALE_MODES, e8m0_exponent, e8m0_to_float32
from mxrewrite.formats.mx import block_amax, mx_dequantize, mx_quantize
from mxrewrite.formats.nvfp4 import nvfp4_dequantize, nvfp4_quantize, tensor_scale_from_amax
from mxrewrite.formats.spec import FORMATS, FP8, MXFP8, NVFP4, FormatSpec, get_format

__all__ = [
    "FORMATS",
    "FP8",
    "MXFP8",
    "NVFP4",
    "SCALE_MODES",
    "FormatSpec",
    "block_amax",
    "e8m0_exponent",
    "e8m0_to_float32",
    "fp8_dequantize",
    "fp8_quantize",
    "get_format",
    "mx_dequantize",
    "mx_quantize",
    "nvfp4_dequantize",
    "nvfp4_quantize",
    "tensor_scale_from_amax",
]
