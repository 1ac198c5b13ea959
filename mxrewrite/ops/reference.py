"""The norm-and-cast math in plain PyTorch: the reference every kernel must reproduce bit for bit.

For one row ``x`` of length ``D = K * B`` (MXNORM.md, "pre" mode):

* MXNorm: ``m_k = max_b |x_kb|``, ``r = c * ((1/K) sum_k m_k**p) ** (1/p) + eps``.
* exact RMSNorm: ``r = sqrt(mean(x**2) + eps)`` (or ``sqrt(mean(x**2)) + eps``
  when the model adds eps outside the root).

Both give ``rho = 1 / r`` (float32), the normalised row ``xhat = x * rho``
(times the gain ``gamma`` when it is applied before the cast), and
the cast of ``xhat`` to the target format. Because ``x -> x * rho`` is monotone,
the block maxima of ``xhat`` are ``m_k * rho`` exactly: the MXNorm cast needs no
second reduction, and the result is bit-identical to casting ``xhat``.

Rounding is pinned so kernels can match it: the MXNorm power mean is summed in
float64 (every ``m_k**p`` is exact there and the sum's rounding error is ~1e-16,
so a different summation order changes the float32 result only when it lands
within that distance of a float32 rounding boundary), ``c * M + eps`` is
rounded to float32 once, and
``rho = 1 / r`` is an IEEE float32 division. The exact RMSNorm sums ``x**2`` in
float32 (as ``torch.rms_norm`` does), so a kernel's ``rho`` may differ from this
one in the last bit.

``eps`` and ``c`` are Python floats or 0-d float64 tensors: the ops take them as
tensors (a rewritten norm keeps them in a buffer, so torch.compile does not
specialise on them), and the arithmetic is the same either way.
"""

from __future__ import annotations

import torch

from mxrewrite.errors import ConfigError, LayoutError
from mxrewrite.formats import get_format, mx_quantize, nvfp4_quantize
from mxrewrite.formats.fp8 import saturating_cast, static_scale
from mxrewrite.formats.mx import block_amax
from mxrewrite.formats.nvfp4 import MIN_TENSOR_SCALE, NVFP4_SCALE_RANGE
from mxrewrite.ops.mxnorm_constants import POWERS, mxnorm_output_bound, rmsnorm_output_bound

NORMS = ("mxnorm", "rmsnorm")
Scalar = float | torch.Tensor  # a Python float or a 0-d float64 tensor


def check_transpose_arg(t: torch.Tensor) -> None:
    """``mxrewrite::transpose_bytes`` (and its kernel) take a 2-D tensor of one-byte elements."""
    if t.dim() != 2 or t.element_size() != 1:
        raise LayoutError(f"transpose_bytes takes a 2-D tensor of one-byte elements (FP8 data or raw bytes), got "
                          f"{t.dtype} of shape {tuple(t.shape)}")


def check_norm_args(norm: str, p: int) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {NORMS}")
    if norm == "mxnorm" and p not in POWERS:
        raise ConfigError(f"MXNorm power p={p} is not supported; use p=1 or p=2 (p=2 is the stable default)")


def mxnorm_rho(x: torch.Tensor, *, p: int, block_size: int, correction: Scalar, eps: Scalar) -> torch.Tensor:
    """``1 / (c * M_p + eps)`` per row from the block absolute maxima (float32, shape ``x.shape[:-1]``)."""
    amax = block_amax(x, block_size).double()
    power_mean = (amax if p == 1 else amax * amax).mean(-1)
    if p == 2:
        power_mean = power_mean.sqrt()
    r = (correction * power_mean + eps).float()
    return 1.0 / r


def rmsnorm_rho(x: torch.Tensor, *, eps: Scalar, eps_in_root: bool = True) -> torch.Tensor:
    """``1 / sqrt(mean(x**2) + eps)`` per row (float32); ``1 / (sqrt(mean(x**2)) + eps)`` if not ``eps_in_root``."""
    xf = x.float()
    mean_sq = (xf * xf).mean(-1)
    r = (mean_sq + eps).sqrt() if eps_in_root else mean_sq.sqrt() + eps
    return 1.0 / r


def norm_rho(x: torch.Tensor, *, norm: str, p: int, block_size: int, correction: Scalar, eps: Scalar,
             eps_in_root: bool = True) -> torch.Tensor:
    if norm == "mxnorm":
        return mxnorm_rho(x, p=p, block_size=block_size, correction=correction, eps=eps)
    return rmsnorm_rho(x, eps=eps, eps_in_root=eps_in_root)


def normalize(x: torch.Tensor, rho: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """``x * rho`` per row, times ``gain`` when given, in float32."""
    xhat = x.float() * rho.unsqueeze(-1).float()
    return xhat * gain.float() if gain is not None else xhat


def norm_output_bound(hidden: int, *, fmt: str, norm: str, p: int, correction: Scalar) -> Scalar:
    """The largest ``|x * rho|`` the norm can produce (before the gain): MXNorm ``K**(1/p) / c``, RMSNorm ``sqrt(D)``."""
    if norm == "mxnorm":
        return mxnorm_output_bound(p, hidden // get_format(fmt).block_size, correction)
    return rmsnorm_output_bound(hidden)


def fp8_activation_scale(hidden: int, *, norm: str, p: int, correction: Scalar) -> Scalar:
    """The static per-tensor scale of a normalised activation cast to FP8 (``format="fp8"``).

    The norm bounds ``|x * rho|``, so the scale needs no reduction over the tensor
    (:func:`mxrewrite.formats.fp8.static_scale`: the power of two above ``bound / 448``).
    This is the scale without a gain; a gain applied before the cast sets it by
    :func:`activation_tensor_scale`.
    """
    return static_scale(norm_output_bound(hidden, fmt="fp8", norm=norm, p=p, correction=correction))


def static_scale_base(hidden: int, *, fmt: str, norm: str, p: int, correction: Scalar) -> torch.Tensor | float:
    """The per-tensor scale of a normalised activation before any gain: FP8's static scale
    (:func:`fp8_activation_scale`), NVFP4's ``bound / (6 * 448)`` (rounded to float32 when used), 1.0 for MXFP8."""
    spec = get_format(fmt)
    if not spec.block_scaled:
        return fp8_activation_scale(hidden, norm=norm, p=p, correction=correction)
    if not spec.tensor_scale:
        return 1.0
    return norm_output_bound(hidden, fmt=fmt, norm=norm, p=p, correction=correction) / NVFP4_SCALE_RANGE


def norm_constant(value: Scalar, device: torch.device | str | None = None) -> torch.Tensor:
    """``value`` as the 0-d float64 tensor ``norm_cast`` takes for ``eps`` and ``correction`` (a tensor is
    returned as it is; a float is filled on ``device``: no host-to-device copy)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((), value, dtype=torch.float64, device=device)


def float32_scalar(value: Scalar, device: torch.device | None) -> torch.Tensor:
    """A 0-d float32 tensor on ``device``: a float is filled there (no host-to-device copy: CUDA-graph safe),
    a tensor converted (rounded to nearest)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)


def activation_tensor_scale(
    hidden: int, gamma: torch.Tensor | None, *, fmt: str, norm: str, p: int, correction: Scalar,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The static per-tensor scale of a normalised activation (FP8, NVFP4), from the norm's output bound.

    MXNorm and RMSNorm bound ``|xhat|`` (``K**(1/p) / c`` and ``sqrt(D)``), so the scale is fixed
    without a tensor-wide reduction. A gain applied before the cast multiplies the bound by
    ``max|gain|``: NVFP4 ``bound * max|gain| / (6 * 448)``, FP8 the power of two above
    ``bound * max|gain| / 448`` (:func:`~mxrewrite.formats.fp8.static_scale`); either at least
    ``MIN_TENSOR_SCALE`` (2**-120), NaN if the gain has one. MXFP8 has no per-tensor scale: 1.0.
    """
    spec = get_format(fmt)
    base = float32_scalar(static_scale_base(hidden, fmt=fmt, norm=norm, p=p, correction=correction), device)
    if gamma is None or spec.block_scaled and not spec.tensor_scale:
        return base
    gain_max = gamma.float().abs().amax().to(base.device)
    if spec.block_scaled:  # NVFP4
        scale = base * gain_max
    else:
        bound = norm_output_bound(hidden, fmt=fmt, norm=norm, p=p, correction=correction)
        bound = bound * gain_max.double()
        # a bound of 0, inf or NaN passes through (static_scale would map it to 1): the kernel's bit arithmetic
        scale = torch.where(torch.isfinite(bound) & (bound > 0), static_scale(bound), bound)
    # an all-zero gain would give 0 and the cast 0 * (1 / 0) = NaN
    return torch.clamp(scale, min=MIN_TENSOR_SCALE).float()


def norm_cast_reference(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    *,
    fmt: str,
    norm: str,
    p: int,
    scale_mode: str,
    eps: Scalar,
    correction: Scalar,
    eps_in_root: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise ``x`` over its last dim, multiply by the gain ``gamma`` (None: none), and cast it:
    ``(data, scales, rho, tensor_scale)``.

    ``data`` and ``scales`` are raw bytes (uint8): float8_e4m3fn / E8M0 for MXFP8,
    packed e2m1 / float8_e4m3fn for NVFP4, float8_e4m3fn / nothing (shape ``(..., 0)``)
    for FP8. ``rho`` is float32 of shape ``x.shape[:-1]``; ``tensor_scale`` is a 0-d
    float32 tensor (1.0 for MXFP8, the static scale for FP8).
    """
    spec = get_format(fmt)
    check_norm_args(norm, p)
    rho = norm_rho(x, norm=norm, p=p, block_size=spec.block_size, correction=correction, eps=eps,
                   eps_in_root=eps_in_root)
    xhat = normalize(x, rho, gamma)
    if not spec.block_scaled:
        tscale = activation_tensor_scale(x.shape[-1], gamma, fmt=fmt, norm=norm, p=p, correction=correction,
                                         device=x.device)
        data = saturating_cast(xhat * (1.0 / tscale), spec.elem_dtype)  # (a power of two: exact)
        scales = torch.empty((*x.shape[:-1], 0), dtype=torch.uint8, device=x.device)
    elif spec.tensor_scale:
        tscale = activation_tensor_scale(x.shape[-1], gamma, fmt=fmt, norm=norm, p=p, correction=correction,
                                         device=x.device)
        data, scales, tscale = nvfp4_quantize(xhat, tscale)
    else:
        data, scales = mx_quantize(xhat, elem_dtype=spec.elem_dtype, block_size=spec.block_size,
                                   scale_mode=scale_mode)
        tscale = torch.ones((), dtype=torch.float32, device=x.device)
    return data.view(torch.uint8), scales.view(torch.uint8), rho, tscale


def rms_norm_backward_reference(grad: torch.Tensor, x: torch.Tensor, rho: torch.Tensor,
                                gain: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through norm gradient: ``dx = rho * g - (1/D) * rho**3 * x * <g, x>`` (in ``x.dtype``).

    ``g = grad * gain`` (``grad`` alone without a gain) is the gradient with respect to
    the normalised activation ``x * rho``; this is RMSNorm's exact gradient evaluated
    with the (estimated) ``rho``.
    """
    g = grad.float() if gain is None else grad.float() * gain.float()
    xf = x.float()
    r = rho.float().unsqueeze(-1)
    dot = (g * xf).sum(-1, keepdim=True)
    dx = r * g - (r * r * r) * xf * (dot / x.shape[-1])
    return dx.to(x.dtype)
