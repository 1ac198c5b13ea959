"""An independent float64 reference for whole rewritten models (issue 16).

The reference is the user's model (a deep copy, in float64) in which every site
the rewrite reports as rewritten is replaced by the math of MXNORM.md written
once more here, in plain PyTorch, from the definitions:

* the norm: MXNorm's estimate ``r = c * ((1/K) sum_k m_k**p)**(1/p) + eps`` from
  the block absolute maxima ``m_k`` (eps outside every root), or the exact
  RMSNorm ``sqrt(mean(x**2) + eps)`` / ``sqrt(mean(x**2)) + eps``; ``rho = 1/r``;
* the block scales: E8M0 powers of two, ``rceil`` = ``2**ceil(log2(amax/emax))``,
  ``floor`` = ``2**(floor(log2 amax) - emax_pow2)`` (MXFP8); NVFP4 block scales
  ``e4m3(clamp(amax / 6 / t, 2**-6, 448))`` under a float32 per-tensor scale ``t``;
* the elements: round to nearest even on the e4m3 / e5m2 / e2m1 grid, saturating
  at the format's largest value;
* the linear: ``y = Q(xhat) @ Q(W * diag(gain))^T + b`` for MXNorm (gain folded
  into the weight before its cast) and ``y = Q(xhat * gain) @ Q(W)^T + b`` for the
  exact-RMSNorm baseline (gain applied before the activation cast);
* backward (straight-through, MXNORM.md "Backward"): ``grad_h = G @ W``,
  ``grad_W = G^T @ h`` (``h = xhat * gain``), ``grad_b = sum G``,
  ``dx = rho*g - (1/D) rho**3 x <g, x>`` with ``g = grad_h * gain`` and the rho the
  forward used, ``grad_gain = sum_t xhat * grad_h``. ``grad_cast="mx"`` runs both
  backward GEMMs on MXFP8 operands blocked along their reduction dim (the
  gradient with e5m2 elements, the other operand with e4m3, rows zero-padded to
  whole blocks, the config's E8M0 rounding); ``"hp"`` in high precision.

Element rounding is done on the value's binary exponent (``torch.frexp``), not
with float8 dtype casts, so nothing here runs the code under test. The only
import from mxrewrite is :mod:`mxrewrite.formats.constants` (the format's
numbers). The NVFP4 per-tensor scales follow the library's documented rules
(MXNORM.md: "that bound also lets a per-tensor scale (NVFP4) be fixed
statically"): activation ``t = bound * max|gain| / (6 * 448)`` with
``bound = K**(1/p) / c`` (MXNorm) or ``sqrt(D)`` (RMSNorm), the gain only when it
is applied in the cast, at least 2**-120; weight ``t = amax(W') / (6 * 448)``
(1.0 for an all-zero weight).

Cast inputs are rounded to float32 first (``_cast_input``): the rewrite's cast is
defined on the float32 tensor ``x * rho (* gain)`` (resp. ``W * gain``), and the
product of two float32 numbers rounded to float32 is the same number in every
correct implementation, so this removes a source of rounding-boundary flips
without sharing any code. Everything else is float64.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mxrewrite.formats import constants as C

# (mantissa bits, exponent of the smallest normal, largest finite value, exponent of the largest power of two)
E4M3 = (3, -6, C.F8E4M3_MAX, C.F8E4M3_MAX_POW2)
E5M2 = (2, -14, C.F8E5M2_MAX, C.F8E5M2_MAX_POW2)
E2M1 = (1, 0, C.F4E2M1_MAX, C.F4E2M1_MAX_POW2)
NVFP4_RANGE = C.F8E4M3_MAX * C.F4E2M1_MAX            # 2688
MIN_TENSOR_SCALE = 2.0 ** -120
GAUSSIAN_C = {  # c'(p, B) = E[m**p]**(-1/p), MXNORM.md (table given to 4 digits, library to 6)
    (1, 16): 0.481458, (2, 16): 0.468849, (1, 32): 0.426066, (2, 32): 0.418492,
}


def block_size(fmt: str) -> int:
    return C.MXFP8_BLOCK_SIZE if fmt == "mxfp8" else C.NVFP4_BLOCK_SIZE


# ---------------------------------------------------------------------------
# rounding

class TieCounter:
    """Counts values that land within ``rel`` of a rounding boundary (element midpoint or scale step).

    There the float32 library and this float64 reference may legitimately round
    to different sides; a comparison reports how many such values it saw."""

    def __init__(self, rel: float = 2.0 ** -20):
        self.rel = rel
        self.count = 0

    def near(self, frac_to_boundary: torch.Tensor) -> None:
        self.count += int((frac_to_boundary < self.rel).sum())


def round_to_grid(v: torch.Tensor, fmt: tuple, ties: TieCounter | None = None) -> torch.Tensor:
    """Round float64 ``v`` to the nearest value of a float format (ties to even), saturating at its max."""
    mbits, min_exp, vmax, _ = fmt
    a = v.abs()
    _, e = torch.frexp(a)                       # a = f * 2**e, f in [0.5, 1)
    e = torch.clamp(e - 1, min=min_exp)          # exponent of the binade (subnormals share the lowest)
    step = torch.exp2((e - mbits).double())
    units = a / step
    q = torch.round(units)                      # round half to even (the grid's even codes are even units)
    if ties is not None:
        frac = (units - torch.floor(units) - 0.5).abs() * step / torch.clamp(a, min=1e-300)
        ties.near(frac[(a < vmax) & (a > 0)])
    return torch.sign(v) * torch.clamp(q * step, max=vmax)


def _e8m0(amax: torch.Tensor, fmt: tuple, mode: str, ties: TieCounter | None) -> torch.Tensor:
    """Power-of-two block scale of float64 block maxima ``amax``."""
    _, _, vmax, vmax_pow2 = fmt
    if mode == "rceil":
        d = amax / vmax
        f, e = torch.frexp(d)
        k = torch.where(f == 0.5, e - 1, e)     # exact ceil(log2 d)
    else:
        f, e = torch.frexp(amax)
        k = (e - 1) - vmax_pow2                 # floor(log2 amax) - emax_pow2
    near = torch.minimum((f - 0.5) / 0.5, (1 - f) / f)   # relative distance to the nearest power of two
    if ties is not None:
        ties.near(near[amax > 0])
    k = torch.where(amax > 0, k, torch.full_like(k, -127))
    return torch.exp2(torch.clamp(k, -127, 127).double())


def _cast_input(t: torch.Tensor) -> torch.Tensor:
    return t.float().double()


def mx_fake_quant(t: torch.Tensor, mode: str, elem: tuple = E4M3, block: int = C.MXFP8_BLOCK_SIZE,
                  ties: TieCounter | None = None) -> torch.Tensor:
    """Values of the MX cast of ``t`` (blocks along the last dim), float64."""
    t = _cast_input(t)
    b = t.reshape(*t.shape[:-1], t.shape[-1] // block, block)
    s = _e8m0(b.abs().amax(-1), elem, mode, ties).unsqueeze(-1)
    return (round_to_grid(b / s, elem, ties) * s).reshape(t.shape)


def nvfp4_fake_quant(t: torch.Tensor, tensor_scale: float | torch.Tensor | None = None,
                     ties: TieCounter | None = None) -> torch.Tensor:
    """Values of the NVFP4 cast of ``t`` (blocks of 16 along the last dim), float64."""
    t = _cast_input(t)
    b = t.reshape(*t.shape[:-1], t.shape[-1] // C.NVFP4_BLOCK_SIZE, C.NVFP4_BLOCK_SIZE)
    amax = b.abs().amax(-1)
    if tensor_scale is None:  # from the tensor's amax, rounded to float32 as the scale is stored
        top = float(amax.max())
        tensor_scale = 1.0 if top == 0 else max(top / NVFP4_RANGE, MIN_TENSOR_SCALE)
    ts = torch.as_tensor(tensor_scale, dtype=torch.float64).float().double()
    s = round_to_grid(torch.clamp(_cast_input(amax / C.F4E2M1_MAX / ts), min=C.F8E4M3_MIN_NORMAL,
                                  max=C.F8E4M3_MAX), E4M3, ties)
    scale = (ts * s).unsqueeze(-1)
    return (round_to_grid(torch.clamp(b / scale, -C.F4E2M1_MAX, C.F4E2M1_MAX), E2M1, ties) * scale).reshape(t.shape)


# ---------------------------------------------------------------------------
# one site

@dataclass(frozen=True)
class SiteSpec:
    """What the reference needs to know about one rewritten norm (from the test, not from the rewrite)."""

    fmt: str
    norm: str                 # "mxnorm" | "rmsnorm"
    p: int
    scale_mode: str
    eps: float
    eps_in_root: bool
    correction: float         # c used in r = c * M_p + eps (1.0 for rmsnorm / rescale "none")
    gain_offset: float        # 1.0 for Gemma's (1 + weight)
    grad_cast: str            # "mx" | "hp"


def reference_rho(x: torch.Tensor, s: SiteSpec) -> torch.Tensor:
    """``1 / r`` per row, float64."""
    if s.norm == "mxnorm":
        B = block_size(s.fmt)
        m = x.reshape(*x.shape[:-1], x.shape[-1] // B, B).abs().amax(-1)
        mp = m.mean(-1) if s.p == 1 else m.pow(2).mean(-1).sqrt()
        return 1.0 / (s.correction * mp + s.eps)
    ms = x.pow(2).mean(-1)
    return 1.0 / ((ms + s.eps).sqrt() if s.eps_in_root else ms.sqrt() + s.eps)


def power_mean_ratio(x: torch.Tensor, p: int, block: int) -> torch.Tensor:
    """``RMS(row) / M_p(row)`` for every row of ``x`` (float64): what a calibrated constant averages."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    m = rows.reshape(rows.shape[0], -1, block).abs().amax(-1)
    mp = m.mean(-1) if p == 1 else m.pow(2).mean(-1).sqrt()
    return rows.pow(2).mean(-1).sqrt() / mp


class _StraightThroughNorm(torch.autograd.Function):
    """``h = x * rho * gain``; backward: RMSNorm's gradient evaluated at the forward's ``rho``."""

    @staticmethod
    def forward(ctx, x, gain, rho):
        ctx.save_for_backward(x, gain, rho)
        h = x * rho.unsqueeze(-1)
        return h * gain if gain is not None else h

    @staticmethod
    def backward(ctx, grad_h):
        x, gain, rho = ctx.saved_tensors
        r = rho.unsqueeze(-1)
        g = grad_h * gain if gain is not None else grad_h
        dx = r * g - r ** 3 * x * (g * x).sum(-1, keepdim=True) / x.shape[-1]
        dgain = None
        if gain is not None:
            dgain = (x * r * grad_h).reshape(-1, x.shape[-1]).sum(0)
        return dx, dgain, None


def _pad_rows(t: torch.Tensor, multiple: int = C.MXFP8_BLOCK_SIZE) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((-t.shape[0]) % multiple, t.shape[1])])


def grad_product(a: torch.Tensor, b: torch.Tensor, grad_cast: str, mode: str, ties: TieCounter | None
                 ) -> torch.Tensor:
    """``a @ b`` reducing over ``a``'s columns / ``b``'s rows; ``a`` is the gradient operand.

    ``"mx"``: ``a`` cast to MXFP8-e5m2 along the reduction dim, ``b`` to MXFP8-e4m3 along it."""
    if grad_cast == "hp":
        return a @ b
    aq = mx_fake_quant(_pad_rows(a.t()).t(), mode, E5M2, ties=ties)   # (M, Kpad), blocks along K
    bq = mx_fake_quant(_pad_rows(b).t(), mode, E4M3, ties=ties)       # (N, Kpad), blocks along K
    return aq @ bq.t()


class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, x, rho, gain, spec, ties):
        ctx.save_for_backward(h, weight)
        ctx.spec, ctx.ties, ctx.has_bias = spec, ties, bias is not None
        s = spec
        xhat = x * rho.unsqueeze(-1)
        D = x.shape[-1]
        if s.norm == "mxnorm":      # gain folded into the weight, activation cast without it
            act, w = xhat, (weight * gain if gain is not None else weight)
            act_gain = None
        else:                       # exact RMSNorm baseline: the gain is applied before the cast
            act, w = (xhat * gain if gain is not None else xhat), weight
            act_gain = gain
        if s.fmt == "mxfp8":
            qa = mx_fake_quant(act, s.scale_mode, ties=ties)
            qw = mx_fake_quant(w, s.scale_mode, ties=ties)
        else:
            K = D // C.NVFP4_BLOCK_SIZE
            bound = K ** (1.0 / s.p) / s.correction if s.norm == "mxnorm" else math.sqrt(D)
            ts = bound / NVFP4_RANGE
            if act_gain is not None:
                ts = max(ts * float(act_gain.abs().max()), MIN_TENSOR_SCALE)
            qa = nvfp4_fake_quant(act, ts, ties=ties)
            qw = nvfp4_fake_quant(w, ties=ties)
        y = qa @ qw.t()
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        s = ctx.spec
        G = grad_out.reshape(-1, grad_out.shape[-1])
        hh = h.reshape(-1, h.shape[-1])
        grad_h = grad_product(G, weight, s.grad_cast, s.scale_mode, ctx.ties).reshape(h.shape)
        grad_w = grad_product(G.t(), hh, s.grad_cast, s.scale_mode, ctx.ties)
        grad_b = G.sum(0) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


class RefNorm(nn.Module):
    """The rewritten norm: returns ``h = x * rho * gain`` and keeps ``(h, x, rho, gain)`` for its linears."""

    def __init__(self, original: nn.Module, gain_name: str | None, spec: SiteSpec):
        super().__init__()
        self.original = original   # holds the gain parameter under original.<gain_name>
        self.gain_name, self.spec = gain_name, spec
        self.last = None

    def gain(self) -> torch.Tensor | None:
        if self.gain_name is None:
            return None
        g = getattr(self.original, self.gain_name)
        return g + self.spec.gain_offset if self.spec.gain_offset else g

    def forward(self, x):
        rho = reference_rho(x.detach(), self.spec)
        gain = self.gain()
        h = _StraightThroughNorm.apply(x, gain, rho)
        self.last = (h, x.detach(), rho, gain.detach() if gain is not None else None)
        return h


class RefLinear(nn.Module):
    def __init__(self, original: nn.Linear, norms: list[RefNorm], ties: TieCounter):
        super().__init__()
        self.original, self.norms, self.ties = original, norms, ties

    def forward(self, inp):
        for norm in self.norms:
            rows = _rows_of(inp, norm.last[0]) if norm.last is not None else None
            if rows is not None:
                _, x, rho, gain = norm.last
                D = x.shape[-1]
                x, rho = x.reshape(-1, D)[rows], rho.reshape(-1)[rows]
                return _CastLinear.apply(inp, self.original.weight, self.original.bias, x, rho, gain, norm.spec,
                                         self.ties)
        raise AssertionError("a rewritten linear received something other than (a row view of) its norm's "
                             "output; the reference cannot model this site")


def _rows_of(view: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of ``h`` (contiguous) that the rows of ``view`` are, when ``view`` is a view of
    ``h`` that keeps rows whole (the model slicing tokens before the head, say); None otherwise."""
    if view is h:
        return torch.arange(h.numel() // h.shape[-1]).reshape(h.shape[:-1])
    D = h.shape[-1]
    if (view.untyped_storage().data_ptr() != h.untyped_storage().data_ptr() or not h.is_contiguous()
            or view.shape[-1] != D or view.stride(-1) != 1):
        return None
    offsets = torch.as_strided(torch.arange(h.numel()), view.shape, view.stride(),
                               view.storage_offset() - h.storage_offset())
    if not torch.equal(offsets % D, torch.arange(D).expand_as(offsets)):
        return None
    return offsets[..., 0] // D


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def reference_model(model: nn.Module, sites: dict[str, tuple[tuple[str, ...], SiteSpec]],
                    gain_name: str | None = "weight") -> tuple[nn.Module, dict[str, nn.Parameter], TieCounter]:
    """A float64 deep copy of ``model`` with each ``norm -> (consumers, spec)`` of ``sites`` replaced.

    Returns the model, its parameters under the original model's names, and the counter of values
    near a rounding boundary seen by its casts."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    ties = TieCounter()
    norms: dict[str, RefNorm] = {}
    for name, (_, spec) in sites.items():
        original = ref.get_submodule(name)
        norms[name] = RefNorm(original, gain_name if hasattr(original, gain_name or "") else None, spec)
        _replace(ref, name, norms[name])
    feeders: dict[str, list[RefNorm]] = {}
    for name, (consumers, _) in sites.items():
        for lin in consumers:
            feeders.setdefault(lin, []).append(norms[name])
    for lin, fed_by in feeders.items():
        _replace(ref, lin, RefLinear(ref.get_submodule(lin), fed_by, ties))
    return ref, params, ties
