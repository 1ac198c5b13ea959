"""Stage 1: capture a model into an aten-level FX graph (for analysis) with dynamic batch and sequence dims.

``capture(model, args, kwargs)`` runs ``torch.export.export(strict=False)`` with
every dim of every tensor input marked ``Dim.AUTO``: export keeps dynamic what
the model's code lets it (batch and sequence in a transformer) and fixes the
rest (hidden sizes). It returns ``ep.module()``: an unlifted ``GraphModule``
whose parameters and buffers are the original model's tensor objects under the
same qualified names, so its state_dict loads both ways and an optimizer of
either trains both. The original model is left as it was.

What capture does for the user:

* transformers models return a ``DynamicCache`` by default, which export cannot
  return. Capture turns ``config.use_cache`` off while tracing (and restores it);
  the captured graph returns the same outputs without ``past_key_values``.
* Training mode is traced as it is: a model captured in ``train()`` mode keeps
  its dropout in the graph, one captured in ``eval()`` mode has none. Export
  bakes the mode in, so the captured module's ``train()``/``eval()`` only switch
  its flag; switching a mode-dependent graph (dropout, batch norm) to the other
  mode raises :class:`~mxrewrite.errors.CaptureError` asking for a capture in
  that mode.
* Debug log lines for what limits the captured graph (it is used for analysis
  only, so none of this limits the optimized model): an example dim of size 1 in
  the batch or sequence position (export specialises size-1 dims), a batch or
  sequence dim the model's code fixed, and custom ``autograd.Function`` s, whose
  backward export drops.

The captured module must be called like the model was captured: the same
positional arguments, the same keyword names, the same non-tensor values.
:func:`capture_info` returns what was found (:class:`CaptureInfo`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import types
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from mxrewrite.errors import CaptureError

__all__ = ["CaptureInfo", "capture", "capture_info"]

log = logging.getLogger(__name__)

CAPTURE_META_KEY = "mxrewrite.capture"



@dataclass(frozen=True)
class CaptureInfo:
    """What :func:`capture` did and found, stored in ``gm.meta["mxrewrite.capture"]``."""

    dynamic_dims: Mapping[str, tuple[int, ...]]      # input path (e.g. "args[0]") -> dims left dynamic
    specialized_dims: Mapping[str, tuple[int, ...]]  # input path -> batch/sequence dims export fixed
    training: bool                                   # the mode the graph was traced in (baked in)
    mode_dependent: bool                             # whether the other mode would compute something else
    cache_disabled: bool                             # config.use_cache was turned off while tracing
    custom_autograd_functions: tuple[str, ...]       # autograd.Functions whose backward export dropped


def capture_info(gm: fx.GraphModule) -> CaptureInfo:
    """The :class:`CaptureInfo` of a module returned by :func:`capture`."""
    info = getattr(gm, "meta", {}).get(CAPTURE_META_KEY)
    if info is None:
        raise CaptureError("this GraphModule was not produced by mxrewrite.passes.capture; capture the model first")
    return info


def capture(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Export ``model`` on the example inputs with dynamic batch/sequence dims; see the module docstring."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    kwargs = dict(kwargs or {})
    _warn_size_one_dims(args, kwargs)

    autograd_functions: set[str] = set()
    with _cache_disabled(model, kwargs) as cache_disabled, _recording_autograd_functions(autograd_functions), \
            _quiet_export():
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=_all_dims_auto(model, args, kwargs),
                                     strict=False)
        except Exception as exc:  # export raises many unrelated types; all mean "could not capture"
            raise CaptureError(_explain_export_failure(exc)) from exc

    gm = ep.module()
    _check_shared_state(model, gm)
    dynamic, specialized = _dims_report(gm)
    for path, dims in specialized.items():
        log.debug("the model's code fixes dim(s) %s of input %s to the example's size: the captured graph only "
                    "accepts that size there (run torch.export with TORCH_LOGS=+dynamic to see which line guards it)",
                    dims, path)
    functions = tuple(sorted(autograd_functions))
    if functions:
        log.debug("the model uses custom autograd.Function(s) %s: torch.export keeps their forward but drops their "
                    "custom backward, so gradients through the captured graph are those of the forward ops",
                    ", ".join(functions))
    info = CaptureInfo(
        dynamic_dims=dynamic,
        specialized_dims=specialized,
        training=model.training,
        mode_dependent=_is_mode_dependent(model, gm),
        cache_disabled=cache_disabled,
        custom_autograd_functions=functions,
    )
    gm.meta[CAPTURE_META_KEY] = info
    _install_mode_switch(gm, info)
    return gm


# ---------------------------------------------------------------------------
# inputs and dynamic shapes

def _tensor_leaves(args: tuple, kwargs: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for key_path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            yield _input_path(key_path), leaf


def _input_path(key_path: tuple) -> str:
    """``((0,), [2])``-style pytree paths as ``args[2]`` / ``kwargs['mask']``."""
    head, *rest = key_path
    root = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    return root + "".join(str(k) for k in rest)


def _all_dims_auto(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    shapes = torch.export.ShapesCollection()
    for _, tensor in _tensor_leaves(args, kwargs):
        if tensor.dim() > 0:
            shapes[tensor] = {d: torch.export.Dim.AUTO for d in range(tensor.dim())}
    return shapes.dynamic_shapes(model, args, kwargs)


def _warn_size_one_dims(args: tuple, kwargs: dict[str, Any]) -> None:
    for path, tensor in _tensor_leaves(args, kwargs):
        positions = 2 if not tensor.is_floating_point() else min(2, tensor.dim() - 1)
        for dim, what in ((0, "batch"), (1, "sequence"))[:positions]:
            if tensor.dim() >= 2 and tensor.shape[dim] <= 1:
                log.debug("input %s has size %d in dim %d (%s): torch.export specialises size-0/1 dims, so the "
                            "captured graph will only accept that size; capture with example inputs of %s size >= 2 "
                            "to get a graph that serves any size", path, tensor.shape[dim], dim, what, what)


def _dims_report(gm: fx.GraphModule) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Per user input: the dims that stayed symbolic, and the batch/sequence dims (size >= 2) that did not."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = _placeholder_paths(gm, len(placeholders))
    dynamic: dict[str, tuple[int, ...]] = {}
    specialized: dict[str, tuple[int, ...]] = {}
    for node, path in zip(placeholders, names):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dyn = tuple(d for d, s in enumerate(val.shape) if not is_concrete_int(s))
        if dyn:
            dynamic[path] = dyn
        # batch and sequence positions: (0, 1) of token ids, all but the feature (last) dim of float inputs
        candidates = (0, 1) if not val.is_floating_point() else tuple(range(min(2, val.dim() - 1)))
        if val.dim() >= 2:
            fixed = tuple(d for d in candidates if is_concrete_int(val.shape[d]) and int(val.shape[d]) >= 2)
            if fixed:
                specialized[path] = fixed
    return dynamic, specialized


def _placeholder_paths(gm: fx.GraphModule, count: int) -> list[str]:
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return [f"input{i}" for i in range(count)]
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    leaves, _ = pytree.tree_flatten_with_path(dummy)
    paths = [_input_path(p) for p, _ in leaves]
    return paths if len(paths) == count else [f"input{i}" for i in range(count)]


# ---------------------------------------------------------------------------
# model state while tracing

@contextlib.contextmanager
def _cache_disabled(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[bool]:
    """Turn a transformers config's ``use_cache`` off while tracing, unless the caller chose it in kwargs."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False) or "use_cache" in kwargs:
        yield False
        return
    config.use_cache = False
    try:
        yield True
    finally:
        config.use_cache = True


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Export's own warnings (a size-1 dim specialised) describe the analysis graph, not the optimized model."""
    export_log = logging.getLogger("torch._export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        export_log.setLevel(level)


@contextlib.contextmanager
def _recording_autograd_functions(seen: set[str]) -> Iterator[None]:
    """Record the names of the custom ``autograd.Function`` s applied while tracing."""
    function_cls = torch.autograd.Function
    original = function_cls.__dict__.get("apply")
    if not isinstance(original, classmethod):
        yield
        return

    def apply(cls, *args, **kwargs):
        seen.add(f"{cls.__module__}.{cls.__qualname__}")
        return original.__func__(cls, *args, **kwargs)

    function_cls.apply = classmethod(apply)
    try:
        yield
    finally:
        function_cls.apply = original


def _check_shared_state(model: nn.Module, gm: fx.GraphModule) -> None:
    """The captured module must hold the model's own parameter objects under the same names."""
    for name, param in model.named_parameters():
        try:
            same = gm.get_parameter(name) is param
        except AttributeError:
            same = False
        if not same:
            raise CaptureError(f"the captured graph does not share parameter {name!r} with the model; this is a bug "
                               f"in capture, please report it with the model's definition")


# ---------------------------------------------------------------------------
# train/eval

def _is_mode_dependent(model: nn.Module, gm: fx.GraphModule) -> bool:
    """Whether tracing in the other mode would give another graph: dropout, batch norm, random ops."""
    if any(_node_is_mode_dependent(node) for node in gm.graph.nodes if node.op == "call_function"):
        return True
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.RReLU)):
            return True
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        for attr, value in vars(module).items():
            if "dropout" in attr.lower() and isinstance(value, float) and value > 0:
                return True
    config = getattr(model, "config", None)
    if config is not None:
        for attr, value in vars(config).items():
            if ("dropout" in attr or "pdrop" in attr) and isinstance(value, float) and value > 0:
                return True
    return False


def _node_is_mode_dependent(node: fx.Node) -> bool:
    target = str(node.target)
    if "batch_norm" in target or "rrelu" in target:
        return True
    if "dropout" in target:  # aten.dropout(x, p, train) and friends; p == 0 computes the same in both modes
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 1.0)
        return not (isinstance(p, (int, float)) and p == 0)
    if "scaled_dot_product_attention" in target:
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return False


def _install_mode_switch(gm: fx.GraphModule, info: CaptureInfo) -> None:
    """Replace ``ep.module()``'s train()/eval(), which always raise, by ones that only refuse a real mode change."""

    def train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
        if bool(mode) != info.training and info.mode_dependent:
            captured, wanted = ("train", "eval") if info.training else ("eval", "train")
            raise CaptureError(
                f"this graph was captured in {captured} mode and its computation depends on the mode (dropout or "
                f"batch norm is baked in at capture); to run it in {wanted} mode, call model.{wanted}() on the "
                f"original model and capture it again")
        return nn.Module.train(self, mode)

    def eval(self: fx.GraphModule) -> fx.GraphModule:
        return self.train(False)

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(eval, gm)
    nn.Module.train(gm, info.training)
    register = getattr(gm, "_register_deepcopy_hook", None)   # copies keep the guard (torch >= 2.5)
    if register is not None and _reinstall_mode_switch not in getattr(gm, "_deepcopy_hooks", ()):
        register(_reinstall_mode_switch)


def _reinstall_mode_switch(copy_: fx.GraphModule) -> None:
    _install_mode_switch(copy_, capture_info(copy_))


# ---------------------------------------------------------------------------
# errors

_NOISE = re.compile(r"^(Traceback|For more information|For extended logs|If you suspect|For C\+\+ stack|"
                    r"For more debugging|The error above occurred|consider using data-dependent|\s*$)")


def _explain_export_failure(exc: BaseException) -> str:
    """The export failure in one or two lines, where in the model it happened, and what to try."""
    text = str(exc)
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if not _NOISE.match(ln)), type(exc).__name__)
    if len(first) > 300:
        first = first[:297] + "..."
    where = _user_frame(text)
    message = f"torch.export could not capture the model: {type(exc).__name__}: {first}"
    if where:
        message += f" (at {where})"
    return f"{message}. {_advice(exc, text)}"


def _user_frame(text: str) -> str:
    """The last ``File "...", line N, in f`` frame quoted by export, with its code line."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text)
    if not frames:
        return ""
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


def _advice(exc: BaseException, text: str) -> str:
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        return ("What to try: the model branches on the values of a tensor (data-dependent Python control flow); "
                "rewrite the branch with torch.where or torch.cond, or move it out of forward()")
    if "Cache" in text and "not a known type" in text:
        return ("What to try: the model returns a KV cache object; pass use_cache=False in the example kwargs "
                "(the captured graph is for training and scoring, not incremental decoding)")
    if "Constraints violated" in text or "specialized" in text:
        return ("What to try: the model's code fixes the size of an input dim; pass example inputs of the sizes "
                "you will use, or make the size check symbolic")
    if "not a known type" in text:
        return ("What to try: the model takes or returns a Python object torch.export cannot flatten; register it "
                "with torch.utils._pytree.register_pytree_node or pass/return tensors instead")
    return ("What to try: run torch.export.export(model, args, kwargs, strict=False) yourself to see the full "
            "error; check that the example inputs match the model's forward signature")
