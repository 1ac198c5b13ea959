"""Run part of a captured graph on chosen values.

The structural step reads constants computed from buffers this way (an eps kept
in a 0-d buffer), and the numerical step runs a candidate's subgraph on its test
rows; a subgraph that needs any other activation cannot be run and says so with
:class:`_Unevaluable`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from mxrewrite.passes.match.fx_utils import _ASSERTS, _fetch_attr, _is, _is_tensor_node


class _Unevaluable(Exception):
    """The candidate subgraph needs values other than its input, parameters and constants."""


def _hint(value: Any) -> Any:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise _Unevaluable(f"no example value for {value}")
        return hint
    return value


def _evaluate(gm: fx.GraphModule, target: fx.Node, env: dict[fx.Node, Any], *, hints: bool = False) -> Any:
    """Value of ``target`` given ``env``; get_attr nodes are read from ``gm``; placeholders must be in ``env``.

    With ``hints``, a non-tensor node that cannot be computed (a size of another
    input) takes its example value from the trace.
    """
    stack = [target]
    while stack:
        node = stack[-1]
        if node in env:
            stack.pop()
            continue
        if node.op == "get_attr":
            env[node] = _fetch_attr(gm, node.target)
            stack.pop()
            continue
        if hints and not _is_tensor_node(node) and isinstance(node.meta.get("val"), (int, float, torch.SymInt,
                                                                                     torch.SymFloat)):
            env[node] = _hint(node.meta["val"])
            stack.pop()
            continue
        if node.op != "call_function":
            raise _Unevaluable(f"needs the value of {node.name}")
        missing = [i for i in node.all_input_nodes if i not in env]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        if _is(node, _ASSERTS):
            env[node] = None
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        env[node] = node.target(*args, **kwargs)
    return env[target]
