"""``MXLinear``: an ``nn.Linear`` that multiplies the block-scaled cast a rewritten norm made.

Given a :class:`~mxrewrite.modules.cast_tensor.NormCastTensor` ``h = alpha * xhat * gain``
it computes ``y = alpha * Q(xhat) @ Q(W * diag(gain))^T + b`` with
``mxrewrite::mx_linear`` (the gain folded into the weight before its cast, MXNORM.md);
given any other input it is ``nn.Linear``, or, when ``linears="all"`` converted it
(``own_cast``), a linear that casts that input itself (:class:`~mxrewrite.modules.functions.OwnCastLinear`).
Under ``format="fp8"`` the product is :class:`~mxrewrite.modules.functions.Fp8CastLinear`
(FP8 with per-tensor scales, Hopper's tensor cores). Backward, from the output gradient ``G``:
``grad_h = G @ W`` and ``grad_W = G^T @ h`` (both GEMMs on MXFP8 operands with e5m2
gradients when ``grad_cast="mx"``), ``grad_b = sum G``; the norm's function turns
``grad_h`` into the gradients of ``x`` and the gain once per site.

``UnitScaledMXLinear`` does the same for ``unit_scaling.Linear``, keeping its
forward multiplier ``1/sqrt(fan_in)`` and its backward scales of the input and
weight gradients (unit scaling's constants, in both directions).

Tensor parallelism: it is an ``nn.Linear``, so ``ColwiseParallel`` shards its
weight by output rows; each rank then multiplies its replicated cast by its rows
(the gain runs along the input dim, which every rank holds whole). Row-wise
sharding of a linear fed by a norm would split the cast's blocks and is refused
with an error; a linear casting its own input (``own_cast``) takes
``RowwiseParallel`` too (each rank casts its slice of the input dim).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mxrewrite.errors import MXRewriteError
from mxrewrite.modules.adopt import adopt_state
from mxrewrite.modules.cast_tensor import NormCastTensor
from mxrewrite.modules.functions import Fp8CastLinear, LinearSettings, OwnCastLinear
from mxrewrite.ops.mx_linear import gemm_dtype, grad_matmul
from mxrewrite.ops.reference import normalize

__all__ = ["MXLinear", "UnitScaledMXLinear", "replacement_for"]


class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: NormCastTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = h.settings
        y = torch.ops.mxrewrite.mx_linear(
            h.x, h.rho, h.elems, h.scales, h.tensor_scale, weight, h.gain, bias, s.fmt, s.scale_mode, s.gain_in_cast,
            h.alpha, h.dtype, s.grad_cast)
        ctx.save_for_backward(h.x, h.rho, h.gain, weight)
        ctx.settings, ctx.alpha, ctx.input_dtype = s, h.alpha, h.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, rho, gain, weight = ctx.saved_tensors
        s = ctx.settings
        hidden, out_features = x.shape[-1], weight.shape[0]
        grad = grad_out.reshape(-1, out_features).float()
        dtype = gemm_dtype(x)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_matmul(grad, weight, s.grad_cast, s.scale_mode, dtype)
            grad_h = grad_h.reshape(*x.shape[:-1], hidden).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            h = normalize(x, rho, gain)
            h = h.reshape(-1, hidden)
            if ctx.alpha != 1.0:
                h = h * ctx.alpha
            grad_w = grad_matmul(grad.t(), h, s.grad_cast, s.scale_mode, dtype).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def fused_linear(input: NormCastTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The product of a rewritten norm's cast with ``weight``, in the cast's format."""
    fn = Fp8CastLinear if input.settings.fmt == "fp8" else _CastLinear
    return fn.apply(input, weight, bias)


class MXLinear(nn.Linear):
    """A linear fed by a rewritten norm, or converted by ``linears="all"``; shares the replaced ``nn.Linear``'s
    parameters (see module docstring).

    Args:
        linear: the ``nn.Linear`` replaced.
        own_cast: how to cast a plain (not norm-cast) input; None keeps such inputs in high precision.
    """

    def __init__(self, linear: nn.Linear, own_cast: LinearSettings | None = None):
        nn.Module.__init__(self)
        adopt_state(self, linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.own_cast = own_cast

    @classmethod
    def from_linear(cls, linear: nn.Linear, own_cast: LinearSettings | None = None) -> "MXLinear":
        return cls(linear, own_cast)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(self.weight):
            return self._sharded_forward(input)
        return self._local_forward(input, self.weight, self.bias)

    def _local_forward(self, input, weight, bias):
        if isinstance(input, NormCastTensor):
            return fused_linear(input, weight, bias)
        if self.own_cast is not None:
            return OwnCastLinear.apply(input, weight, bias, self.own_cast)
        return F.linear(input, weight, bias)

    def _sharded_forward(self, input):
        """Tensor parallel: ColwiseParallel (replicated input times this rank's rows of the weight), and for a
        plain input cast by the linear itself RowwiseParallel (this rank's slice of the input dim, partial sums)."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        weight = self.weight
        placements = weight.placements
        if (self.own_cast is not None and isinstance(input, DTensor) and not isinstance(input, NormCastTensor)
                and any(isinstance(p, Shard) and p.dim % 2 == 1 for p in placements)):
            return self._rowwise_forward(input)
        local_input = input
        if isinstance(input, DTensor):
            if not all(isinstance(p, Replicate) for p in input.placements):
                raise MXRewriteError(f"MXLinear under tensor parallelism needs a replicated input, got placements "
                                     f"{input.placements}; shard it with ColwiseParallel (input_layouts=Replicate())")
            # each rank's input gradient (grad_out @ its rows of W) is a partial sum wherever the weight is
            # sharded: say so, so that the Replicate input layout all-reduces it in backward
            local_input = input.to_local(grad_placements=[Partial() if isinstance(p, Shard) else Replicate()
                                                          for p in placements])
        if not isinstance(local_input, NormCastTensor) and self.own_cast is None:
            return F.linear(input, weight, self.bias)
        if not isinstance(input, DTensor) and any(isinstance(p, Shard) for p in placements):
            raise MXRewriteError("MXLinear with a sharded weight needs a replicated DTensor input (its input "
                                 "gradient is a partial sum to all-reduce); parallelize it with ColwiseParallel")
        if any(isinstance(p, Shard) and p.dim % 2 == 1 for p in placements):
            raise MXRewriteError("MXLinear cannot be sharded row-wise (it would split the cast's blocks along the "
                                 "input dim); use ColwiseParallel for linears fed by a rewritten norm")
        bias = self.bias.to_local() if self.bias is not None else None
        y = self._local_forward(local_input, weight.to_local(), bias)
        out_placements = [Shard(y.dim() - 1) if isinstance(p, Shard) else Replicate() for p in placements]
        return DTensor.from_local(y, weight.device_mesh, out_placements, run_check=False)

    def _rowwise_forward(self, input):
        """RowwiseParallel: each rank casts its slice of the input dim; the outputs are partial sums (the bias,
        replicated, is added once, after the reduction)."""
        from torch.distributed.tensor import DTensor, Partial

        y = OwnCastLinear.apply(input.to_local(), self.weight.to_local(), None, self.own_cast)
        y = DTensor.from_local(y, self.weight.device_mesh, [Partial()], run_check=False)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        own = f" or its own {self.own_cast.fmt} cast" if self.own_cast is not None else ""
        return super().extra_repr() + f", low-precision input: a fused norm cast{own}"


class UnitScaledMXLinear(MXLinear):
    """``unit_scaling.Linear`` fed by a rewritten norm: ``unit_scaling.functional.linear`` with the MX product."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from unit_scaling.constraints import apply_constraint
        from unit_scaling.scale import scale_bwd, scale_fwd

        if not isinstance(input, NormCastTensor):
            return super().forward(input)
        fan_out, fan_in = self.weight.shape
        batch_size = input.numel() // fan_in
        output_scale, grad_input_scale = apply_constraint(self.constraint, fan_in ** -0.5, fan_out ** -0.5)
        grad_weight_scale = batch_size ** -0.5
        weight = scale_bwd(self.weight, grad_weight_scale)
        bias = scale_bwd(self.bias, grad_weight_scale) if self.bias is not None else None
        output = fused_linear(scale_bwd(input, grad_input_scale), weight, bias)
        return scale_fwd(output, output_scale)


def replacement_for(linear: nn.Module) -> type[MXLinear] | None:
    """The MX class that computes what ``linear`` computes, or None when there is none."""
    if isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward:
        return MXLinear
    if type(linear).__module__.startswith("unit_scaling") and type(linear).__name__ == "Linear":
        return UnitScaledMXLinear
    return None
