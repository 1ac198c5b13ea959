"""``NormCastTensor``: how one fused norm + cast travels from a rewritten norm to the linears it feeds.

Design note. A rewritten norm (:class:`~mxrewrite.modules.MXRMSNorm`) runs
``mxrewrite::norm_cast`` once and returns this tensor subclass. Its *value* is
the norm's output ``h = alpha * x * rho * gain`` (``rho`` the MXNorm estimate or
the exact RMSNorm factor); it carries, as inner tensors, what produced it: the
input ``x``, ``rho``, the block-scaled cast (``elems``, ``scales``, per-tensor
``tensor_scale``), the gain as applied (Gemma's ``1 + weight``) and the norm's
``eps``; under ``format="fp8"`` with gradients on, also the cast transposed
(``elems_t``: the layout the weight-gradient GEMMs read), made once for all the
linears the norm feeds (q, k and v each transposed it in their backward). The
model's own code then passes it on as it was written:

* an :class:`~mxrewrite.modules.MXLinear` (any number of them: q, k and v share
  one cast) multiplies the cast directly, with MXNorm's gain folded into its weight
  in the MX formats (the exact RMSNorm, and every norm under FP8, applies its gain
  in the cast);
* views that keep rows whole (``view``/``reshape``/``unsqueeze``/``squeeze``, and
  transposes, permutes, slices or selects that leave the last dim in place),
  ``detach``/``clone``, multiplication by a Python number (kept as ``alpha``) and
  a cast to a narrower float dtype keep the cast and return another
  ``NormCastTensor``;
* every other use (a residual add, a router, an upcast to float32, a
  ``torch.mm`` with a bare weight) gets a plain tensor holding the **exact**
  RMSNorm output, recomputed from ``x``: a consumer that is not an MX linear
  keeps the exact norm.

Autograd sees ``h`` as one value: the gradient of every consumer is summed into
``h``'s gradient, and the function that built ``h`` (:func:`norm_cast_tensor`)
applies the straight-through norm gradient once per call (MXNORM.md,
"Backward"), with the ``rho`` the forward used. For consumers that got the exact
value under ``norm="mxnorm"`` that gradient uses the estimate's ``rho``.

It is a traceable wrapper subclass (``__tensor_flatten__``/``__tensor_unflatten__``),
like torchao's float8 training tensors, so ``torch.compile(fullgraph=True)``
traces it away; FSDP2 and tensor parallelism see only the plain parameters.

Floats stay out of everything torch.compile reads from a module or from this
tensor's metadata: it guards on each (every layer of a per-layer compile with
calibrated constants compiled again) and under ``dynamic=True`` turns them into
symbolic floats it cannot carry in a tensor subclass. A site's ``eps``, rescale
constant and gain offset (:class:`NormConstants`) reach the ops as tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_map_only

from mxrewrite.ops.reference import normalize, rmsnorm_rho
from mxrewrite.ops.transpose import transpose_bytes

aten = torch.ops.aten

__all__ = ["CastSettings", "NormCastTensor", "NormConstants", "norm_cast_tensor"]


class CastSettings(NamedTuple):
    """How one rewritten norm casts: its static choices (a NamedTuple: hashable, and traced by torch.compile;
    no floats: see the module docstring)."""

    fmt: str
    norm: str               # "mxnorm" | "rmsnorm"
    p: int
    scale_mode: str
    eps_in_root: bool
    gain_in_cast: bool      # gain applied before the cast (exact RMSNorm; FP8), else folded into W (MX MXNorm)
    grad_cast: str          # "mx" | "e4m3" | "hp": precision of the linears' backward GEMMs


class NormConstants(NamedTuple):
    """The floats of one rewritten norm; :meth:`tensor` is how the forward reads them."""

    eps: float
    correction: float       # MXNorm's rescale constant: c'(p, B), a calibrated constant, or 1.0
    gain_offset: float      # 1.0 for Gemma's (1 + weight)

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[eps, correction, gain_offset]`` in float64 (exact copies of the floats)."""
        return torch.tensor(tuple(self), dtype=torch.float64, device=device)


EPS, CORRECTION, GAIN_OFFSET = range(3)  # positions in NormConstants.tensor()
_INNER = ("x", "rho", "elems", "scales", "tensor_scale", "gain", "eps", "elems_t")


class NormCastTensor(torch.Tensor):
    """The output of a rewritten norm; see the module docstring."""

    x: torch.Tensor
    rho: torch.Tensor
    elems: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor
    gain: torch.Tensor | None   # as the norm applies it (Gemma: 1 + weight)
    eps: torch.Tensor           # 0-d float64
    elems_t: torch.Tensor | None  # FP8 training: elems of the rows flattened, transposed, contiguous
    settings: CastSettings
    alpha: float

    @staticmethod
    def __new__(cls, x, rho, elems, scales, tensor_scale, gain, eps, elems_t, settings, alpha, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, x.shape, dtype=dtype, device=x.device,
                                                   requires_grad=False)

    def __init__(self, x, rho, elems, scales, tensor_scale, gain, eps, elems_t, settings, alpha, dtype):
        self.x, self.rho, self.elems, self.scales, self.tensor_scale, self.gain, self.eps, self.elems_t = (
            x, rho, elems, scales, tensor_scale, gain, eps, elems_t)
        self.settings, self.alpha = settings, alpha

    def __repr__(self) -> str:
        return (f"NormCastTensor(shape={tuple(self.shape)}, dtype={self.dtype}, format={self.settings.fmt}, "
                f"norm={self.settings.norm}, alpha={self.alpha})")

    def __tensor_flatten__(self):
        names = [n for n in _INNER if getattr(self, n) is not None]
        return names, (self.settings, self.alpha, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        settings, alpha, dtype = meta
        return NormCastTensor(inner["x"], inner["rho"], inner["elems"], inner["scales"], inner["tensor_scale"],
                              inner.get("gain"), inner["eps"], inner.get("elems_t"), settings, alpha, dtype)

    def replace(self, **changes: Any) -> "NormCastTensor":
        fields = {n: getattr(self, n) for n in _INNER}
        fields.update(settings=self.settings, alpha=self.alpha, dtype=self.dtype)
        fields.update(changes)
        return NormCastTensor(**fields)

    def rows_view(self, fn, keeps_order: bool) -> "NormCastTensor":
        """Apply a row-preserving view ``fn`` (on ``x``'s shape) to every per-row inner tensor. ``elems_t``
        (the rows in their flattened order) stays only if ``keeps_order`` (reshapes, not slices or
        permutations of the leading dims)."""
        return self.replace(x=fn(self.x), rho=fn(self.rho.unsqueeze(-1)).squeeze(-1), elems=fn(self.elems),
                            scales=fn(self.scales), elems_t=self.elems_t if keeps_order else None)

    def exact(self) -> torch.Tensor:
        """The exact RMSNorm output this tensor stands for, as a plain tensor (what non-MX consumers read)."""
        s = self.settings
        rho = self.rho if s.norm == "rmsnorm" else rmsnorm_rho(self.x, eps=self.eps, eps_in_root=s.eps_in_root)
        h = normalize(self.x, rho, self.gain)
        if self.alpha != 1.0:
            h = h * self.alpha
        return h.to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _LAZY_OPS.get(func)
        if handler is not None and isinstance(args[0], NormCastTensor):
            result = handler(args[0], *args[1:], **kwargs)
            if result is not None:
                return result
        args, kwargs = tree_map_only(NormCastTensor, NormCastTensor.exact, (args, kwargs))
        return func(*args, **kwargs)

    __torch_function__ = torch._C._disabled_torch_function_impl


# ---------------------------------------------------------------------------
# ops that keep the cast; each returns None to fall back to the exact value

def _last_dim(ndim: int, dim: int) -> bool:
    return dim % ndim == ndim - 1 if ndim else True


def _view(t: NormCastTensor, size, *_) -> NormCastTensor | None:
    size = list(size)
    if -1 in size:
        known = 1
        for s in size:
            known *= s if s != -1 else 1
        size[size.index(-1)] = t.numel() // known if known else 0
    if not size or size[-1] != t.shape[-1]:
        return None
    return t.rows_view(lambda v: v.reshape(*size[:-1], v.shape[-1]), keeps_order=True)


def _unsqueeze(t: NormCastTensor, dim: int) -> NormCastTensor | None:
    if _last_dim(t.dim() + 1, dim):
        return None
    dim = dim % (t.dim() + 1)
    return t.rows_view(lambda v: v.unsqueeze(dim), keeps_order=True)


def _squeeze(t: NormCastTensor, dims=None) -> NormCastTensor | None:
    dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else [
        d for d in range(t.dim()) if t.shape[d] == 1]
    dims = sorted({d % t.dim() for d in dims if t.shape[d] == 1}, reverse=True)
    if any(_last_dim(t.dim(), d) for d in dims):
        return None

    def squeeze(v: torch.Tensor) -> torch.Tensor:
        for d in dims:
            v = v.squeeze(d)
        return v

    return t.rows_view(squeeze, keeps_order=True)


def _slice(t: NormCastTensor, dim: int = 0, start=None, end=None, step: int = 1) -> NormCastTensor | None:
    if _last_dim(t.dim(), dim):
        return None
    return t.rows_view(lambda v: aten.slice.Tensor(v, dim % t.dim(), start, end, step), keeps_order=False)


def _select(t: NormCastTensor, dim: int, index: int) -> NormCastTensor | None:
    if _last_dim(t.dim(), dim):
        return None
    return t.rows_view(lambda v: v.select(dim % t.dim(), index), keeps_order=False)


def _transpose(t: NormCastTensor, dim0: int, dim1: int) -> NormCastTensor | None:
    if _last_dim(t.dim(), dim0) or _last_dim(t.dim(), dim1):
        return None
    return t.rows_view(lambda v: v.transpose(dim0 % t.dim(), dim1 % t.dim()), keeps_order=False)


def _permute(t: NormCastTensor, dims) -> NormCastTensor | None:
    dims = [d % t.dim() for d in dims]
    if dims[-1] != t.dim() - 1:
        return None
    return t.rows_view(lambda v: v.permute(*dims), keeps_order=False)


def _same(op):
    def apply(t: NormCastTensor, *args, **kwargs) -> NormCastTensor:
        changed = {n: op(getattr(t, n)) for n in ("x", "rho", "elems", "scales")}
        return t.replace(**changed, elems_t=op(t.elems_t) if t.elems_t is not None else None)
    return apply


def _mul(t: NormCastTensor, other, *_, **__) -> NormCastTensor | None:
    if isinstance(other, bool) or not isinstance(other, (int, float)):
        return None
    return t.replace(alpha=t.alpha * float(other))


def _div(t: NormCastTensor, other, *_, **kwargs) -> NormCastTensor | None:
    if kwargs or isinstance(other, bool) or not isinstance(other, (int, float)) or other == 0:
        return None
    return t.replace(alpha=t.alpha / float(other))


_NARROWER = {torch.float32: (torch.bfloat16, torch.float16), torch.bfloat16: (), torch.float16: ()}


def _to_copy(t: NormCastTensor, *, dtype=None, device=None, layout=None, **kwargs) -> NormCastTensor | None:
    """A cast to a narrower float dtype keeps the cast (the linears then emit that dtype); an upcast to
    float32 is a request for high precision and gets the exact value."""
    if any(v is not None for v in kwargs.values()) or layout not in (None, torch.strided):
        return None
    if device is not None and torch.device(device) != t.device:
        return None
    if dtype is None or dtype == t.dtype:
        return t.replace()
    return t.replace(dtype=dtype) if dtype in _NARROWER.get(t.dtype, ()) else None


_LAZY_OPS = {
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.detach.default: _same(torch.Tensor.detach),
    aten.alias.default: _same(lambda v: v.view(v.shape)),
    aten.clone.default: _same(torch.Tensor.clone),
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten._to_copy.default: _to_copy,
}


# ---------------------------------------------------------------------------
# the autograd function that builds the tensor

class _NormCast(torch.autograd.Function):
    """``x, gain -> NormCastTensor``; backward: the straight-through norm gradient of ``h = x * rho * gain``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor | None, eps: torch.Tensor, correction: torch.Tensor,
                settings: CastSettings, transposed: bool) -> NormCastTensor:
        s = settings
        elems, scales, rho, tensor_scale = torch.ops.mxrewrite.norm_cast(
            x, gain if s.gain_in_cast else None, eps, correction, s.fmt, s.norm, s.p, s.scale_mode, s.eps_in_root)
        ctx.save_for_backward(x, rho, gain)
        elems_t = transpose_bytes(elems.reshape(-1, x.shape[-1])) if transposed else None
        return NormCastTensor(x, rho, elems, scales, tensor_scale, gain, eps, elems_t, settings, 1.0, x.dtype)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, rho, gain = ctx.saved_tensors
        grad_h = grad_h.reshape(x.shape)
        grad_x = grad_gain = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mxrewrite.rms_norm_backward(grad_h.contiguous(), x, rho,
                                                           gain.float() if gain is not None else None)
        if gain is not None and ctx.needs_input_grad[1]:
            grad_gain = (normalize(x, rho) * grad_h.float()).reshape(-1, x.shape[-1]).sum(0).to(gain.dtype)
        return grad_x, grad_gain, None, None, None, None


def norm_cast_tensor(x: torch.Tensor, gain: torch.Tensor | None, constants: torch.Tensor,
                     settings: CastSettings) -> NormCastTensor:
    """Normalise ``x``, multiply by ``gain`` (as the norm applies it) and cast it once
    (``mxrewrite::norm_cast``), returning the :class:`NormCastTensor`. ``constants`` is
    :meth:`NormConstants.tensor` (the gain offset is not read here: it is in ``gain`` already)."""
    transposed = settings.fmt == "fp8" and settings.grad_cast != "hp" and torch.is_grad_enabled()
    return _NormCast.apply(x, gain, constants[EPS], constants[CORRECTION], settings, transposed)
