"""The aten op tables and small FX node helpers that both matching steps read the graph with.

Ops are compared by overload packet (``aten.mul``, not ``aten.mul.Tensor``), and
in-place variants are read as their functional ops, so one table entry covers
every overload a capture may leave in the graph.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# op tables

def _packets(*ops: Any) -> frozenset:
    return frozenset(ops)


_CASTS = _packets(aten.to, aten._to_copy, aten.type_as, torch.ops.prims.convert_element_type)
_PASSTHROUGH = _CASTS | _packets(aten.clone, aten.contiguous, aten.alias)
_SHAPE = _packets(aten.unsqueeze, aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.expand_as,
                  aten.squeeze)
_ROOTS = {aten.sqrt: 0.5, aten.rsqrt: -0.5, aten.reciprocal: -1.0}
_CLAMPS = _packets(aten.clamp_min, aten.clamp, aten.maximum, aten.clamp_max, aten.minimum)
_REDUCE_SQUARES = _packets(aten.mean, aten.sum)
_VECTOR_NORMS = _packets(aten.linalg_vector_norm, aten.norm)
_VARIANCES = _packets(aten.var, aten.var_mean, aten.std)
_LAYER_NORMS = _packets(aten.layer_norm, aten.native_layer_norm)
_RMS_NORMS = _packets(aten.rms_norm, aten._fused_rms_norm)
_ASSERTS = _packets(aten._assert_tensor_metadata)


# in-place variants export may leave in the graph (``v.add_(eps).rsqrt_()``), read as their functional ops
_INPLACE = {getattr(aten, name + "_"): getattr(aten, name)
            for name in ("add", "sub", "mul", "div", "pow", "sqrt", "rsqrt", "reciprocal", "clamp_min", "clamp",
                         "square") if hasattr(aten, name + "_")}


def _packet(node: fx.Node) -> Any:
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", node.target)
    return _INPLACE.get(packet, packet)


def _is_inplace(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _INPLACE


def _is(node: Any, ops: Iterable) -> bool:
    return isinstance(node, fx.Node) and _packet(node) in ops


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor_node(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


def _is_tensor_valued(node: Any) -> bool:
    """A tensor, or a tuple of tensors (a multi-output op such as _fused_rms_norm)."""
    val = _val(node)
    return isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and len(val) > 0
                                             and all(isinstance(v, torch.Tensor) for v in val))


def _real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is(u, _ASSERTS)]


def _scope(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _call(node: fx.Node) -> tuple[str, ...]:
    """The module calls ``node`` was computed in, outermost first, as ``nn_module_stack`` keys.

    Unlike the qualified name (:func:`_scope`), a key names one call: torch.export
    suffixes the keys of a module's later calls (``L__self__norm@1``), so a norm
    module applied at two places gives two calls.
    """
    stack = node.meta.get("nn_module_stack")
    return tuple(stack) if stack else ()


def _encloses(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether the call ``outer`` is the call ``inner`` or one of the calls it was made from."""
    return inner[:len(outer)] == outer


# ---------------------------------------------------------------------------
# graph-value helpers

def _value_chain(node: fx.Node) -> list[fx.Node]:
    """node, then what it is a cast/copy of, and so on."""
    chain = [node]
    while _is(node, _PASSTHROUGH) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.append(node)
    return chain


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes whose values (not only dtype/shape) the node reads."""
    if _packet(node) in (aten.type_as, aten.expand_as) or node.target is aten.to.other:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return node.all_input_nodes


def _equivalent(a: Any, b: Any, depth: int = 4) -> bool:
    """Two nodes computing the same op on equivalent arguments (what CSE would merge), a few levels deep."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equivalent(x, y, depth) for x, y in zip(a, b))
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and type(a) is type(b) and a == b
    if depth == 0 or not (a.op == b.op == "call_function" and a.target == b.target):
        return False
    if "rand" in str(a.target) or "bernoulli" in str(a.target) or "dropout" in str(a.target):
        return False
    return (_equivalent(a.args, b.args, depth - 1) and a.kwargs.keys() == b.kwargs.keys()
            and all(_equivalent(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))


def _short(node: fx.Node) -> str:
    packet = _packet(node)
    return getattr(packet, "__name__", str(packet))


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
