"""Custom ops in the ``mxrewrite`` namespace (``torch.ops.mxrewrite.*``).

* ``norm_cast(x, gamma, eps, correction, fmt, norm, p, scale_mode, eps_in_root)
  -> (data, scales, rho, tensor_scale)``: the fused norm + MXFP8/NVFP4/FP8 cast (``eps`` and
  ``correction`` as 0-d float64 tensors: :func:`norm_constant`).
* ``mx_linear(x, rho, data, scales, tensor_scale, weight, gamma, bias, fmt, scale_mode,
  gamma_in_cast, alpha, out_dtype, grad_cast) -> y``: the linear it feeds.
* ``rms_norm_backward(grad, x, rho, gain=None) -> dx``: the straight-through norm gradient.
* ``transpose_bytes(t) -> t.t().contiguous()`` of FP8 data: the layout the weight gradient's GEMM reads.
* ``fp8_cast(t, scale) -> saturate(t * scale)`` in float8_e4m3fn, one pass: FSDP2's FP8 all-gather casts.
* ``block_scaled_mm(a_data, a_scales, a_tensor_scale, a_elem, b_data, ..., fmt, out_dtype)``: the
  GEMM of two block-scaled operands, opaque to torch.compile (``matmul.mx_matmul`` calls it).

Each has a fake (meta) implementation for torch.compile / torch.export; the first
three have an autograd formula (the GEMM's operands are raw bytes, it needs none).
Data and scales travel between ops as raw uint8 bytes; view them with
:func:`typed_views`. Importing the ops ties torch.compile's caches to their
sources (:mod:`mxrewrite.ops.compile_cache`).
"""

from __future__ import annotations

import torch

from mxrewrite.formats import FormatSpec, get_format
from mxrewrite.ops.compile_cache import tag_compile_caches
from mxrewrite.ops.fp8_cast import fp8_cast
from mxrewrite.ops.mx_linear import GRAD_CASTS, mx_linear
from mxrewrite.ops.norm_backward import rms_norm_backward
from mxrewrite.ops.mxnorm_constants import gaussian_correction
from mxrewrite.ops.norm_cast import norm_cast
from mxrewrite.ops.reference import NORMS, norm_constant
from mxrewrite.ops.transpose import transpose_bytes

tag_compile_caches()


def typed_views(fmt: str | FormatSpec, data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View raw op outputs with their real dtypes (packed e2m1 stays uint8: two elements a byte)."""
    spec = get_format(fmt)
    elem = torch.uint8 if spec.elems_per_byte == 2 else spec.elem_dtype
    return data.view(elem), scales.view(spec.scale_dtype)


__all__ = ["GRAD_CASTS", "NORMS", "fp8_cast", "gaussian_correction", "mx_linear", "norm_cast", "norm_constant",
           "rms_norm_backward", "transpose_bytes", "typed_views"]
