"""The arguments of the sm_100 (Blackwell) ``torch._scaled_mm`` call for two block-scaled operands.

Blackwell's tensor cores multiply MXFP8 and NVFP4 operands natively; ``torch._scaled_mm``
reaches them through cuBLASLt when it is handed

* ``mat_a``: ``A``'s bytes as ``float8_e4m3fn`` / ``float8_e5m2`` (MXFP8) or
  ``float4_e2m1fn_x2`` (NVFP4, two elements a byte), ``(M, K)`` row-major;
* ``mat_b``: ``B``'s bytes the same way, transposed to ``(K, N)`` column-major (``B`` is
  stored ``(N, K)``: the transpose is a view);
* ``scale_a`` / ``scale_b``: the block scales as ``float8_e8m0fnu`` (MXFP8, one per 32) or
  ``float8_e4m3fn`` (NVFP4, one per 16), in the tiled layout of :mod:`mxrewrite.ops.swizzle`;
  the scale dtype is what tells ``_scaled_mm`` the scaling is blockwise.

Building them is a plain function, apart from the call, so that CPU tests can check them
against torch's own meta implementation of ``_scaled_mm`` (``tests/ops/test_blackwell.py``).
NVFP4's per-tensor scales are not arguments: the caller multiplies them into the output.

Besides what the meta implementation checks, the CUDA implementation refuses two
``float8_e5m2`` operands, and both check that ``K`` (in bytes) and ``N`` are multiples of
16; :func:`scaled_mm_shape_ok` says whether a pair fits before anything is built.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import BlockShapeError, UnsupportedDtypeError
from mxrewrite.ops.block_matrix import BlockScaledMatrix, check_operands
from mxrewrite.ops.swizzle import swizzle_block_scales

# torch._scaled_mm (ATen's checks, and its meta implementation on CUDA tensors) needs mat_a's
# columns and both dims of mat_b - K in bytes and N - divisible by 16.
_DIM_MULTIPLE = 16


def scaled_mm_shape_ok(a: BlockScaledMatrix, b: BlockScaledMatrix) -> bool:
    """Whether ``A @ B.T`` has the dims ``torch._scaled_mm`` takes: ``K`` bytes and ``N`` multiples of 16."""
    return a.data.shape[1] % _DIM_MULTIPLE == 0 and b.rows % _DIM_MULTIPLE == 0


def scaled_mm_args(a: BlockScaledMatrix, b: BlockScaledMatrix, *, out_dtype: torch.dtype = torch.bfloat16,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(mat_a, mat_b, scale_a, scale_b, kwargs)`` for ``torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, **kwargs)``
    computing ``A @ B.T`` without the NVFP4 per-tensor scales, for ``A`` ``(M, K)`` and ``B`` ``(N, K)``.

    Views of the operands' bytes plus two swizzled scale copies; nothing is launched, so
    it runs on meta and fake tensors. MXFP8 element types are per operand (the backward's
    e5m2 gradients times e4m3 operands), except e5m2 x e5m2, which cuBLASLt does not
    multiply. Raises :class:`~mxrewrite.errors.BlockShapeError` for dims ``_scaled_mm``
    refuses (:func:`scaled_mm_shape_ok`).
    """
    check_operands(a, b)
    if a.elem_dtype == b.elem_dtype == torch.float8_e5m2:
        raise UnsupportedDtypeError(
            "torch._scaled_mm does not multiply two float8_e5m2 operands (cuBLASLt has no e5m2 x e5m2 GEMM); "
            "cast one of them to float8_e4m3fn")
    if not scaled_mm_shape_ok(a, b):
        raise BlockShapeError(
            f"torch._scaled_mm needs K in bytes and N to be multiples of {_DIM_MULTIPLE}, got A of "
            f"{tuple(a.data.shape)} and B of {tuple(b.data.shape)} bytes; use the emulated or triton backend")
    scale_dtype = a.spec.scale_dtype  # float8_e8m0fnu (MX) / float8_e4m3fn (NVFP4): selects blockwise scaling
    mat_a = a.data.view(a.elem_dtype)
    mat_b = b.data.view(b.elem_dtype).t()
    scale_a = swizzle_block_scales(a.scales).view(scale_dtype)
    scale_b = swizzle_block_scales(b.scales).view(scale_dtype)
    return mat_a, mat_b, scale_a, scale_b, {"out_dtype": out_dtype}
