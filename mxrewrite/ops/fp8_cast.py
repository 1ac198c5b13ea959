"""``mxrewrite::fp8_cast``: ``saturate(t * scale)`` in float8_e4m3fn with the scale already known.

The cast FSDP2's FP8 all-gather applies to every weight shard before each
gather (:mod:`mxrewrite.modules.fp8_weight`), in eager code between the
compiled layers. On CUDA it is one Triton pass (:mod:`mxrewrite.ops.kernels.fp8_cast`);
elsewhere, and with ``MXREWRITE_KERNELS=reference``, :func:`mxrewrite.formats.fp8.fp8_cast`,
which it equals bit for bit. A ``torch.library.triton_op``, so torch.compile sees
the kernel (see ``norm_cast``).
"""

from __future__ import annotations

import torch

from mxrewrite.formats.fp8 import fp8_cast as fp8_cast_reference
from mxrewrite.ops import kernels


@kernels.triton_op("mxrewrite::fp8_cast", mutates_args=())
def fp8_cast(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` (floating point, any shape) times the float32 one-element ``scale``, saturated to +-448, in
    float8_e4m3fn; contiguous."""
    if kernels.use_triton(t):
        return kernels.fp8_cast_triton(t, scale)
    return fp8_cast_reference(t, scale, torch.float8_e4m3fn).contiguous()


@fp8_cast.register_fake
def _(t, scale):
    return torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
