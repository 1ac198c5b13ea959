"""The structural step, and the stage's driver: find every candidate RMSNorm of a graph and confirm it.

It starts from every ``aten.rms_norm`` / ``aten._fused_rms_norm`` and from every
reduction that can measure a row's size (mean or sum of ``x*x`` / ``x**2`` /
``x.square()``, ``linalg_vector_norm``), follows the per-row statistic through
scalar arithmetic, roots, casts and reshapes to the op that multiplies or
divides the same ``x`` by it, and extends that result through casts and one gain
multiply. It reads ``eps`` (a literal or a 0-d buffer) and whether it sits
inside the root from the positions of the ops (tracking the statistic's power of
``|x|``). The walk is deliberately loose: every candidate it finds then goes
through :mod:`~mxrewrite.passes.match.confirm` before it counts as a match.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import has_free_symbols, is_concrete_int

from mxrewrite.passes.match.candidates import NormMatch, RejectedCandidate, _Candidate, _Reject, _Skip
from mxrewrite.passes.match.confirm import _NumericCheck
from mxrewrite.passes.match.evaluate import _evaluate, _Unevaluable
from mxrewrite.passes.match.fx_utils import (
    _ASSERTS,
    _CASTS,
    _CLAMPS,
    _LAYER_NORMS,
    _PASSTHROUGH,
    _REDUCE_SQUARES,
    _RMS_NORMS,
    _ROOTS,
    _SHAPE,
    _VARIANCES,
    _VECTOR_NORMS,
    _arg,
    _equivalent,
    _fetch_attr,
    _is,
    _is_inplace,
    _is_tensor_node,
    _is_tensor_valued,
    _packet,
    _real_users,
    _scope,
    _short,
    _val,
    _value_chain,
    _value_inputs,
)

__all__ = ["find_rms_norms"]

aten = torch.ops.aten
log = logging.getLogger(__name__)


def find_rms_norms(gm: fx.GraphModule) -> tuple[list[NormMatch], list[RejectedCandidate]]:
    """All RMSNorm computations of ``gm``'s top-level graph, and the norm-like candidates rejected, in graph order."""
    return _Matcher(gm).run()


@dataclass
class _Stat:
    """What the structural walk learnt about the per-row statistic on its way to the combining op."""

    power: float               # the statistic as a power of |x| (2 for mean(x^2), -1 for rho)
    eps: list                  # (value, power at which it was added, the node holding it)
    ops: list                  # spelling pieces
    clamped: bool = False


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------

class _Matcher:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._param_only: dict[fx.Node, bool] = {}
        self._scope_members: dict[str, list[fx.Node]] | None = None

    # -- driver -------------------------------------------------------------
    def run(self) -> tuple[list[NormMatch], list[RejectedCandidate]]:
        matches: list[NormMatch] = []
        rejected: list[RejectedCandidate] = []
        claimed: set[fx.Node] = set()
        for node in list(self.gm.graph.nodes):
            if node.op != "call_function" or node in claimed:
                continue
            try:
                for candidate in self._candidates(node):
                    match = self._confirm(candidate)
                    if match.output in claimed:
                        continue
                    matches.append(match)
                    claimed.update(match.nodes)
            except _Skip:
                continue
            except _Reject as why:
                rejected.append(RejectedCandidate(self._name_for(node), node, str(why)))
            except Exception as exc:  # a graph this matcher does not understand must not stop the pipeline
                log.debug("matcher failed on %s", node.name, exc_info=True)
                rejected.append(RejectedCandidate(self._name_for(node), node,
                                                  f"could not analyse ({type(exc).__name__}: {exc})"))
        return matches, rejected

    def _candidates(self, node: fx.Node) -> list[_Candidate]:
        packet = _packet(node)
        if packet in _RMS_NORMS:
            return [self._direct_candidate(node)]
        if packet in _LAYER_NORMS:
            raise _Reject("mean-subtracting (LayerNorm)")
        if packet in _REDUCE_SQUARES or packet in _VECTOR_NORMS or packet in _VARIANCES:
            return self._reduction_candidates(node)
        raise _Skip

    # -- aten.rms_norm ----------------------------------------------------------
    def _direct_candidate(self, node: fx.Node) -> _Candidate:
        x = node.args[0]
        shape = _arg(node, 1, "normalized_shape")
        if len(shape) != 1:
            raise _Reject(f"normalises over the last {len(shape)} dims, not only the last dim")
        weight = _arg(node, 2, "weight")
        eps = _arg(node, 3, "eps")
        if eps is None:
            eps = torch.finfo(_opmath_dtype(_val(x).dtype)).eps
        gamma, offset = None, 0.0
        if weight is not None:
            gamma, offset = self._gain(weight, self._hidden_size(x))
        core = node
        spelling = f"aten.{node.target.overloadpacket.__name__}"
        if _packet(node) is aten._fused_rms_norm:
            outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            if len(outs) != 1:
                raise _Skip
            core = outs[0]
        return _Candidate(core, x, None, float(eps), True, gamma, offset, spelling)

    # -- decomposed forms ---------------------------------------------------
    def _reduction_candidates(self, red: fx.Node) -> list[_Candidate]:
        packet = _packet(red)
        operand = red.args[0]
        if not isinstance(operand, fx.Node) or not _is_tensor_node(operand):
            raise _Skip
        ops: list[str] = []
        if packet in _REDUCE_SQUARES:
            reduced = self._squared(operand)
            if reduced is None:
                raise _Skip
            ops += [_short(operand), packet.__name__]
            power = 2.0
        elif packet in _VECTOR_NORMS:
            order = _arg(red, 1, "ord" if packet is aten.linalg_vector_norm else "p", 2)
            if order not in (2, 2.0):
                raise _Skip
            reduced, power = operand, 1.0
            ops.append("vector_norm")
        else:
            reduced, power = operand, 2.0
            ops.append(packet.__name__)
        ndim = _val(reduced).dim()
        dims = self._reduced_dims(red, ndim)

        found = []
        for core, stat_operand, path in self._combining_ops(red):
            x_side = core.args[0] if core.args[1] is stat_operand else core.args[1]
            meet = self._meeting_point(x_side, reduced)
            if meet is None:
                continue
            if _is_inplace(core) and (core.args[0] is not stat_operand or len(_real_users(stat_operand)) > 1):
                raise _Reject(f"normalises in place ({core.target.__name__}), overwriting a value used elsewhere")
            if packet in _VARIANCES:
                raise _Reject("mean-subtracting (variance, LayerNorm)")
            if self._is_mean_subtracted(meet):
                raise _Reject("mean-subtracting (LayerNorm)")
            if dims != (ndim - 1,):
                where = "dim " + str(dims[0]) if len(dims) == 1 else "dims " + str(dims)
                raise _Reject(f"reduces over {where}, not the last dim")
            stat = self._walk_stat(path, power, ops)
            mode = "mul" if _packet(core) is aten.mul else "div"
            wanted = -1.0 if mode == "mul" else 1.0
            if not math.isclose(stat.power, wanted):
                raise _Reject(f"scales rows by |x|^{-stat.power if mode == 'div' else stat.power:g}, not by 1/RMS")
            eps, in_root = self._eps(stat)
            found.append(_Candidate(core, x_side, reduced, eps, in_root,
                                    spelling="-".join(stat.ops + [mode]), clamped=stat.clamped))
        if not found:
            raise _Skip
        return found

    def _squared(self, node: fx.Node) -> fx.Node | None:
        """``u`` if ``node`` is ``u**2``, ``u*u`` or ``u.square()``."""
        packet = _packet(node)
        if packet is aten.pow and len(node.args) > 1 and node.args[1] in (2, 2.0):
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        if packet is aten.square:
            return node.args[0]
        if packet is aten.mul and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and (a is b or _equivalent(a, b)):
                return a
        return None

    def _reduced_dims(self, red: fx.Node, ndim: int) -> tuple[int, ...]:
        if _packet(red) in _VECTOR_NORMS:
            dims = _arg(red, 2, "dim")
        else:
            dims = _arg(red, 1, "dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return tuple(range(ndim))
        if isinstance(dims, int):
            dims = [dims]
        return tuple(sorted(d % ndim for d in dims))

    def _combining_ops(self, red: fx.Node) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
        """(core op, its statistic operand, path red->operand) for each mul/div of a tensor by the statistic."""
        found = []
        frontier = [[red]]
        seen = {red}
        while frontier:
            path = frontier.pop(0)
            node = path[-1]
            for user in _real_users(node):
                if user in seen:
                    continue
                if self._is_stat_op(user, node):
                    seen.add(user)
                    frontier.append(path + [user])
                elif _packet(user) is aten.mul and len(user.args) == 2 and all(
                        isinstance(a, fx.Node) for a in user.args) and _is_tensor_node(user):
                    found.append((user, node, path))
                elif _packet(user) is aten.div and len(user.args) == 2 and user.args[1] is node and isinstance(
                        user.args[0], fx.Node):
                    found.append((user, node, path))
        return found

    def _is_stat_op(self, user: fx.Node, operand: fx.Node) -> bool:
        """Whether ``user`` transforms the per-row statistic ``operand`` (scalar math, roots, casts, reshapes)."""
        packet = _packet(user)
        if _is_inplace(user) and (user.args[0] is not operand or len(_real_users(operand)) > 1):
            return False
        if packet in _CASTS or packet in _SHAPE or packet in _ROOTS:
            return user.args[0] is operand
        if packet in _CLAMPS:
            return user.args[0] is operand and all(self._constant(a) is not None for a in user.args[1:])
        if packet is aten.pow:
            return user.args[0] is operand and isinstance(user.args[1], (int, float))
        if packet in (aten.add, aten.sub, aten.mul, aten.div):
            if len(user.args) != 2:
                return False
            a, b = user.args
            if a is operand:
                return self._constant(b) is not None
            if b is operand and packet in (aten.add, aten.mul, aten.div):
                return self._constant(a) is not None
        return False

    def _walk_stat(self, path: list[fx.Node], power: float, ops: list[str]) -> _Stat:
        stat = _Stat(power=power, eps=[], ops=list(ops))
        for prev, node in zip(path, path[1:]):
            packet = _packet(node)
            if packet in _ROOTS:
                stat.power *= _ROOTS[packet]
                stat.ops.append(packet.__name__)
            elif packet is aten.pow:
                stat.power *= float(node.args[1])
                stat.ops.append(f"pow({node.args[1]:g})")
            elif packet in _CLAMPS:
                stat.clamped = True
            elif packet in (aten.add, aten.sub):
                other = node.args[1] if node.args[0] is prev else node.args[0]
                value = self._constant(other) * _arg(node, 2, "alpha", 1)
                if packet is aten.sub:
                    value = -value
                stat.eps.append((value, stat.power, other))
            elif packet is aten.div and node.args[0] is not prev:   # c / stat
                stat.power = -stat.power
                stat.ops.append("reciprocal")
        return stat

    def _eps(self, stat: _Stat) -> tuple[float, bool]:
        if not stat.eps:
            return 0.0, True
        if len(stat.eps) > 1:
            raise _Reject(f"adds {len(stat.eps)} constants to the statistic; expected one eps")
        value, power, node = stat.eps[0]
        if isinstance(node, fx.Node) and self._has_trainable_parameter(node):
            raise _Reject("eps is a trainable parameter")
        if value < 0:
            raise _Reject(f"subtracts {-value:g} from the statistic")
        if math.isclose(power, 2.0):
            return float(value), True
        if math.isclose(power, 1.0):
            return float(value), False
        raise _Reject(f"adds eps to |x|^{power:g}, neither inside nor outside the root")

    def _meeting_point(self, x_side: fx.Node, reduced: fx.Node) -> fx.Node | None:
        """The node both operands are casts of (same value up to dtype), or None."""
        chain_a, chain_b = _value_chain(x_side), _value_chain(reduced)
        members = set(chain_b)
        for node in chain_a:
            if node in members:
                return node
        for a in chain_a:
            for b in chain_b:
                if _equivalent(a, b):
                    if self._is_mean_subtracted(a):
                        raise _Reject("mean-subtracting (LayerNorm)")
                    raise _Reject("normalises one tensor by the statistic of a recomputed copy")
        for node in chain_a:
            if self._is_mean_subtracted(node) and self._meeting_point(node.args[0], reduced) is not None:
                raise _Reject("mean-subtracting (LayerNorm)")
        return None

    def _is_mean_subtracted(self, node: fx.Node) -> bool:
        """``a - mean(a, -1)`` (up to casts)."""
        for n in _value_chain(node):
            if _packet(n) is aten.sub and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
                a, m = n.args
                m = _value_chain(m)[-1]
                if _packet(m) is aten.mean and isinstance(m.args[0], fx.Node):
                    if set(_value_chain(m.args[0])) & set(_value_chain(a)):
                        return True
        return False

    # -- gain ---------------------------------------------------------------
    def _gain(self, node: Any, hidden: int) -> tuple[fx.Node, float]:
        """(gamma node, offset) of a gain operand computed only from parameters; rejects activation-dependent gains."""
        if not isinstance(node, fx.Node) or not _is_tensor_node(node):
            raise _Reject("gain is not a tensor")
        if not self._is_param_only(node):
            raise _Reject("gain depends on another activation")
        gain = self._parse_gain(node, hidden)
        if gain is None:
            raise _Reject(f"gain of shape {tuple(_val(node).shape)} does not match the normalised dim {hidden}")
        return gain

    def _parse_gain(self, node: fx.Node, hidden: int) -> tuple[fx.Node, float] | None:
        val = _val(node)
        if val is None or val.numel() != hidden or val.shape[-1] != hidden:
            return None
        offset = 0.0
        while True:
            if _is(node, _PASSTHROUGH):
                node = node.args[0]
            elif _packet(node) is aten.add and len(node.args) == 2 and _arg(node, 2, "alpha", 1) == 1:
                a, b = node.args
                if isinstance(b, (int, float)) and isinstance(a, fx.Node):
                    offset, node = offset + float(b), a
                elif isinstance(a, (int, float)) and isinstance(b, fx.Node):
                    offset, node = offset + float(a), b
                else:
                    break
            else:
                break
        inner = _val(node)
        if inner is None or inner.numel() != hidden:
            return None
        return node, offset

    # -- output extension -----------------------------------------------------
    def _extend(self, cand: _Candidate, hidden: int) -> fx.Node:
        """Follow the core op through casts and (if none yet) one gain multiply; returns the output node."""
        node = cand.core
        core_scope = _scope(cand.core)
        while True:
            users = _real_users(node)
            if len(users) != 1:
                return node
            user = users[0]
            if _is_inplace(user) and user.args[0] is not node:
                return node
            if _is(user, _CASTS) and user.args[0] is node:
                node = user
                continue
            if _packet(user) is aten.mul and len(user.args) == 2:
                other = user.args[1] if user.args[0] is node else user.args[0]
                if not isinstance(other, fx.Node) or not _is_tensor_node(other) or _val(other).numel() <= 1:
                    return node
                if self._is_param_only(other):
                    if cand.gamma is not None:
                        return node
                    parsed = self._parse_gain(other, hidden)
                    if parsed is None:
                        return node
                    cand.gamma, cand.gamma_offset = parsed
                    node = user
                    continue
                if core_scope is not None and _scope(user) == core_scope and _val(other).shape[-1] in (hidden, 1):
                    raise _Reject("gain depends on another activation")
            return node

    # -- confirmation --------------------------------------------------------
    def _confirm(self, cand: _Candidate) -> NormMatch:
        x = cand.x_side if cand.reduced is None else self._meeting_point(cand.x_side, cand.reduced)
        hidden = self._hidden_size(x)
        output = self._extend(cand, hidden)
        nodes = self._between(x, output, cand.gamma)
        # widen the input back through casts only the norm uses, and through no-op casts (a same-dtype
        # .to() returns its input, so export may route other users, e.g. the residual, through it)
        skipped: list[fx.Node] = []
        while _is(x, _PASSTHROUGH) and isinstance(x.args[0], fx.Node) and _is_tensor_node(x.args[0]):
            if all(u in nodes for u in _real_users(x)):
                nodes.add(x)
                nodes.update(u for u in x.users if _is(u, _ASSERTS))
            elif _val(x).dtype == _val(x.args[0]).dtype and _val(x).device == _val(x.args[0]).device:
                skipped.append(x)
            else:
                break
            x = x.args[0]
        if not _is_tensor_node(x):
            raise _Reject("the normalised value is not a tensor")
        check = _NumericCheck(self.gm, x, output, nodes, cand, hidden)
        check.run()
        if cand.clamped:
            raise _Reject("clamps the statistic (max(norm, eps)) instead of adding eps")
        ordered = tuple(sorted(nodes, key=self.order.__getitem__))
        match = NormMatch(
            name=self._module_name(ordered, skipped) or output.name,
            input=x, output=output, nodes=ordered, eps=cand.eps, eps_in_root=cand.eps_in_root,
            gamma=cand.gamma, gamma_offset=cand.gamma_offset, hidden_size=hidden, spelling=cand.spelling,
        )
        return match

    def _between(self, x: fx.Node, output: fx.Node, gamma: fx.Node | None) -> set[fx.Node]:
        """Tensor nodes on paths from x to output, excluding x and parameter/constant-only nodes."""
        nodes: set[fx.Node] = set()
        stack = [output]
        while stack:
            node = stack.pop()
            if node is x or node in nodes or node.op != "call_function" or node is gamma:
                continue
            if self._is_param_only(node) or not _is_tensor_valued(node):
                continue
            nodes.add(node)
            stack.extend(_value_inputs(node))
        reaches = {x}
        for node in sorted(nodes, key=self.order.__getitem__):
            if any(i in reaches for i in node.all_input_nodes):
                reaches.add(node)
            else:
                raise _Reject(f"depends on another activation ({node.name})")
        for node in list(nodes):
            nodes.update(u for u in node.users if _is(u, _ASSERTS))
            if not _is_tensor_node(node):   # multi-output op: its unused outputs go with it
                nodes.update(u for u in node.users if u.target is operator.getitem and not u.users)
        return nodes

    # -- helpers --------------------------------------------------------------
    def _hidden_size(self, x: fx.Node) -> int:
        val = _val(x)
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            raise _Reject("the normalised value is not a tensor with a last dim")
        last = val.shape[-1]
        if not is_concrete_int(last):
            raise _Reject("the normalised (last) dim has no static size")
        return int(last)

    def _is_param_only(self, node: fx.Node) -> bool:
        """Computed only from get_attr nodes and literals (no input, no random op)."""
        cached = self._param_only.get(node)
        if cached is not None:
            return cached
        if node.op == "get_attr":
            result = True
        elif node.op != "call_function" or "rand" in str(node.target) or "bernoulli" in str(node.target):
            result = False
        else:
            result = all(self._is_param_only(i) for i in node.all_input_nodes)
        self._param_only[node] = result
        return result

    def _constant(self, arg: Any) -> float | None:
        """The value of a scalar literal or of a one-element tensor computed only from parameters/buffers."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            return float(arg)
        if isinstance(arg, fx.Node) and isinstance(_val(arg), (torch.SymInt, torch.SymFloat)):
            value = _val(arg)   # a size the trace fixed, e.g. x.shape[-1] once the hidden size is static
            return None if has_free_symbols(value) else float(value)
        if isinstance(arg, fx.Node) and _is_tensor_node(arg) and _val(arg).numel() == 1 and self._is_param_only(arg):
            try:
                with torch.no_grad():
                    return float(_evaluate(self.gm, arg, {}).detach())
            except _Unevaluable:
                return None
        return None

    def _has_trainable_parameter(self, node: fx.Node) -> bool:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                value = _fetch_attr(self.gm, n.target)
                if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                    return True
            stack.extend(n.all_input_nodes)
        return False

    def _module_name(self, nodes: tuple[fx.Node, ...], skipped: list[fx.Node]) -> str | None:
        """The module path if the norm is exactly one module's computation (no-op casts of its input aside)."""
        computing = [n for n in nodes if not _is(n, _ASSERTS)]
        scopes = {_scope(n) for n in computing}
        if len(scopes) != 1:
            return None
        path = scopes.pop()
        if not path:
            return None
        members = self._members_of(path)
        inside = set(nodes) | set(skipped)
        for n in members:
            if n in inside or _is(n, _ASSERTS) or self._is_param_only(n) or not _is_tensor_node(n):
                continue
            return None
        return path

    def _members_of(self, path: str) -> list[fx.Node]:
        if self._scope_members is None:
            self._scope_members = {}
            for n in self.gm.graph.nodes:
                if n.op == "call_function":
                    self._scope_members.setdefault(_scope(n) or "", []).append(n)
        return self._scope_members.get(path, [])

    def _name_for(self, node: fx.Node) -> str:
        path = _scope(node)
        return path if path else node.name
