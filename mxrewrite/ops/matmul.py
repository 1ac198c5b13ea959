"""Matrix products of block-scaled operands: ``A @ B.T`` with both blocked along the shared dim K.

The operand type and its casts live in :mod:`mxrewrite.ops.block_matrix` and are
re-exported here, where the rest of the package imports them from.

Backends, chosen automatically from the device (override with the environment
variable ``MXREWRITE_MATMUL=emulated|triton|scaled_mm``):

* ``scaled_mm`` - sm_100+ (Blackwell): ``torch._scaled_mm`` on the raw MX/NVFP4
  operands with swizzled scales, the hardware's native block-scaled GEMM (arguments
  from :mod:`mxrewrite.ops.scaled_mm_args`). Pairs it does not take natively - mixed
  MX element types, ``K`` bytes or ``N`` not multiples of 16 - are emulated.
* ``triton`` - other CUDA GPUs (Hopper has no MX units): a Triton GEMM that
  dequantises the MX tiles in its prologue, so no dequantised copy of either
  operand is written to memory (:mod:`mxrewrite.ops.kernels.mx_gemm`). Needs
  Triton and an NVIDIA GPU (the kernel uses PTX); ROCm builds stay emulated.
* ``emulated`` - everywhere else: exact dequantisation, then a high-precision
  GEMM. On CPU operands are float32; on CUDA bfloat16, which holds every
  MXFP8 value and every e2m1 * e4m3 NVFP4 product exactly (the NVFP4 per-tensor
  scales are applied to the float32 accumulator afterwards).
"""

from __future__ import annotations

import os

import torch

from mxrewrite.errors import ConfigError
from mxrewrite.formats import get_format
from mxrewrite.ops.block_matrix import BlockScaledMatrix, dequantize_matrix, quantize_matrix
from mxrewrite.ops.scaled_mm_args import scaled_mm_args, scaled_mm_shape_ok

BACKENDS = ("emulated", "triton", "scaled_mm")

__all__ = ["BACKENDS", "BlockScaledMatrix", "block_scaled_mm", "default_backend", "dequantize_matrix",
           "mx_matmul", "quantize_matrix"]


def default_backend(device: torch.device) -> str:
    forced = os.environ.get("MXREWRITE_MATMUL")
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"MXREWRITE_MATMUL={forced!r} is not a backend; use one of {BACKENDS}")
        return forced
    if device.type != "cuda" or torch.version.hip is not None:
        return "emulated"
    if torch.cuda.get_device_capability(device)[0] >= 10:
        return "scaled_mm"
    from mxrewrite.ops import kernels

    return "triton" if kernels.available() else "emulated"


def _emulated_mm(a: BlockScaledMatrix, b: BlockScaledMatrix) -> torch.Tensor:
    dtype = torch.bfloat16 if a.data.is_cuda else torch.float32
    out = dequantize_matrix(a, dtype, with_tensor_scale=False) @ dequantize_matrix(b, dtype, with_tensor_scale=False).t()
    return out.float() * (a.tensor_scale * b.tensor_scale)


def _scaled_mm(a: BlockScaledMatrix, b: BlockScaledMatrix) -> torch.Tensor:
    mat_a, mat_b, scale_a, scale_b, kwargs = scaled_mm_args(a, b)
    out = torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, **kwargs)
    return out.float() * (a.tensor_scale * b.tensor_scale)


def _native(a: BlockScaledMatrix, b: BlockScaledMatrix) -> bool:
    """Whether the ``scaled_mm`` backend multiplies this pair itself (else it is emulated).

    Equal element types other than e5m2 x e5m2 (which cuBLASLt refuses): torch's argument
    checks also take the backward's e5m2 x e4m3 pair (``tests/ops/test_blackwell.py``),
    but no sm_100 run has shown cuBLASLt multiplying it yet."""
    return a.elem_dtype == b.elem_dtype != torch.float8_e5m2 and scaled_mm_shape_ok(a, b)


def block_scaled_mm(a: BlockScaledMatrix, b: BlockScaledMatrix, backend: str | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A @ B.T`` in ``out_dtype`` (accumulated in float32) for ``A`` of shape ``(M, K)`` and ``B`` of
    shape ``(N, K)``."""
    backend = backend or default_backend(a.data.device)
    if backend == "scaled_mm" and _native(a, b):
        out = _scaled_mm(a, b)
    elif backend == "triton":
        from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm

        out = triton_block_scaled_mm(a, b, out_dtype=out_dtype)
    else:
        out = _emulated_mm(a, b)
    return out.to(out_dtype)


@torch.library.custom_op("mxrewrite::block_scaled_mm", mutates_args=())
def _block_scaled_mm_op(
    a_data: torch.Tensor, a_scales: torch.Tensor, a_tensor_scale: torch.Tensor, a_elem: torch.dtype,
    b_data: torch.Tensor, b_scales: torch.Tensor, b_tensor_scale: torch.Tensor, b_elem: torch.dtype,
    fmt: str, out_dtype: torch.dtype,
) -> torch.Tensor:
    spec = get_format(fmt)
    # contiguous as traced, but Inductor may hand a custom op other strides
    a = BlockScaledMatrix(a_data.contiguous(), a_scales.contiguous(), a_tensor_scale, spec, a_elem)
    b = BlockScaledMatrix(b_data.contiguous(), b_scales.contiguous(), b_tensor_scale, spec, b_elem)
    return block_scaled_mm(a, b, out_dtype=out_dtype)


@_block_scaled_mm_op.register_fake
def _(a_data, a_scales, a_tensor_scale, a_elem, b_data, b_scales, b_tensor_scale, b_elem, fmt, out_dtype):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


def mx_matmul(a: BlockScaledMatrix, b: BlockScaledMatrix, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`block_scaled_mm` through the opaque op ``mxrewrite::block_scaled_mm``.

    torch.compile traces the casts around it (Inductor fuses them with their
    neighbours) but not the GEMM, whose kernels launch Triton or cuBLAS themselves.
    """
    return _block_scaled_mm_op(a.data, a.scales, a.tensor_scale, a.elem_dtype,
                               b.data, b.scales, b.tensor_scale, b.elem_dtype, a.spec.name, out_dtype)
