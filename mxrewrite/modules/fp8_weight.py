"""FP8 all-gather under FSDP2: the weight of a ``format="fp8"`` linear cast before it is gathered.

FSDP2 gathers each sharded weight before the forward (and again before the
backward) in the parameter dtype, two bytes per element in bf16, and the linear
then casts the whole gathered weight to FP8. With ``fsdp_fp8_all_gather=True``
the weight parameter is an :class:`Fp8AllGatherWeight`, whose FSDP2 hooks cast
each rank's shard first and gather one byte per element: half the traffic and
half the unsharded weight's memory (torchao's float8 all-gather, for our recipe).

* ``fsdp_pre_all_gather``: the shard's ``amax``, all-reduced (max) over the
  mesh, gives the scale the whole weight would get (``formats.fp8.fp8_quantize``:
  same power of two), and the shard is cast with it, so the gathered FP8 weight
  is bit for bit the cast of the full weight. The cast is one kernel on CUDA
  (``mxrewrite::fp8_cast``): it runs eagerly, outside the compiled layers.
* ``fsdp_post_all_gather``: wraps the gathered bytes and the scale as an
  :class:`Fp8Weight`, which the linears' autograd functions read as it is
  (:func:`weight_cast`, :func:`weight_cast_transposed`).
* :func:`precompute_fp8_scales` (after ``optimizer.step()``): the scales of every
  such weight from one fused amax and one all-reduce (per FSDP2 mesh) instead of one
  per weight and gather (torchao's ``precompute_float8_dynamic_scale_for_fsdp``);
  each gather then only casts. A precomputed scale is used only while the parameter
  is unchanged since (its version counter), so forgetting the call costs the
  per-weight all-reduces, never a stale scale.

Outside FSDP2 an ``Fp8AllGatherWeight`` is its high-precision tensor: every op
runs on it unwrapped (those FSDP2 uses to shard, pad and copy keep the wrapper),
and the linears cast it themselves. The weight is cast before anything else sees
it, so no norm's gain can be folded into it: under ``format="fp8"`` every rewritten
norm multiplies by its gain before its own cast, as TransformerEngine's
``LayerNormLinear`` does (``CastSettings.gain_in_cast``).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree

from mxrewrite.formats.fp8 import amax_to_scale, fp8_quantize, fp8_quantize_with_transpose
from mxrewrite.ops.fp8_cast import fp8_cast
from mxrewrite.ops.transpose import transpose_bytes

aten = torch.ops.aten
E4M3 = torch.float8_e4m3fn

__all__ = ["Fp8AllGatherWeight", "Fp8Weight", "precompute_fp8_scales", "weight_cast", "weight_cast_transposed"]

# ops FSDP2 and module moves use to shard, pad, copy and load the parameter: their results stay wrapped
_KEEP_WRAPPER = {
    aten.empty_like.default, aten.new_zeros.default, aten.slice.Tensor, aten.copy_.default, aten.view.default,
    aten.as_strided.default, aten._to_copy.default, aten._pin_memory.default, aten.split.Tensor,
    aten.clone.default, aten.detach.default, aten.alias.default,
}


def _wrapper_like(cls, t: torch.Tensor, dtype: torch.dtype):
    return torch.Tensor._make_wrapper_subclass(cls, t.shape, strides=t.stride(), storage_offset=t.storage_offset(),
                                               dtype=dtype, device=t.device, requires_grad=t.requires_grad)


class Fp8AllGatherWeight(torch.Tensor):
    """A linear's weight parameter that FSDP2 all-gathers in FP8 (see the module docstring)."""

    _tensor: torch.Tensor

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return _wrapper_like(cls, tensor, tensor.dtype)

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor
        # (the parameter they were computed for, its version then, the scale, its reciprocal): precompute_fp8_scales
        self._precomputed: tuple[weakref.ref, int, torch.Tensor, torch.Tensor] | None = None
        self._gather_mesh = None  # the mesh FSDP2 last gathered this shard over

    def _clear_non_serializable_cached_data(self):
        # torch calls this before a deepcopy or a pickle copies __dict__: a copy must not use the scale of its
        # original (the weakref would keep checking the original's version), nor pickle a process group
        super()._clear_non_serializable_cached_data()
        self._precomputed = self._gather_mesh = None

    def __repr__(self) -> str:
        return f"Fp8AllGatherWeight({self._tensor!r})"

    def _local_amax(self) -> torch.Tensor:
        shard = self._tensor
        return shard.abs().amax().float() if shard.numel() else torch.zeros((), device=shard.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_WRAPPER:
            return out
        return pytree.tree_map_only(torch.Tensor, cls, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Fp8AllGatherWeight(inner["_tensor"])

    def fsdp_pre_all_gather(self, mesh):
        """This rank's shard cast with the scale of the whole weight: precomputed, or its amax all-reduced over
        ``mesh`` now."""
        self._gather_mesh = mesh
        precomputed = self._precomputed
        if precomputed is not None and _unchanged(*precomputed[:2]):
            scale, dequant_scale = precomputed[2:]
        else:
            amax = self._local_amax()
            _all_reduce_max(amax, mesh)
            scale = amax_to_scale(amax, E4M3)
            dequant_scale = scale.reciprocal()
        return (fp8_cast(self._tensor, scale),), (dequant_scale,)

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None):
        (data,), (scale,) = all_gather_outputs, metadata
        if out is not None:  # the second gather (backward) refills the same storage: only the scale is new
            local = out._local_tensor if hasattr(out, "_local_tensor") else out
            local.scale = scale
            return None
        return Fp8Weight(data, scale, param_dtype), (data,)


def _unchanged(param: weakref.ref, version: int) -> bool:
    """Whether ``param`` is alive and not modified in place since its version was ``version``. (The sharded
    parameter's own counter: FSDP2's DTensor updates its local tensor below the dispatcher level that counts.)"""
    tensor = param()
    return tensor is not None and tensor._version == version


def _all_reduce_max(t: torch.Tensor, mesh) -> None:
    for dim in range(mesh.ndim):  # (max is idempotent: HSDP's replicas agree already)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))


@torch.no_grad()
def precompute_fp8_scales(model: nn.Module) -> int:
    """Compute the FP8 scale of every weight FSDP2 gathers in FP8 (``fsdp_fp8_all_gather``) with one all-reduce
    per mesh; call it after each ``optimizer.step()``. Returns how many weights got one.

    Each scale is the one the gather would compute: its amax all-reduced over the mesh FSDP2 gathers over. For
    a weight sharded by FSDP2 alone (a 1-D mesh) that is the parameter's mesh, known from the start; for one
    on a 2-D mesh (HSDP, FSDP2 + tensor parallelism) it is FSDP2's part of it, known from the weight's first
    gather on (a weight not gathered yet all-reduces its own amax). A weight changed after this call (the
    parameter's version counter moved) ignores its precomputed scale."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in model.parameters():
        if isinstance(p, DTensor) and isinstance(p._local_tensor, Fp8AllGatherWeight):
            mesh = p.device_mesh if p.device_mesh.ndim == 1 else p._local_tensor._gather_mesh
            if mesh is not None:
                by_mesh.setdefault(mesh, []).append(p)
    for mesh, weights in by_mesh.items():
        _precompute(weights, mesh)
    return sum(map(len, by_mesh.values()))


def _precompute(weights: list[torch.Tensor], mesh) -> None:
    locals_ = [w._local_tensor for w in weights]
    # the largest magnitude of each shard in one fused kernel; a rank may hold no rows of a weight (amax 0)
    shards = [local._tensor for local in locals_]
    held = [s for s in shards if s.numel()]
    norms = iter(torch._foreach_norm(held, ord=math.inf) if held else [])
    none = torch.zeros((), device=locals_[0].device)
    amax = torch.stack([next(norms) if s.numel() else none for s in shards]).float()
    _all_reduce_max(amax, mesh)
    scales = amax_to_scale(amax, E4M3)
    for weight, local, scale, dequant_scale in zip(weights, locals_, scales.unbind(), scales.reciprocal().unbind()):
        local._precomputed = (weakref.ref(weight), weight._version, scale, dequant_scale)


class Fp8Weight(torch.Tensor):
    """An FP8 weight as FSDP2 gathered it: ``data`` (e4m3, the weight's shape) times ``scale`` (0-d float32).

    It stands for a parameter of dtype ``dtype``: FSDP2 views it, autograd detaches it, and the linears read
    ``data`` and ``scale``; any other op is an error (it would silently see the wrong numbers)."""

    data8: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, data8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return _wrapper_like(cls, data8, dtype)

    def __init__(self, data8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.data8, self.scale = data8, scale

    def __repr__(self) -> str:
        return f"Fp8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, scale={self.scale})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return Fp8Weight(func(w.data8), w.scale, w.dtype)
        if func in (aten.as_strided.default, aten.view.default):
            w = args[0]
            return Fp8Weight(func(w.data8, *args[1:], **kwargs), w.scale, w.dtype)
        raise NotImplementedError(
            f"{func} on an FP8 weight gathered by FSDP2 (mxrewrite's fsdp_fp8_all_gather): only the "
            f"converted linears read it; optimize without fsdp_fp8_all_gather to use the weight elsewhere")

    def __tensor_flatten__(self):
        return ["data8", "scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Fp8Weight(inner["data8"], inner["scale"], dtype)


def weight_cast(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, dequant_scale)`` of ``weight`` in e4m3: the gathered cast as it is, else ``fp8_quantize``."""
    if isinstance(weight, Fp8Weight):
        return weight.data8, weight.scale
    return fp8_quantize(weight, E4M3)


def weight_cast_transposed(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data of W.T row-major, dequant_scale)``: the operand of ``G @ W``, written in one pass from ``W``, or
    the transpose of the gathered cast (the same bits: same scale)."""
    if isinstance(weight, Fp8Weight):
        return transpose_bytes(weight.data8), weight.scale
    _, data_t, scale = fp8_quantize_with_transpose(weight, E4M3)
    return data_t, scale


torch.serialization.add_safe_globals([Fp8AllGatherWeight])
