"""Stage 3, plan: decide for every matched norm what gets rewritten and why.

A norm's output is followed through ops that only move rows around or change
dtype (view, reshape, transposes that keep the last dim, leading-dim slices,
casts) and through multiplications by constant scalars, to its consumers:

* a linear layer with a parameter weight (``aten.linear``, or ``matmul``/``mm``
  against a parameter) becomes an MX linear fed by the site's shared cast;
* any other consumer (a residual add, a reduction, attention scores...) keeps
  the exact RMSNorm, which stays in the graph for it;
* linears that must stay in high precision are kept too: MoE routers (their
  output picks experts through top-k), linears the model computes in float32
  on purpose (an explicit upcast right before them), and the output head
  unless ``include_head=True``.

Every decision carries a reason, which the report prints. Example::

    h = rms_norm(x, w)            site "layers.0.input_layernorm"
    q = linear(h, Wq)             -> mx_linear   (rewritten)
    k = linear(h.view(..), Wk)    -> mx_linear   (view replayed on the output)
    r = h + x                     -> keeps the exact norm ("add")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from mxrewrite.config import RewriteConfig
from mxrewrite.formats import get_format
from mxrewrite.formats.constants import SUPPORTED_INPUT_DTYPES
from mxrewrite.passes.match import NormMatch, RejectedCandidate

log = logging.getLogger(__name__)
aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
MATMUL_OPS = {aten.matmul.default, aten.mm.default}
ROUTING_OPS = {aten.topk.default, aten.argmax.default, aten.argsort.default, aten.argsort.stable,
               aten.sort.default, aten.sort.stable, aten.max.dim, aten.kthvalue.default}
CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
ROW_PRESERVING_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                      aten.contiguous.default, aten.clone.default, aten.alias.default,
                      aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints,
                      aten.transpose.int, aten.permute.default, aten.slice.Tensor, aten.select.int,
                      aten.t.default}
SCALAR_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
# nodes export adds that only check metadata; they never make a consumer
METADATA_OPS = {aten._assert_tensor_metadata.default, aten.sym_size.int}


@dataclass(frozen=True)
class LinearConsumer:
    """A linear fed (possibly through a chain of row-preserving ops) by a norm's output."""

    name: str
    node: fx.Node
    weight: fx.Node
    weight_transposed: bool  # the weight node holds (D, N): ``x @ W``
    bias: fx.Node | None
    chain: tuple[fx.Node, ...]
    alpha: float
    out_features: int


@dataclass(frozen=True)
class KeptConsumer:
    """A consumer that keeps reading the exact RMSNorm output, and why."""

    name: str
    node: fx.Node
    reason: str


@dataclass(frozen=True)
class SitePlan:
    match: NormMatch
    status: str  # "rewritten" | "skipped"
    reason: str
    linears: tuple[LinearConsumer, ...] = ()
    kept: tuple[KeptConsumer, ...] = ()
    correction: float = 1.0

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"


@dataclass(frozen=True)
class Plan:
    config: RewriteConfig
    sites: tuple[SitePlan, ...]
    rejected: tuple[RejectedCandidate, ...] = field(default=())


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _keeps_rows(node: fx.Node, src: fx.Node) -> bool:
    """``node`` maps whole rows of ``src`` to whole rows (the last dim untouched)."""
    if node.target not in ROW_PRESERVING_OPS or not node.args or node.args[0] is not src:
        return False
    if any(a is src for a in node.args[1:]) or any(v is src for v in node.kwargs.values()):
        return False
    in_shape, out_shape = _shape(src), _shape(node)
    if in_shape is None or out_shape is None or not in_shape or not out_shape:
        return False
    if out_shape[-1] != in_shape[-1]:
        return False
    last_in, last_out = len(in_shape) - 1, len(out_shape) - 1
    target, args = node.target, node.args
    if target is aten.t.default:
        return False  # 2-D transpose always moves the last dim
    if target is aten.transpose.int:
        return last_in not in (_normalize_dim(args[1], len(in_shape)), _normalize_dim(args[2], len(in_shape)))
    if target is aten.permute.default:
        return _normalize_dim(args[1][-1], len(in_shape)) == last_in
    if target in (aten.slice.Tensor, aten.select.int):
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        return _normalize_dim(dim, len(in_shape)) != last_in
    if target is aten.unsqueeze.default:
        return _normalize_dim(args[1], len(out_shape)) != last_out
    if target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        return all(_normalize_dim(d, len(in_shape)) != last_in for d in dims)
    if target is aten.flatten.using_ints:
        end = args[2] if len(args) > 2 else -1
        return _normalize_dim(end, len(in_shape)) != last_in
    return True  # view / reshape / contiguous / clone / alias: same last dim, rows stay rows


def _is_cast(node: fx.Node, src: fx.Node) -> bool:
    if node.target not in CAST_OPS or not node.args or node.args[0] is not src:
        return False
    in_val, out_val = src.meta.get("val"), node.meta.get("val")
    if not (isinstance(in_val, torch.Tensor) and isinstance(out_val, torch.Tensor)):
        return False
    return in_val.shape == out_val.shape and in_val.device == out_val.device


def _scalar_factor(node: fx.Node, src: fx.Node) -> float | None:
    """The constant a ``mul``/``div`` applies to ``src``, or None if it is not a constant scalar."""
    if node.target not in SCALAR_OPS or len(node.args) != 2:
        return None
    a, b = node.args
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        if a is src and isinstance(b, (int, float)) and not isinstance(b, bool) and b != 0:
            return 1.0 / float(b)
        return None
    other = b if a is src else a if b is src else None
    if a is src and b is src:
        return None
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return float(other)
    return None


def _is_upcast_to_fp32(node: fx.Node, src: fx.Node) -> bool:
    return _dtype(node) == torch.float32 and _dtype(src) not in (None, torch.float32)


@dataclass(frozen=True)
class _Path:
    """Transparent ops from the norm output to a consumer, the constant they multiply by, and
    whether one of them upcasts to float32."""

    chain: tuple[fx.Node, ...] = ()
    alpha: float = 1.0
    upcast: bool = False

    def then(self, node: fx.Node, factor: float = 1.0, upcast: bool = False) -> "_Path":
        return _Path(self.chain + (node,), self.alpha * factor, self.upcast or upcast)


def _consumers(start: fx.Node) -> list[tuple[_Path, fx.Node, fx.Node]]:
    """Every terminal consumer of ``start``: ``(path, the node it reads, consumer)``."""
    found = []
    stack = [(start, _Path())]
    while stack:
        src, path = stack.pop()
        for user in src.users:
            if user.target in METADATA_OPS:
                continue
            if _keeps_rows(user, src):
                stack.append((user, path.then(user)))
            elif _is_cast(user, src):
                stack.append((user, path.then(user, upcast=_is_upcast_to_fp32(user, src))))
            elif (factor := _scalar_factor(user, src)) is not None:
                stack.append((user, path.then(user, factor)))
            else:
                found.append((path, src, user))
    return found


def _parameter_names(gm: fx.GraphModule) -> set[str]:
    return {name for name, _ in gm.named_parameters(remove_duplicate=False)}  # tied weights under every name


def _resolve_weight(node, params: set[str]) -> tuple[fx.Node, bool, float, bool] | None:
    """Follow a weight operand back to a parameter: ``(param_node, transposed, scale, upcast)``."""
    transposed, scale, upcast = False, 1.0, False
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return (node, transposed, scale, upcast) if node.target in params else None
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        if node.target is aten.t.default or (node.target is aten.transpose.int and len(_shape(src) or ()) == 2):
            transposed = not transposed
        elif node.target is aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2]):
            transposed = not transposed
        elif _is_cast(node, src):
            upcast = upcast or _is_upcast_to_fp32(node, src)
        elif (factor := _scalar_factor(node, src)) is not None:
            scale *= factor
        elif node.target in (aten.contiguous.default, aten.clone.default, aten.alias.default):
            pass  # (not detach: a detached weight gets no gradient, which the MX linear would change)
        else:
            return None
        node = src
    return None


def _linear_name(weight: fx.Node) -> str:
    """The linear module's qualified name (``q_proj``) or, for a bare matmul, the weight's."""
    target = str(weight.target)
    return target[: -len(".weight")] if target.endswith(".weight") else target


def _heads(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears whose output reaches a graph output through ops that mix in no other activation
    (casts, reshapes, softcapping, scaling): the model's output projection(s)."""
    matmul_like = LINEAR_OPS | MATMUL_OPS | {aten.bmm.default, aten.addmm.default, aten.baddbmm.default}
    from_input: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)

    def reaches_output_alone(node: fx.Node) -> bool:
        frontier, seen = [node], {node}
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user.op == "output":
                    return True
                others = [a for a in user.all_input_nodes if a is not current]
                if user in seen or user.target in matmul_like or any(a in from_input for a in others):
                    continue
                seen.add(user)
                frontier.append(user)
        return False

    return {n for n in gm.graph.nodes if n.target in matmul_like and reaches_output_alone(n)}


def _routes_experts(node: fx.Node, depth: int = 4) -> bool:
    """The linear's output reaches a top-k/argmax within a few steps: an MoE router."""
    frontier = [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u.op == "call_function"]
        if any(u.target in ROUTING_OPS for u in frontier):
            return True
    return False


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target)) if node.op == "call_function" else node.op
    return f"{name.split('.')[0]} ({node.name})"


def _classify(path: _Path, src: fx.Node, user: fx.Node, hidden: int, params: set[str], heads: set[fx.Node],
              config: RewriteConfig) -> LinearConsumer | KeptConsumer:
    args = user.args
    if user.target in LINEAR_OPS and len(args) >= 2 and args[0] is src and args[1] is not src:
        weight_arg, weight_is_nk = args[1], True
        bias = args[2] if len(args) > 2 else user.kwargs.get("bias")
    elif user.target in MATMUL_OPS and len(args) == 2 and args[0] is src and args[1] is not src:
        weight_arg, weight_is_nk, bias = args[1], False, None
    else:
        return KeptConsumer(_describe(user), user, "not a linear layer")
    resolved = _resolve_weight(weight_arg, params)
    if resolved is None:
        return KeptConsumer(_describe(user), user, "weight is not a parameter")
    weight, transposed, scale, weight_upcast = resolved
    transposed = transposed != (not weight_is_nk)  # matmul(x, W) reads W as (D, N)
    wshape = _shape(weight)
    if wshape is None or len(wshape) != 2:
        return KeptConsumer(_describe(user), user, "weight is not a 2-D parameter")
    n_out, d_in = (wshape[1], wshape[0]) if transposed else wshape
    if d_in != hidden:
        return KeptConsumer(_describe(user), user, f"weight of shape {wshape} does not contract the norm's dim")
    name = _linear_name(weight)
    if path.upcast or weight_upcast:
        return KeptConsumer(name, user, "computed in float32 on purpose (explicit upcast before it)")
    if _routes_experts(user):
        return KeptConsumer(name, user, "MoE router (its output selects experts through top-k)")
    if user in heads and not config.include_head:
        return KeptConsumer(name, user, "output head (kept in high precision as in the paper; "
                                        "include_head=True rewrites it)")
    if bias is not None and not isinstance(bias, fx.Node):
        return KeptConsumer(name, user, "bias is not a tensor")
    return LinearConsumer(name, user, weight, transposed, bias, path.chain, path.alpha * scale, n_out)


def _skip(match: NormMatch, reason: str, kept=()) -> SitePlan:
    return SitePlan(match, "skipped", reason, (), tuple(kept))


def plan_site(match: NormMatch, gm: fx.GraphModule, config: RewriteConfig, params: set[str],
              heads: set[fx.Node]) -> SitePlan:
    spec = get_format(config.format)
    dtype = _dtype(match.input)
    if dtype not in SUPPORTED_INPUT_DTYPES:
        return _skip(match, f"unsupported dtype {dtype} (supported: {', '.join(map(str, SUPPORTED_INPUT_DTYPES))})")
    consumers = [_classify(path, src, user, match.hidden_size, params, heads, config)
                 for path, src, user in _consumers(match.output)]
    linears = tuple(c for c in consumers if isinstance(c, LinearConsumer))
    kept = tuple(c for c in consumers if isinstance(c, KeptConsumer))
    if linears and match.hidden_size % spec.block_size:
        return _skip(match, f"hidden size {match.hidden_size} is not divisible by the {spec.name} block size "
                            f"{spec.block_size}", kept)
    if not linears:
        if not kept:
            return _skip(match, "output is unused")
        reasons = sorted({f"{k.name}: {k.reason}" for k in kept})
        if all("output head" in k.reason for k in kept):
            return _skip(match, f"only consumer is the output head ({', '.join(k.name for k in kept)}); "
                                "include_head=True rewrites it", kept)
        return _skip(match, "no linear consumer to fuse with (" + "; ".join(reasons) + ")", kept)
    note = ""
    if kept:
        note = "exact RMSNorm kept for: " + "; ".join(sorted({f"{k.name} ({k.reason})" for k in kept}))
    return SitePlan(match, "rewritten", note, linears, kept, config.default_correction())


def plan(gm: fx.GraphModule, matches: list[NormMatch], rejected: list[RejectedCandidate],
         config: RewriteConfig, corrections: dict[str, float] | None = None) -> Plan:
    """Decide every site; ``corrections`` (norm name -> constant) overrides c'(p, B) per site."""
    params, heads = _parameter_names(gm), _heads(gm)
    sites = []
    for match in matches:
        site = plan_site(match, gm, config, params, heads)
        if site.rewritten and corrections and match.name in corrections:
            site = SitePlan(site.match, site.status, site.reason, site.linears, site.kept, corrections[match.name])
        log.debug("site %s: %s %s", match.name, site.status, site.reason)
        sites.append(site)
    return Plan(config, tuple(sites), tuple(rejected))
