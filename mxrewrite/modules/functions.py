"""The autograd functions of the linears added for Hopper's FP8 and for ``linears="all"``.

* :class:`Fp8CastLinear`: a linear fed by a rewritten norm's FP8 cast
  (``format="fp8"``). The norm-cast wrote ``Q(xhat g)`` with a static scale ``s_x``
  (the gain applied before the cast, ``gain_in_cast``: MXNorm and the exact RMSNorm
  alike); ``W`` is cast alone, dynamically per tensor, under ``fsdp_fp8_all_gather``
  before FSDP2 gathers it (:mod:`~mxrewrite.modules.fp8_weight`)::

      y = alpha * (Q(xhat g) s_x) @ (Q(W) s_w)^T + b

  Backward, with ``G`` cast dynamically to e5m2 (torchao's tensorwise recipe; e4m3
  with ``grad_cast="e4m3"``, the element type of torchao's rowwise recipe):
  ``grad_h = G @ W`` (``W`` cast on its own, transposed to the layout the GEMM
  reads) and ``grad_W = alpha * G^T @ Q(xhat g)``: the forward's cast is reused.
* :class:`OwnCastLinear`: a linear whose input is a plain tensor, converted by
  ``linears="all"`` (attention output, MLP down): it casts its input itself, in
  any format (FP8 per tensor; MXFP8 / NVFP4 blocks), and runs the same recipe's
  backward.

``grad_cast="hp"`` keeps both backward GEMMs in high precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mxrewrite.errors import ConfigError
from mxrewrite.formats import get_format
from mxrewrite.formats.fp8 import fp8_quantize, fp8_quantize_with_transpose
from mxrewrite.modules.cast_tensor import NormCastTensor
from mxrewrite.modules.fp8_weight import weight_cast, weight_cast_transposed
from mxrewrite.ops.fp8 import fp8_mm
from mxrewrite.ops.matmul import mx_matmul, quantize_matrix
from mxrewrite.ops.mx_linear import gemm_dtype, grad_matmul, gradient_elem_dtype
from mxrewrite.ops.reference import normalize

E4M3 = torch.float8_e4m3fn
# the forward GEMMs accumulate without float32 promotion on Hopper, as torchao's float8 training does
# (H200, Llama-3-8B layer, same run: 27.60 instead of 27.67 ms, output error 0.00701 instead of 0.00699)
FAST_ACCUM_FORWARD = True

__all__ = ["Fp8CastLinear", "LinearSettings", "OwnCastLinear"]


class LinearSettings(NamedTuple):
    """How a linear converted by ``linears="all"`` casts its own (plain) input."""

    fmt: str
    scale_mode: str
    grad_cast: str


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The row-major copy of ``t.T``: the operand layout of a backward GEMM reducing over ``t``'s rows."""
    return t.t().contiguous()


def _fp8_backward(grad: torch.Tensor, weight: torch.Tensor, x_data_t: torch.Tensor | None, x_scale: torch.Tensor,
                  grad_cast: str, input_dtype: torch.dtype | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The two backward GEMMs of an FP8 linear from the output gradient ``G`` (cast once, in both layouts):
    ``grad_input = Q(G) @ Q(W)`` (in ``input_dtype``; None: not wanted) and ``grad_W = Q(G)^T @ Q(x)``, the
    latter from the input's cast given in the layout that GEMM reads (``x_data_t``; None: not wanted)."""
    g_data, g_data_t, g_scale = fp8_quantize_with_transpose(grad, gradient_elem_dtype(grad_cast))
    grad_input = None
    if input_dtype is not None:  # W cast again, written in the layout G @ W reads (W.T row-major) in one pass
        w_data_t, w_scale = weight_cast_transposed(weight)
        grad_input = fp8_mm(g_data, w_data_t, g_scale, w_scale, input_dtype)
    grad_w = fp8_mm(g_data_t, x_data_t, g_scale, x_scale, weight.dtype) if x_data_t is not None else None
    return grad_input, grad_w


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class Fp8CastLinear(torch.autograd.Function):
    """``NormCastTensor`` (format ``"fp8"``) times ``W``; see the module docstring."""

    @staticmethod
    def forward(ctx, h: NormCastTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = h.settings
        hidden, out_features = h.shape[-1], weight.shape[0]
        data = h.elems.reshape(-1, hidden).view(E4M3)
        if h.gain is not None and not s.gain_in_cast:
            raise ConfigError("this FP8 norm expects its gain folded into the linears' weights, as mxrewrite did "
                              "before 2026-12-06 (a model pickled then); run mxrewrite.optimize on the original "
                              "model again")
        w_data, w_scale = weight_cast(weight)  # (the norm applied the gain before its cast)
        x_scale = h.tensor_scale * h.alpha if h.alpha != 1.0 else h.tensor_scale
        y = _add_bias(fp8_mm(data, w_data, x_scale, w_scale, h.dtype, fast_accum=FAST_ACCUM_FORWARD), bias)
        # the weight gradient reads the cast transposed: the norm's copy when it made one
        ctx.save_for_backward(h.elems_t if h.elems_t is not None else data, x_scale, h.x, h.rho, h.gain, weight)
        ctx.transposed = h.elems_t is not None
        ctx.grad_cast, ctx.input_dtype, ctx.alpha = s.grad_cast, h.dtype, h.alpha
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*h.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cast, x_scale, x, rho, gain, weight = ctx.saved_tensors
        hidden, out_features = x.shape[-1], weight.shape[0]
        grad = grad_out.reshape(-1, out_features)
        grad_h = grad_w = grad_b = None
        if ctx.grad_cast == "hp":
            dtype = gemm_dtype(x)
            if ctx.needs_input_grad[0]:
                grad_h = (grad.to(dtype) @ weight.to(dtype)).to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:
                h = normalize(x, rho, gain)
                grad_w = grad.t().to(dtype) @ h.reshape(-1, hidden).to(dtype)
                if ctx.alpha != 1.0:
                    grad_w = grad_w * ctx.alpha
        else:  # (x_scale carries alpha)
            data_t = None
            if ctx.needs_input_grad[1]:
                data_t = cast.view(E4M3) if ctx.transposed else _transposed(cast)
            grad_h, grad_w = _fp8_backward(grad, weight, data_t, x_scale, ctx.grad_cast,
                                           ctx.input_dtype if ctx.needs_input_grad[0] else None)
        if grad_h is not None:
            grad_h = grad_h.reshape(*x.shape[:-1], hidden)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.float().sum(0).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b


class OwnCastLinear(torch.autograd.Function):
    """``y = Q(x) @ Q(W)^T + b`` for a plain input ``x``; ``settings`` picks the format and the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                settings: LinearSettings) -> torch.Tensor:
        out_features = weight.shape[0]
        x2d = x.reshape(-1, x.shape[-1])
        spec = get_format(settings.fmt)
        if spec.block_scaled:
            y = mx_matmul(quantize_matrix(x2d, spec, scale_mode=settings.scale_mode),
                          quantize_matrix(weight, spec, scale_mode=settings.scale_mode), x.dtype)
            ctx.save_for_backward(x2d, weight)
        elif settings.grad_cast == "hp":
            x_data, x_scale = fp8_quantize(x2d, E4M3)
            w_data, w_scale = weight_cast(weight)
            y = fp8_mm(x_data, w_data, x_scale, w_scale, x.dtype, fast_accum=FAST_ACCUM_FORWARD)
            ctx.save_for_backward(x2d, weight)
        else:  # the backward reuses the input's cast, in the layout its GEMM reads; the weight is cast again
            # (saving its cast would keep a copy of every unsharded weight alive under FSDP2)
            x_data, x_data_t, x_scale = fp8_quantize_with_transpose(x2d, E4M3)
            w_data, w_scale = weight_cast(weight)
            y = fp8_mm(x_data, w_data, x_scale, w_scale, x.dtype, fast_accum=FAST_ACCUM_FORWARD)
            ctx.save_for_backward(x_data_t, x_scale, weight)
        ctx.settings, ctx.input_shape, ctx.input_dtype = settings, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _add_bias(y, bias).reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s = ctx.settings
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        fp8_backward = not get_format(s.fmt).block_scaled and s.grad_cast != "hp"
        if fp8_backward:
            x_data_t, x_scale, weight = ctx.saved_tensors
            grad_x, grad_w = _fp8_backward(grad, weight, x_data_t if ctx.needs_input_grad[1] else None, x_scale,
                                           s.grad_cast, ctx.input_dtype if ctx.needs_input_grad[0] else None)
        else:
            x2d, weight = ctx.saved_tensors
            grad_f = grad.float()
            dtype = gemm_dtype(x2d)
            if ctx.needs_input_grad[0]:
                grad_x = grad_matmul(grad_f, weight, s.grad_cast, s.scale_mode, dtype).to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = grad_matmul(grad_f.t(), x2d, s.grad_cast, s.scale_mode, dtype).to(weight.dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.input_shape)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None
