"""Stage 4, rewrite: replace each planned site with one fused cast and MX linears.

For a site whose norm ``h = RMSNorm(x) * gamma`` feeds ``y_i = chain_i(h) @ W_i^T``::

    data, scales, rho, tscale = norm_cast(x, ...)          # once per site
    y_i = replay(chain_i, mx_linear(x, rho, data, scales, tscale, W_i, gamma, ...))

* MXNorm folds ``gamma`` into each ``W_i`` (``norm_cast`` gets no gain); the exact
  RMSNorm baseline applies it in the cast (``gamma_in_cast=True``).
* The rescale constant (c'(p, B), a calibrated one, or 1) goes into ``norm_cast``;
  constant multipliers found on the path or on the weight become ``alpha``.
* The row-preserving ops of ``chain_i`` (views, transposes, slices) are replayed
  on the linear's output with the last dim ``D`` replaced by ``N``; casts and
  scalar multiplies are absorbed (the op emits the linear's dtype and applies alpha).

Nodes of the original norm stay in the graph only while something else (a
residual, a kept linear) still reads them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mxrewrite.config import RewriteConfig
from mxrewrite.passes.plan import METADATA_OPS, ROW_PRESERVING_OPS, LinearConsumer, Plan, SitePlan

aten = torch.ops.aten
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _replay(graph: fx.Graph, chain: tuple[fx.Node, ...], value: fx.Node, out_features: int) -> fx.Node:
    for node in chain:
        if node.target not in ROW_PRESERVING_OPS:
            continue  # casts and scalar multiplies are absorbed by mx_linear
        args = list(node.args)
        args[0] = value
        if node.target in RESHAPE_OPS:
            args[1] = [*args[1][:-1], out_features]
        value = graph.call_function(node.target, tuple(args), dict(node.kwargs))
    return value


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase candidates nothing reads any more (export's metadata asserts don't count as readers)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(set(candidates), key=lambda n: order.get(n, -1), reverse=True):
        if node.graph is not graph or node.op != "call_function":
            continue
        users = list(node.users)
        if all(u.target in METADATA_OPS and not u.users for u in users):
            for user in users:
                graph.erase_node(user)
            graph.erase_node(node)


def _rewrite_linear(graph: fx.Graph, site: SitePlan, lin: LinearConsumer, cast: list[fx.Node],
                    config: RewriteConfig, gamma_in_cast: bool) -> None:
    data, scales, rho, tscale = cast
    match = site.match
    with graph.inserting_before(lin.node):
        weight = graph.call_function(aten.t.default, (lin.weight,)) if lin.weight_transposed else lin.weight
        y = graph.call_function(
            torch.ops.mxrewrite.mx_linear.default,
            (match.input, rho, data, scales, tscale, weight, match.gamma, lin.bias, config.format, config.scale_mode,
             match.gamma_offset, gamma_in_cast, lin.alpha, lin.node.meta["val"].dtype, config.grad_cast),
        )
        y = _replay(graph, lin.chain, y, lin.out_features)
    lin.node.replace_all_uses_with(y)
    graph.erase_node(lin.node)


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Apply ``plan`` to ``gm`` in place and return it."""
    config = plan.config
    graph = gm.graph
    gamma_in_cast = config.norm == "rmsnorm"  # the exact baseline applies the gain before casting
    for site in plan.sites:
        if not site.rewritten:
            continue
        match = site.match
        with graph.inserting_before(match.output):
            fused = graph.call_function(
                torch.ops.mxrewrite.norm_cast.default,
                (match.input, match.gamma if gamma_in_cast else None, config.format, config.norm, config.p,
                 config.scale_mode, match.eps, site.correction, match.gamma_offset, match.eps_in_root),
            )
            fused.meta["mxrewrite_site"] = match.name
            cast = [graph.call_function(operator.getitem, (fused, i)) for i in range(4)]
        dead = list(match.nodes)
        for lin in site.linears:
            _rewrite_linear(graph, site, lin, cast, config, gamma_in_cast)
            dead.extend(lin.chain)
        _erase_dead(graph, dead)
    graph.lint()
    gm.recompile()
    return gm
