"""The structural step, and the stage's driver: find every candidate RMSNorm of a graph and confirm it.

It starts from every ``aten.rms_norm`` / ``aten._fused_rms_norm`` and from every
reduction that can measure a row's size (mean or sum of ``x*x`` / ``x**2`` /
``x.square()``, ``linalg_vector_norm``), follows the per-row statistic through
scalar arithmetic, roots, casts and reshapes to the op that multiplies or
divides the same ``x`` (or ``x`` times a gain) by it, and extends that result
through casts and one gain multiply. It reads ``eps`` (a literal or a 0-d
buffer) and whether it sits inside the root from the positions of the ops
(tracking the statistic as ``scale * base ** exponent``, see :class:`_Stat`).
The walk is deliberately loose: every candidate it finds then goes through
:mod:`~mxrewrite.passes.match.confirm` before it counts as a match.

Where a norm starts and ends, and which module it is, are decided together
(:meth:`_Matcher._choose_extent`): the casts and gain around the core are taken
as far as the largest module call whose computation is exactly the norm, so a
cast the caller applies to a norm module's output stays the caller's.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field, replace
from itertools import takewhile
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
    _call,
    _encloses,
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
    """The per-row statistic on its way to the combining op, as ``scale * base ** exponent``.

    ``base`` is ``mean(x**2) + eps_in``, and once a constant is added to its square
    root, ``sqrt(mean(x**2) + eps_in) + eps_out``. ``scale`` collects the constant
    factors (``D`` for a sum, ``sqrt(D)`` for a vector norm, a ``1/D`` or
    ``1/sqrt(D)`` folded in anywhere), so an eps is read in the units of the mean
    wherever it is added. The structural step does not ask for ``scale == 1`` at
    the end: a wrong constant (``0.5 * mean``, a sum not divided by ``D``) is left
    to the numerical step, which rejects it.
    """

    scale: float
    exponent: float
    ops: list                  # spelling pieces
    outer: bool = False        # eps_out has been added: base is sqrt(mean + eps_in) + eps_out
    eps_in: float = 0.0
    eps_out: float = 0.0
    eps_nodes: list = field(default_factory=list)   # the nodes holding the constants added
    gain: fx.Node | None = None                       # a gain multiplied into the statistic: x * (rho * w)
    clamped: bool = False

    @property
    def power(self) -> float:
        """The statistic as a power of |x| (2 for mean(x^2), -1 for rho)."""
        return self.exponent * (1.0 if self.outer else 2.0)


@dataclass(frozen=True)
class _Extent:
    """Where a confirmed candidate starts and ends, the nodes between, and the module that computes exactly that."""

    x: fx.Node
    output: fx.Node
    gamma: fx.Node | None
    gamma_offset: float
    nodes: frozenset
    skipped: tuple             # no-op casts of x that other code also reads
    module: str | None = None


_Step = tuple[fx.Node, tuple[fx.Node, float] | None]   # a node of a norm's tail, and the gain it applies (if any)


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------

class _Matcher:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._param_only: dict[fx.Node, bool] = {}
        self._calls: tuple[dict, dict] | None = None   # see _call_index

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
                    match = self._confirm(candidate, claimed)
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
        return _Candidate(core, x, float(eps), True, gamma, offset, spelling)

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
        elif packet in _VECTOR_NORMS:
            order = _arg(red, 1, "ord" if packet is aten.linalg_vector_norm else "p", 2)
            if order not in (2, 2.0):
                raise _Skip
            reduced = operand
            ops.append("vector_norm")
        else:
            reduced = operand
            ops.append(packet.__name__)
        ndim = _val(reduced).dim()
        dims = self._reduced_dims(red, ndim)

        found = []
        for core, stat_operand, path in self._combining_ops(red):
            x_side = core.args[0] if core.args[1] is stat_operand else core.args[1]
            meet, gain_first = self._meeting_point(x_side, reduced), None
            if meet is None:
                meet, gain_first = self._through_gain(x_side, reduced)
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
            hidden = self._hidden_size(meet)
            stat = self._walk_stat(path, self._initial_stat(packet, hidden, ops))
            mode = "mul" if _packet(core) is aten.mul else "div"
            wanted = -1.0 if mode == "mul" else 1.0
            if not math.isclose(stat.power, wanted):
                raise _Reject(f"scales rows by |x|^{-stat.power if mode == 'div' else stat.power:g}, not by 1/RMS")
            eps, in_root = self._eps(stat)
            if gain_first is not None and stat.gain is not None:
                raise _Reject("applies two gains")
            gain = gain_first if gain_first is not None else stat.gain
            gamma, offset = self._gain(gain, hidden) if gain is not None else (None, 0.0)
            spelling = "-".join((["gain"] if gain_first is not None else []) + stat.ops + [mode])
            found.append(_Candidate(core, meet, eps, in_root, gamma, offset, spelling, clamped=stat.clamped))
        if not found:
            raise _Skip
        return found

    @staticmethod
    def _initial_stat(packet: Any, hidden: int, ops: list[str]) -> _Stat:
        """The reduction as ``scale * mean(x**2) ** exponent``: a sum is D means, a vector norm sqrt(D * mean)."""
        if packet is aten.sum:
            return _Stat(scale=float(hidden), exponent=1.0, ops=list(ops))
        if packet in _VECTOR_NORMS:
            return _Stat(scale=math.sqrt(hidden), exponent=0.5, ops=list(ops))
        return _Stat(scale=1.0, exponent=1.0, ops=list(ops))

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
                if self._is_stat_op(user, node) or self._is_stat_gain(user, node):
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

    def _is_stat_gain(self, user: fx.Node, operand: fx.Node) -> bool:
        """Whether ``user`` multiplies the statistic by a gain computed only from parameters: ``x * (rho * w)``."""
        if _packet(user) is not aten.mul or len(user.args) != 2 or operand not in user.args:
            return False
        other = user.args[1] if user.args[0] is operand else user.args[0]
        return (_is_tensor_node(other) and _val(other).numel() > 1 and self._is_param_only(other)
                and not self._is_param_only(operand))

    def _walk_stat(self, path: list[fx.Node], stat: _Stat) -> _Stat:
        for prev, node in zip(path, path[1:]):
            packet = _packet(node)
            if packet in _ROOTS or packet is aten.pow:
                p = _ROOTS[packet] if packet in _ROOTS else float(node.args[1])
                stat.scale, stat.exponent = stat.scale ** p, stat.exponent * p
                stat.ops.append(packet.__name__ if packet in _ROOTS else f"pow({p:g})")
            elif packet in _CLAMPS:
                stat.clamped = True
            elif packet in (aten.add, aten.sub):
                other = node.args[1] if node.args[0] is prev else node.args[0]
                value = self._constant(other) * _arg(node, 2, "alpha", 1)
                self._add_constant(stat, -value if packet is aten.sub else value, other)
            elif packet is aten.mul:
                other = node.args[1] if node.args[0] is prev else node.args[0]
                factor = self._constant(other)
                if factor is None:
                    stat.gain = other
                    stat.ops.append("gain")
                else:
                    self._scale(stat, factor)
            elif packet is aten.div and node.args[0] is prev:
                self._scale(stat, 1 / self._constant(node.args[1]))
            elif packet is aten.div:   # c / stat
                stat.scale, stat.exponent = 1 / stat.scale, -stat.exponent
                self._scale(stat, self._constant(node.args[0]))
                stat.ops.append("reciprocal")
        return stat

    @staticmethod
    def _scale(stat: _Stat, factor: float) -> None:
        """Multiply the statistic by a constant; a factor <= 0 (a negated or zeroed norm) is never an RMSNorm."""
        if not factor > 0:
            raise _Reject(f"multiplies the statistic by {factor:g}")
        stat.scale *= factor

    @staticmethod
    def _add_constant(stat: _Stat, value: float, node: Any) -> None:
        """Add ``value`` to ``scale * base ** exponent``: an eps inside the root or, added to the root, outside it."""
        stat.eps_nodes.append(node)
        if not stat.outer and math.isclose(stat.exponent, 1.0):
            stat.eps_in += value / stat.scale
        elif not stat.outer and math.isclose(stat.exponent, 0.5):
            stat.outer, stat.exponent, stat.eps_out = True, 1.0, value / stat.scale
        elif stat.outer and math.isclose(stat.exponent, 1.0):
            stat.eps_out += value / stat.scale
        else:
            raise _Reject(f"adds eps to |x|^{stat.power:g}, neither inside nor outside the root")

    def _eps(self, stat: _Stat) -> tuple[float, bool]:
        if any(isinstance(n, fx.Node) and self._has_trainable_parameter(n) for n in stat.eps_nodes):
            raise _Reject("eps is a trainable parameter")
        if stat.outer and stat.eps_in:
            raise _Reject("adds eps both inside and outside the root")
        value = stat.eps_out if stat.outer else stat.eps_in
        if value < 0:
            raise _Reject(f"subtracts {-value:g} from the statistic")
        return float(value), not stat.outer

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

    def _through_gain(self, x_side: fx.Node, reduced: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
        """``(x, gain)`` when ``x_side`` is ``x * gain`` (up to casts), a gain computed only from parameters
        applied before the normalising op: ``(w * x) * rsqrt(...)``, ``(x * w) / sqrt(...)``."""
        for node in _value_chain(x_side):
            if _packet(node) is not aten.mul or len(node.args) != 2:
                continue
            for a, g in (node.args, node.args[::-1]):
                if (isinstance(a, fx.Node) and _is_tensor_node(g) and _val(g).numel() > 1
                        and self._is_param_only(g) and not self._is_param_only(a)):
                    meet = self._meeting_point(a, reduced)
                    if meet is not None:
                        return meet, g
        return None, None

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

    # -- output extension ---------------------------------------------------
    def _tail(self, cand: _Candidate, hidden: int) -> list[_Step]:
        """What the core's value flows through next: casts and (if it has none yet) one gain multiply,
        each with the gain it applies. The tail stays in the core's module call and the calls that made it:
        a cast in the next module's forward (the upcast of a norm applied to this one's output) is that module's."""
        tail: list[_Step] = []
        node, has_gain, core_call = cand.core, cand.gamma is not None, _call(cand.core)
        while True:
            users = _real_users(node)
            if len(users) != 1:
                return tail
            user = users[0]
            if not _encloses(_call(user), core_call) or (_is_inplace(user) and user.args[0] is not node):
                return tail
            if _is(user, _CASTS) and user.args[0] is node:
                tail.append((user, None))
                node = user
                continue
            if _packet(user) is aten.mul and len(user.args) == 2:
                other = user.args[1] if user.args[0] is node else user.args[0]
                if not isinstance(other, fx.Node) or not _is_tensor_node(other) or _val(other).numel() <= 1:
                    return tail
                if self._is_param_only(other):
                    parsed = None if has_gain else self._parse_gain(other, hidden)
                    if parsed is None:
                        return tail
                    tail.append((user, parsed))
                    node, has_gain = user, True
                    continue
                if core_call and _call(user) == core_call and _val(other).shape[-1] in (hidden, 1):
                    raise _Reject("gain depends on another activation")
            return tail

    # -- extent and module ----------------------------------------------------
    def _choose_extent(self, cand: _Candidate, tail: list[_Step], claimed: set[fx.Node]) -> _Extent:
        """The largest extent that is exactly one module call's computation (the innermost such call on a tie),
        else the whole norm: a cast or gain the caller applies to a norm module's output stays outside it."""
        core_call = _call(cand.core)
        best = None
        for depth in range(len(core_call), 0, -1):
            call = core_call[:depth]
            if not self._path_of(call):   # the root module is not a module of the model to name
                continue
            extent = self._extent(cand, tail, claimed, call)
            if (best is None or len(extent.nodes) > len(best.nodes)) and self._is_exactly(extent, call):
                best = replace(extent, module=self._path_of(call))
        return best or self._extent(cand, tail, claimed, None)

    def _extent(self, cand: _Candidate, tail: list[_Step], claimed: set[fx.Node],
                within: tuple[str, ...] | None) -> _Extent:
        """The norm from its input to the end of its tail, both kept inside the call ``within`` when given.

        The input is widened back through casts only the norm uses, and through
        no-op casts (a same-dtype ``.to()`` returns its input, so export may route
        other users, e.g. the residual, through it); never into a call other than
        the core's or those that made it, nor into a norm matched before.
        """
        inside = (lambda n: True) if within is None else (lambda n: _encloses(within, _call(n)))
        steps = list(takewhile(lambda step: inside(step[0]), tail))
        output = steps[-1][0] if steps else cand.core
        gamma, offset = next((gain for _, gain in steps if gain), (cand.gamma, cand.gamma_offset))
        x = cand.x
        nodes = self._between(x, output, gamma)
        skipped: list[fx.Node] = []
        core_call = _call(cand.core)
        while (_is(x, _PASSTHROUGH) and isinstance(x.args[0], fx.Node) and _is_tensor_node(x.args[0])
               and x not in claimed and inside(x) and _encloses(_call(x), core_call)):
            if all(u in nodes for u in _real_users(x)):
                nodes.add(x)
                nodes.update(u for u in x.users if _is(u, _ASSERTS))
            elif _val(x).dtype == _val(x.args[0]).dtype and _val(x).device == _val(x.args[0]).device:
                skipped.append(x)
            else:
                break
            x = x.args[0]
        return _Extent(x, output, gamma, offset, frozenset(nodes), tuple(skipped))

    def _is_exactly(self, extent: _Extent, call: tuple[str, ...]) -> bool:
        """Whether the call computes exactly the extent (asserts, parameter-only nodes, skipped no-op casts aside)."""
        if not all(_encloses(call, _call(n)) for n in extent.nodes if not _is(n, _ASSERTS)):
            return False
        inside = extent.nodes | set(extent.skipped)
        return all(n in inside or _is(n, _ASSERTS) or self._is_param_only(n) or not _is_tensor_node(n)
                   for n in self._members_of(call))

    # -- confirmation --------------------------------------------------------
    def _confirm(self, cand: _Candidate, claimed: set[fx.Node]) -> NormMatch:
        hidden = self._hidden_size(cand.x)
        extent = self._choose_extent(cand, self._tail(cand, hidden), claimed)
        if not _is_tensor_node(extent.x):
            raise _Reject("the normalised value is not a tensor")
        checked = replace(cand, gamma=extent.gamma, gamma_offset=extent.gamma_offset)
        _NumericCheck(self.gm, extent.x, extent.output, extent.nodes, checked, hidden).run()
        if cand.clamped:
            raise _Reject("clamps the statistic (max(norm, eps)) instead of adding eps")
        return NormMatch(
            name=extent.module or extent.output.name, input=extent.x, output=extent.output,
            nodes=tuple(sorted(extent.nodes, key=self.order.__getitem__)), eps=cand.eps,
            eps_in_root=cand.eps_in_root, gamma=extent.gamma, gamma_offset=extent.gamma_offset, hidden_size=hidden,
            spelling=cand.spelling, module=extent.module,
        )

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

    def _call_index(self) -> tuple[dict[tuple[str, ...], list[fx.Node]], dict[tuple[str, ...], str]]:
        """For each module call (see :func:`_call`): the call_function nodes computed in it (in its own forward
        and in the calls it makes), and the qualified name of its module ("" for the root)."""
        if self._calls is None:
            members: dict[tuple[str, ...], list[fx.Node]] = {}
            paths: dict[tuple[str, ...], str] = {}
            for n in self.gm.graph.nodes:
                if n.op != "call_function":
                    continue
                whole = _call(n)
                for depth in range(1, len(whole) + 1):
                    members.setdefault(whole[:depth], []).append(n)
                    path = n.meta["nn_module_stack"][whole[depth - 1]][0]
                    paths.setdefault(whole[:depth], path if isinstance(path, str) else "")
            self._calls = members, paths
        return self._calls

    def _members_of(self, call: tuple[str, ...]) -> list[fx.Node]:
        return self._call_index()[0].get(call, [])

    def _path_of(self, call: tuple[str, ...]) -> str:
        return self._call_index()[1].get(call, "")

    def _name_for(self, node: fx.Node) -> str:
        path = _scope(node)
        return path if path else node.name
