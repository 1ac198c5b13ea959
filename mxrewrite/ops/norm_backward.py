"""``mxrewrite::rms_norm_backward``: the straight-through gradient of a (estimated) RMS normalisation.

``dx = rho * g - (1/D) * rho**3 * x * <g, x>`` per row, where ``g`` is the
gradient with respect to ``x * rho``: RMSNorm's exact gradient evaluated with
the ``rho`` the forward used (MXNORM.md, "Backward"). Only ``x`` and ``rho`` are
saved, as for RMSNorm. On CUDA a fused Triton kernel; elsewhere the reference.
A ``torch.library.triton_op``, so torch.compile sees the kernel (see ``norm_cast``).
"""

from __future__ import annotations

import torch

from mxrewrite.ops import kernels
from mxrewrite.ops.reference import rms_norm_backward_reference


@kernels.triton_op("mxrewrite::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, rho: torch.Tensor,
                      gain: torch.Tensor | None = None) -> torch.Tensor:
    """``dx`` in ``x.dtype``; ``grad`` has ``x``'s shape, ``rho`` has ``x.shape[:-1]``, ``gain`` (optional,
    multiplies ``grad``) has ``x.shape[-1:]``."""
    if kernels.use_triton(x):
        return kernels.rms_norm_backward_triton(grad, x, rho, gain)
    return rms_norm_backward_reference(grad, x, rho, gain)


@rms_norm_backward.register_fake
def _(grad, x, rho, gain=None):
    return torch.empty_like(x)
