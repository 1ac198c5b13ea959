"""FP8 with float32 per-tensor scales: Hopper's native FP8 training format, in plain PyTorch.

Hopper (sm_90) has FP8 tensor cores but no MX block scaling: ``torch._scaled_mm``
takes one float32 scale per operand (or per row / per 128-block). These casts
follow torchao's float8 training arithmetic bit for bit (its tensorwise recipe),
which the tests check:

* dynamic scaling: ``scale = float32(fmax / max(amax, 1e-12))`` computed in
  float64 (so eager and compiled code agree), rounded down to a power of two
  (torchao's ``round_scales_to_power_of_2``, the default of its rowwise recipe),
  ``data = saturate(t * scale)``, and the GEMM multiplies by ``1 / scale``.
  A power-of-two scale only shifts exponents, so a normal value rounds to the
  same e4m3/e5m2 value whatever the scale: ranks of data or tensor parallelism,
  each scaling its own slice, cast it as one GPU would (except values in the
  format's subnormal range), and the error is lower. Measured on CPU with exact
  FP8 emulation (Llama-3-8B layer of benchmarks/bench_layer.py, 1024 tokens,
  error of the residual branch against float32): torchao tensorwise 0.06738,
  the same with power-of-two scales 0.06645, rowwise 0.06645; this recipe
  0.06728 before, 0.06634 with them;
* static scaling of a normalised activation: the norm bounds its output
  (``|x * rho| <= sqrt(D)`` for RMSNorm, ``K**(1/p) / c`` for MXNorm, see
  :mod:`mxrewrite.ops.mxnorm_constants`), so the scale is known without a
  tensor-wide reduction: the fused norm-cast stays one pass over ``x``. It is
  the power of two just above ``bound / fmax``, so applying it is exact.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest power of two that maps ``amax`` into ``dtype``'s range (float32; the quotient in float64)."""
    # amax floored at torchao's float8_utils.EPS, 1e-12 (an all-zero tensor gets a huge finite scale, not inf);
    # a literal, not a global: torch.compile(dynamic=True) makes a global float symbolic, and dynamo cannot lift
    # that into an autograd.Function's backward
    scale = (fp8_max(dtype) / torch.clamp(amax.to(torch.float64), min=1e-12)).to(torch.float32)
    return torch.exp2(torch.floor(torch.log2(scale)))


def saturating_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(t, -max, max).to(dtype)``: round to nearest even, saturating; NaN stays NaN."""
    limit = fp8_max(dtype)
    return t.clamp(min=-limit, max=limit).to(dtype)


def fp8_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """``saturate(t * scale)`` in ``dtype``, the product in float32: the cast of :func:`fp8_quantize` with its
    (quantisation) ``scale`` already known."""
    return saturating_cast(t.to(torch.float32) * scale, dtype)


def fp8_quantize(t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, amax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor cast: ``(data, dequant_scale)`` with ``t ~= data * dequant_scale``. ``amax``: the
    largest magnitude the scale is for, when ``t`` is part of a larger tensor (a shard); default ``t``'s own."""
    scale = amax_to_scale(t.abs().amax() if amax is None else amax, dtype)
    return fp8_cast(t, scale, dtype), scale.reciprocal()


def fp8_quantize_with_transpose(t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fp8_quantize` of a 2-D ``t`` in both layouts: ``(data, data.T made contiguous, dequant_scale)``.

    Both are cast from ``t`` itself, so torch.compile can write the two layouts from one read of ``t``
    (the GEMMs of a backward read an operand along either dim; casting then transposing the float8 copy
    takes a second pass)."""
    scale = amax_to_scale(t.abs().amax(), dtype)
    data = fp8_cast(t, scale, dtype)
    data_t = fp8_cast(t.t(), scale, dtype).contiguous()
    return data, data_t, scale.reciprocal()


def static_scale(bound: float | torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> float | torch.Tensor:
    """The dequantisation scale of a tensor whose magnitudes never exceed ``bound``: the power of two
    ``s >= bound / fmax`` nearest to it, so ``bound / s`` still fits and ``t / s`` rounds only once.

    ``bound`` is a float or a float64 tensor (a rewritten norm's bound from its rescale constant, which
    reaches the ops as a tensor). The power of two comes from the exponent of ``bound / fmax`` itself
    (``m * 2**e`` with ``0.5 <= m < 1``: ``2**(e - 1)`` if ``m == 0.5``, else ``2**e``), exact where
    ``ceil(log2(...))`` can round, and what the fused kernel computes from the float64 bits.
    """
    ratio = bound / fp8_max(dtype)
    if isinstance(ratio, torch.Tensor):
        mantissa, exponent = torch.frexp(ratio)
        return torch.ldexp(torch.ones_like(ratio), exponent - (mantissa == 0.5).to(exponent.dtype))
    mantissa, exponent = math.frexp(ratio)
    return math.ldexp(1.0, exponent - (mantissa == 0.5))


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (data.to(torch.float32) * scale).to(dtype)
