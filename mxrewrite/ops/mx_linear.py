"""``mxrewrite::mx_linear``: a linear layer fed by a norm's block-scaled cast.

Forward (MXNORM.md): ``y = alpha * (Q(xhat) @ Q(W * diag(gain))^T) + bias`` where
``Q(xhat)`` is the activation ``norm_cast`` produced and the gain
``gamma`` (as the norm applies it: Gemma's ``1 + weight``) is folded into the weight before the weight is cast
along its input dim. When the cast already applied the gain
(``gamma_in_cast=True``, the exact-RMSNorm baseline) the weight is cast as is.
``alpha`` carries constant multipliers that sat between the norm and the linear.

Backward (straight-through, MXNORM.md), with ``xhat = x * rho`` in high
precision, ``G`` the output gradient and ``H = alpha * G @ W``:
``grad_xhat = H * gain``, ``grad_W = alpha * G^T @ (xhat * gain)``,
``grad_gamma = sum_t xhat * H``, ``grad_bias = sum_t G``, and ``grad_x`` from
``mxrewrite::rms_norm_backward``. With ``grad_cast="mx"`` both backward GEMMs run
on MX operands blocked along their reduction dim: the gradient with
float8_e5m2 elements, the other operand with float8_e4m3fn (the MXFP8 training
recipe, used for NVFP4 models too); ``grad_cast="e4m3"`` casts the gradient to
float8_e4m3fn too (one more mantissa bit, less range: NVIDIA's MXFP8 recipe, and
both operands of the same type, which Blackwell's MX GEMM takes natively);
``grad_cast="hp"`` keeps them in high precision.

``rho`` is treated as a constant of ``x``: its dependence on ``x`` is inside the
norm gradient formula, so nothing flows back through ``norm_cast``.

Under torch.compile the op is a ``triton_op``: Inductor traces its body, so the
weight cast (with the gain folded in), the backward's operand casts (with their
transposes) and the epilogues are fused into generated kernels; only the GEMMs
stay opaque (``mxrewrite::block_scaled_mm``, :func:`mxrewrite.ops.matmul.mx_matmul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mxrewrite.errors import ConfigError
from mxrewrite.formats import get_format
from mxrewrite.formats.constants import MXFP8_BLOCK_SIZE
from mxrewrite.ops import kernels
from mxrewrite.ops.matmul import BlockScaledMatrix, mx_matmul, quantize_matrix
from mxrewrite.ops.norm_backward import rms_norm_backward
from mxrewrite.ops.reference import normalize

GRAD_CASTS = ("mx", "e4m3", "hp")


def gradient_elem_dtype(grad_cast: str) -> torch.dtype:
    """The element type an output gradient is cast to for a low-precision backward GEMM."""
    return torch.float8_e4m3fn if grad_cast == "e4m3" else torch.float8_e5m2


def gemm_dtype(t: torch.Tensor) -> torch.dtype:
    """High-precision GEMMs run in the model's dtype on GPU and in float32 on CPU."""
    return t.dtype if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) else torch.float32


@kernels.triton_op("mxrewrite::mx_linear", mutates_args=())
def mx_linear(
    x: torch.Tensor,
    rho: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    scale_mode: str,
    gamma_in_cast: bool,
    alpha: float,
    out_dtype: torch.dtype,
    grad_cast: str,
) -> torch.Tensor:
    """``alpha * (cast activation @ cast(W * gain)^T) + bias``, shape ``x.shape[:-1] + (N,)``."""
    spec = get_format(fmt)
    if not spec.block_scaled:
        raise ConfigError(f"mx_linear multiplies block-scaled (MX) casts; {fmt!r} is scaled per tensor: its linears "
                          "are mxrewrite.modules.functions.Fp8CastLinear")
    if grad_cast not in GRAD_CASTS:
        raise ConfigError(f"unknown grad_cast {grad_cast!r}; use one of {GRAD_CASTS}")
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not take inputs of size {x.shape[-1]}")
    w = weight
    if gamma is not None and not gamma_in_cast:
        w = weight.float() * gamma.float()
    act = BlockScaledMatrix(data.reshape(-1, data.shape[-1]), scales.reshape(-1, scales.shape[-1]),
                            tensor_scale, spec, spec.elem_dtype)
    w_cast = quantize_matrix(w, spec, scale_mode=scale_mode)
    if alpha == 1.0 and bias is None:  # no epilogue: the GEMM writes the output dtype itself
        y = mx_matmul(act, w_cast, out_dtype)
    else:
        y = mx_matmul(act, w_cast) * alpha
        if bias is not None:
            y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])


@mx_linear.register_fake
def _(x, rho, data, scales, tensor_scale, weight, gamma, bias, fmt, scale_mode, gamma_in_cast, alpha, out_dtype,
      grad_cast):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, (-t.shape[0]) % multiple))


def grad_matmul(grad: torch.Tensor, other: torch.Tensor, grad_cast: str, scale_mode: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """``grad @ other`` in ``dtype`` (accumulated in float32), reducing over ``grad``'s last dim;
    on MX operands unless ``grad_cast="hp"`` (the gradient's elements: :func:`gradient_elem_dtype`)."""
    if grad_cast == "hp":
        return grad.to(dtype) @ other.to(dtype)
    # blocks run along the reduction dim, zero-padded to whole blocks
    grad_t = _pad_rows(grad.t(), MXFP8_BLOCK_SIZE).t()
    other_t = _pad_rows(other, MXFP8_BLOCK_SIZE).t()
    a = quantize_matrix(grad_t, "mxfp8", scale_mode=scale_mode, elem_dtype=gradient_elem_dtype(grad_cast))
    b = quantize_matrix(other_t, "mxfp8", scale_mode=scale_mode)
    return mx_matmul(a, b, dtype)


def _setup_context(ctx, inputs, output):
    x, rho, _, _, _, weight, gamma, bias, fmt, scale_mode, _, alpha, _, grad_cast = inputs
    ctx.save_for_backward(x, rho, weight, gamma)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.alpha, ctx.grad_cast, ctx.scale_mode = alpha, grad_cast, scale_mode


def _backward(ctx, grad_out):
    x, rho, weight, gamma = ctx.saved_tensors
    hidden, out_features = x.shape[-1], weight.shape[0]
    grad = grad_out.reshape(-1, out_features).float()
    grad_scaled = grad * ctx.alpha if ctx.alpha != 1.0 else grad
    xhat = normalize(x, rho).reshape(-1, hidden)
    gain = gamma.float() if gamma is not None else None
    dtype = gemm_dtype(x)

    grad_x = grad_w = grad_gamma = grad_bias = None
    need_x, need_w, need_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    if need_x or need_gamma:
        h = grad_matmul(grad_scaled, weight, ctx.grad_cast, ctx.scale_mode, dtype)  # (M, D)
        if need_x:
            grad_x = rms_norm_backward(h.reshape(x.shape), x, rho, gain)
        if need_gamma:
            grad_gamma = (xhat * h).sum(0).to(gamma.dtype)
    if need_w:
        xg = xhat * gain if gain is not None else xhat
        grad_w = grad_matmul(grad_scaled.t(), xg, ctx.grad_cast, ctx.scale_mode, dtype).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_w, grad_gamma, grad_bias, None, None, None, None, None, None


mx_linear.register_autograd(_backward, setup_context=_setup_context)
