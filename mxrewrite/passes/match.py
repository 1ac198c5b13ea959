"""Stage 2: find the RMSNorm computations of a captured aten graph, however they are written.

RMSNorm over the last dim of ``x`` (``D`` elements per row) is

    y = x * rho * (gamma + offset),   rho = 1 / sqrt(mean(x**2) + eps)      (eps in the root)
                                      rho = 1 / (sqrt(mean(x**2)) + eps)    (eps outside)

with ``offset`` 1 for Gemma's ``(1 + weight)`` and 0 otherwise, casts anywhere.

Matching is two steps. The *structural* step is loose: it starts from every
``aten.rms_norm`` / ``aten._fused_rms_norm`` and from every reduction that can
measure a row's size (mean or sum of ``x*x`` / ``x**2`` / ``x.square()``,
``linalg_vector_norm``), follows the per-row statistic through scalar
arithmetic, roots, casts and reshapes to the op that multiplies or divides the
same ``x`` by it, and extends that result through casts and one gain multiply.
It reads ``eps`` (a literal or a 0-d buffer) and whether it sits inside the root
from the positions of the ops (tracking the statistic's power of ``|x|``).

The *numerical* step confirms every structural candidate: the candidate's
subgraph is run on random rows whose mean square spans several decades,
including rows where ``mean(x**2) ~ eps`` (where eps inside and outside the root
differ by ~40%), with a random gain, and compared with the formula above. A
false positive silently changes a model, so anything that does not agree within
the tolerance of its dtype is rejected, with the reason.

Never matched (rejected with a reason when they look like a norm):
mean-subtracting norms (LayerNorm, ``x - mean`` before the root mean square),
L2 normalisation (``F.normalize``: unit L2 norm, no ``1/sqrt(D)``), reductions
over a dim other than the last, clamped statistics, gains that depend on
another activation. Higher-order-op subgraphs (``torch.cond``, ``no_grad``
regions) are not searched.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import has_free_symbols, is_concrete_int

__all__ = ["NormMatch", "RejectedCandidate", "find_rms_norms"]

aten = torch.ops.aten
log = logging.getLogger(__name__)

# the largest input the numerical check will build when it must use the traced example shape
_MAX_CHECK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class NormMatch:
    """One confirmed RMSNorm computation.

    ``nodes`` are the tensor-valued nodes computing the norm from ``input`` to
    ``output`` (inclusive of ``output``), plus the ``aten._assert_tensor_metadata``
    checks hanging off them; it excludes ``input``, get_attr nodes and nodes
    computed only from parameters/constants (such as ``1 + weight``). Intermediate
    nodes may have users outside the norm (e.g. an ``rsqrt`` reused elsewhere):
    replace the uses of ``output``, then erase the nodes left without users.
    ``input`` is the value before any cast the norm applies; a same-dtype no-op
    cast between it and the norm that other code also reads is skipped, not
    included. ``eps`` from a buffer is that buffer's value (float32-rounded).
    """

    name: str                  # the norm module's qualified name if the norm is exactly its computation, else output.name
    input: fx.Node             # x, the activation being normalised (before any cast the norm applies)
    output: fx.Node            # node whose value is the norm's final output (after gain and final cast)
    nodes: tuple[fx.Node, ...]
    eps: float
    eps_in_root: bool          # sqrt(mean + eps) (True) vs sqrt(mean) + eps (False)
    gamma: fx.Node | None      # the gain tensor: a get_attr of the parameter, or a node computed only from parameters
    gamma_offset: float        # 1.0 for Gemma-style (1 + weight), else 0.0
    hidden_size: int
    spelling: str              # short description of the form found, e.g. "aten.rms_norm", "pow-mean-rsqrt-mul"


@dataclass(frozen=True)
class RejectedCandidate:
    """Something that looked like a norm but is not an RMSNorm over the last dim (or could not be confirmed)."""

    name: str
    node: fx.Node
    reason: str


def find_rms_norms(gm: fx.GraphModule) -> tuple[list[NormMatch], list[RejectedCandidate]]:
    """All RMSNorm computations of ``gm``'s top-level graph, and the norm-like candidates rejected, in graph order."""
    return _Matcher(gm).run()


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


class _Reject(Exception):
    """A structural candidate that is not an RMSNorm; the message is the reason for the report."""


class _Skip(Exception):
    """Not a candidate at all (e.g. a mean of squares used for something else)."""


class _Unevaluable(Exception):
    """The candidate subgraph needs values other than its input, parameters and constants."""


@dataclass
class _Stat:
    """What the structural walk learnt about the per-row statistic on its way to the combining op."""

    power: float               # the statistic as a power of |x| (2 for mean(x^2), -1 for rho)
    eps: list                  # (value, power at which it was added)
    ops: list                  # spelling pieces
    clamped: bool = False


@dataclass
class _Candidate:
    """A structural match, before its output is extended and it is checked numerically."""

    core: fx.Node              # the node computing x * rho (before gain/casts outside it)
    x_side: fx.Node            # the x operand at the core op
    reduced: fx.Node | None    # the operand of the square (decomposed forms)
    eps: float
    eps_in_root: bool
    gamma: fx.Node | None = None
    gamma_offset: float = 0.0
    spelling: str = ""
    clamped: bool = False      # the statistic goes through max(., c): never an RMSNorm, but say why precisely


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


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


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


# ---------------------------------------------------------------------------
# numerical confirmation

class _NumericCheck:
    """Run the candidate on rows of chosen mean square and compare with the RMSNorm formula."""

    GENERIC_SCALES = (1e-2, 1.0, 1e2, 1e4)

    def __init__(self, gm: fx.GraphModule, x: fx.Node, output: fx.Node, nodes: set[fx.Node], cand: _Candidate,
                 hidden: int):
        self.gm, self.x, self.output, self.nodes, self.cand, self.hidden = gm, x, output, nodes, cand, hidden
        self.in_dtype = _val(x).dtype
        dtypes = [self.in_dtype] + [_val(n).dtype for n in nodes if _is_tensor_node(n)]
        floats = [d for d in dtypes if d.is_floating_point] or [torch.float32]
        self.compute_dtype = max(floats, key=lambda d: torch.finfo(d).eps)
        self.rtol = max(1e-5, 4 * torch.finfo(self.compute_dtype).eps)

    def run(self) -> None:
        if not self.in_dtype.is_floating_point:
            raise _Reject(f"normalises a {self.in_dtype} tensor")
        generator = torch.Generator().manual_seed(0)
        for use_hints in (False, True):
            try:
                shape = self._shape(use_hints)
                self._check_all(shape, generator, use_hints)
                return
            except _Unevaluable as exc:
                if use_hints:
                    raise _Reject(f"depends on another activation ({exc})") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if use_hints:
                    raise _Reject(f"numerical check could not run the candidate: {str(exc).splitlines()[0]}") from None

    def _shape(self, use_hints: bool) -> list[int]:
        val = _val(self.x)
        if use_hints:
            shape = [int(_hint(s)) for s in val.shape]
            if math.prod(shape) > _MAX_CHECK_ELEMENTS:
                raise _Reject(f"numerical check needs the traced input shape {shape}, too large to check")
            return shape
        small = [2, 3, 5, 2, 3]
        return [small[i % len(small)] for i in range(val.dim() - 1)] + [self.hidden]

    def _scales(self) -> list[float]:
        eps, in_root = self.cand.eps, self.cand.eps_in_root
        scales = list(self.GENERIC_SCALES)
        if eps > 0:
            around = [eps / 4, eps, 4 * eps] if in_root else [(eps / 4) ** 2, eps ** 2, (4 * eps) ** 2]
            scales = around + scales
        else:
            scales = [1e-8] + scales
        if self.in_dtype == torch.float16:   # keep x and x*x representable
            scales = [s for s in scales if 1e-7 <= s <= 1e2]
        return scales

    def _check_all(self, shape: list[int], generator: torch.Generator, use_hints: bool) -> None:
        gamma_value = self._random_gamma(generator)
        worst = (0.0, None)
        largest = None
        for scale in self._scales():
            x = self._rows(shape, scale, generator)
            ref = self._reference(x, gamma_value)
            env: dict[fx.Node, Any] = {self.x: x.clone()}
            if self.cand.gamma is not None:
                env[self.cand.gamma] = gamma_value.clone()
            with torch.no_grad():
                y = _evaluate(self.gm, self.output, env, hints=use_hints)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise _Reject(f"output shape {getattr(y, 'shape', None)} differs from the input's {tuple(x.shape)}")
            err = self._row_error(y, ref)
            if err > worst[0] or not math.isfinite(err):
                worst = (err, scale)
            largest = (y, ref)
        if worst[0] <= self.rtol and math.isfinite(worst[0]):
            return
        y, ref = largest
        ratio = (y.double() / ref).flatten()
        ratio = ratio[torch.isfinite(ratio)]
        if ratio.numel():
            c = ratio.abs().median().item()
            if math.isclose(c, 1 / math.sqrt(self.hidden), rel_tol=0.05) and self.hidden > 1:
                raise _Reject("L2 normalisation (unit L2 norm per row, as F.normalize), not RMS")
        raise _Reject(f"numerical check failed: relative error {worst[0]:.3g} at mean(x^2) = {worst[1]:.3g} "
                      f"(tolerance {self.rtol:.1g}) against RMSNorm with eps={self.cand.eps:g}"
                      f"{'' if self.cand.eps_in_root else ' outside the root'}")

    def _random_gamma(self, generator: torch.Generator) -> torch.Tensor | None:
        if self.cand.gamma is None:
            return None
        val = _val(self.cand.gamma)
        shape = [int(_hint(s)) for s in val.shape]
        magnitude = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.2, -1.0, 1.0).double()
        return (magnitude * sign - self.cand.gamma_offset).to(val.dtype)

    def _rows(self, shape: list[int], scale: float, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        z = z / z.square().mean(-1, keepdim=True).sqrt()
        spread = torch.exp(torch.empty(shape[:-1] + [1], dtype=torch.float64).uniform_(
            math.log(0.5), math.log(2.0), generator=generator))
        return (z * (scale * spread).sqrt()).to(self.in_dtype)

    def _reference(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        xd = x.double()
        ms = xd.square().mean(-1, keepdim=True)
        eps = self.cand.eps
        r = (ms + eps).sqrt() if self.cand.eps_in_root else ms.sqrt() + eps
        y = xd / r
        if gamma is not None:
            y = y * (gamma.double().reshape(-1) + self.cand.gamma_offset)
        return y

    @staticmethod
    def _row_error(y: torch.Tensor, ref: torch.Tensor) -> float:
        diff = (y.double() - ref).flatten(0, -2) if ref.dim() > 1 else (y.double() - ref)[None]
        base = ref.flatten(0, -2) if ref.dim() > 1 else ref[None]
        num = diff.square().sum(-1).sqrt()
        den = base.square().sum(-1).sqrt().clamp_min(1e-300)
        err = (num / den).max().item()
        return err if math.isfinite(err) else math.inf

