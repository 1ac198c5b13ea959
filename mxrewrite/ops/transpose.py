"""``mxrewrite::transpose_bytes``: ``t.t().contiguous()`` of a 2-D tensor of one-byte elements.

FP8 training needs each cast operand in both layouts (Hopper's FP8 GEMM reads
both operands along their contiguous dim). The fused norm-cast writes its FP8
output row-major; the weight gradient reads it transposed. On CUDA this op runs
a tiled Triton kernel (:mod:`mxrewrite.ops.kernels.transpose`); elsewhere, and
with ``MXREWRITE_KERNELS=reference``, torch's ``t().contiguous()``. A
``torch.library.triton_op``, so torch.compile sees the kernel (see ``norm_cast``).
"""

from __future__ import annotations

import torch

from mxrewrite.ops import kernels
from mxrewrite.ops.reference import check_transpose_arg


@kernels.triton_op("mxrewrite::transpose_bytes", mutates_args=())
def transpose_bytes(t: torch.Tensor) -> torch.Tensor:
    """The row-major ``[cols, rows]`` copy of the 2-D one-byte ``t``'s transpose."""
    if kernels.use_triton(t):
        return kernels.transpose_triton(t)  # checks t itself
    check_transpose_arg(t)
    return t.t().contiguous()


@transpose_bytes.register_fake
def _(t):
    check_transpose_arg(t)
    return t.new_empty((t.shape[1], t.shape[0]))
