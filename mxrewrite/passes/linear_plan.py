"""Stage 3c (``linears="all"``): which linears that no rewritten norm feeds are converted too.

Every ``nn.Linear`` module call in the captured graph is looked at once. A linear
a rewritten norm feeds is already an MX linear (:mod:`~mxrewrite.passes.module_plan`);
any other is converted to cast its own input, except those that stay in high
precision for the same reasons a norm's consumer does (:mod:`~mxrewrite.passes.plan`):

* the model's output head (unless ``include_head=True``),
* an MoE router (its output selects experts through top-k),
* a linear whose input is upcast to float32 right before it (float32 on purpose),
* a module whose forward is not ``nn.Linear``'s (a subclass another library owns),
* an input dim an MX cast cannot block (not a multiple of the block size).

Example: in a Llama layer, ``o_proj`` and ``down_proj`` are converted (own cast);
``lm_head`` is kept ("output head").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.fx as fx
import torch.nn as nn

from mxrewrite.config import RewriteConfig
from mxrewrite.formats import get_format
from mxrewrite.modules import MXLinear, replacement_for
from mxrewrite.passes.match.fx_utils import _scope
from mxrewrite.passes.module_plan import ModuleSite
from mxrewrite.passes.plan import LINEAR_OPS, _heads, _is_upcast_to_fp32, _routes_experts
from mxrewrite.passes.repeated import BlockGroups, block_copies, rebase

__all__ = ["LinearChoice", "other_linears"]


@dataclass(frozen=True)
class LinearChoice:
    """A linear no rewritten norm feeds: converted to cast its own input, or kept, and why."""

    name: str
    converted: bool
    reason: str


def _why_kept(node: fx.Node, module: nn.Module, heads: set[fx.Node], config: RewriteConfig) -> str | None:
    if node in heads and not config.include_head:
        return "output head (kept in high precision as in the paper; include_head=True converts it)"
    if _routes_experts(node):
        return "MoE router (its output selects experts through top-k)"
    src = node.args[0]
    if isinstance(src, fx.Node) and src.args and isinstance(src.args[0], fx.Node) and \
            _is_upcast_to_fp32(src, src.args[0]):
        return "computed in float32 on purpose (explicit upcast before it)"
    if replacement_for(module) is not MXLinear:
        return f"{type(module).__name__} is not a plain nn.Linear (its own forward is kept)"
    spec = get_format(config.format)
    if spec.block_scaled and module.in_features % spec.block_size:
        return f"in_features {module.in_features} is not a multiple of the {spec.name} block size {spec.block_size}"
    return None


def other_linears(gm: fx.GraphModule, model: nn.Module, sites: list[ModuleSite], config: RewriteConfig,
                  groups: BlockGroups | None = None, prefix: str = "") -> list[LinearChoice]:
    """The linear modules of ``model`` (captured as ``gm``) that no site in ``sites`` converts, each with
    its fate under ``linears="all"`` (named from the root when ``model`` is a submodule at ``prefix``)."""
    fed = {n for s in sites if s.rewritten for n in s.linears}
    heads = _heads(gm)
    choices: dict[str, LinearChoice] = {}
    for node in gm.graph.nodes:
        path = _scope(node) if node.target in LINEAR_OPS else None
        if not path:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear) or not _reads_weight_of(gm, node, module):
            continue
        name = f"{prefix}.{path}" if prefix else path
        if name in fed or (name in choices and not choices[name].converted):
            continue
        why = _why_kept(node, module, heads, config)
        choices[name] = LinearChoice(name, why is None, why or "casts its own input")
    return _expanded(list(choices.values()), groups, prefix)


def _reads_weight_of(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> bool:
    weight = node.args[1]
    try:
        return isinstance(weight, fx.Node) and gm.get_parameter(str(weight.target)) is module.weight
    except AttributeError:
        return False


def _expanded(choices: list[LinearChoice], groups: BlockGroups | None, prefix: str) -> list[LinearChoice]:
    """A choice made in one block of a repeated stack holds for every block of the same structure."""
    if groups is None:
        return choices
    out = []
    for c in choices:
        local = c.name[len(prefix) + 1:] if prefix else c.name
        rep, copies = block_copies(local, groups)
        names = [rebase(local, rep, copy) for copy in copies] if copies else [local]
        out.extend(replace(c, name=f"{prefix}.{n}" if prefix else n) for n in names)
    return out
