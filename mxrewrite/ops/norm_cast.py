"""``mxrewrite::norm_cast``: normalise over the last dim and cast to MXFP8/NVFP4/FP8 in one op.

``norm="mxnorm"`` estimates the RMS from the cast's own block maxima (MXNorm,
MXNORM.md "pre" mode); ``norm="rmsnorm"`` is the exact RMSNorm fused with the
same cast (the paper's baseline). See :mod:`mxrewrite.ops.reference` for the math.

The outputs are not differentiable: gradients reach ``x`` through
``mxrewrite::mx_linear``, which receives ``x`` and ``rho`` as well and applies the
straight-through norm gradient. On CUDA the op runs the fused Triton kernel; on
CPU (or without Triton) the PyTorch reference.

It is a ``torch.library.triton_op``: torch.compile traces its body, so Inductor
sees the Triton kernel itself (launched through ``wrap_triton``) in the graph it
compiles, with no graph break; on CPU the body is the reference's torch ops.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import ConfigError, UnsupportedDtypeError
from mxrewrite.formats import get_format
from mxrewrite.formats.constants import SUPPORTED_INPUT_DTYPES
from mxrewrite.formats.e8m0 import check_scale_mode
from mxrewrite.formats.spec import check_cast_input
from mxrewrite.ops import kernels
from mxrewrite.ops.reference import check_norm_args, norm_cast_reference


def check_norm_cast_args(x: torch.Tensor, gamma: torch.Tensor | None, eps: torch.Tensor, correction: torch.Tensor,
                         fmt: str, norm: str, p: int, scale_mode: str) -> None:
    """Our errors for every bad argument, before any kernel sees it."""
    spec = get_format(fmt)
    check_norm_args(norm, p)
    check_scale_mode(scale_mode)
    check_cast_input(x, spec.block_size, spec.name)
    for name, value in (("eps", eps), ("correction", correction)):
        if value.shape != () or value.dtype != torch.float64 or value.device != x.device:
            raise ConfigError(f"norm_cast takes {name} as a 0-d float64 tensor on the input's device ({x.device}), "
                              f"got {value.dtype} of shape {tuple(value.shape)} on {value.device}; pass "
                              f"mxrewrite.ops.norm_constant({name}, x.device)")
    if gamma is not None:
        if gamma.dtype not in SUPPORTED_INPUT_DTYPES:
            raise UnsupportedDtypeError.for_dtype(gamma.dtype, SUPPORTED_INPUT_DTYPES, "norm gain gamma")
        if gamma.shape != x.shape[-1:]:
            raise ValueError(f"gamma has shape {tuple(gamma.shape)} but the normalised dim has size "
                             f"{x.shape[-1]}; pass the norm's weight of shape ({x.shape[-1]},)")


@kernels.triton_op("mxrewrite::norm_cast", mutates_args=())
def norm_cast(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    eps: torch.Tensor,
    correction: torch.Tensor,
    fmt: str,
    norm: str,
    p: int,
    scale_mode: str,
    eps_in_root: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(data, scales, rho, tensor_scale)``; data and scales as raw uint8 bytes.

    ``gamma`` is the gain as the norm applies it (Gemma's ``1 + weight`` already added), or None.
    ``eps`` and ``correction`` (MXNorm's rescale constant) are 0-d float64 tensors, not floats:
    torch.compile specialises on every float a module hands an op, so per-site constants (calibrated
    ones differ per layer) would compile each layer again; a tensor is a graph input.
    """
    check_norm_cast_args(x, gamma, eps, correction, fmt, norm, p, scale_mode)
    args = dict(fmt=fmt, norm=norm, p=p, scale_mode=scale_mode, eps=eps, correction=correction,
                eps_in_root=eps_in_root)
    if kernels.use_triton(x):
        return kernels.norm_cast_triton(x, gamma, **args)
    return norm_cast_reference(x, gamma, **args)


@norm_cast.register_fake
def _(x, gamma, eps, correction, fmt, norm, p, scale_mode, eps_in_root):
    spec = get_format(fmt)
    lead, hidden = x.shape[:-1], x.shape[-1]
    data = x.new_empty((*lead, hidden // spec.elems_per_byte), dtype=torch.uint8)
    scales = x.new_empty((*lead, hidden // spec.block_size if spec.block_scaled else 0), dtype=torch.uint8)
    rho = x.new_empty(lead, dtype=torch.float32)
    return data, scales, rho, x.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, *grads):
    return (None,) * 9


norm_cast.register_autograd(_backward, setup_context=_setup_context)
