"""Stage 3b: turn the graph-level plan into the modules to replace.

The rewrite replaces modules of the user's model, not graph nodes, so each site
of :mod:`~mxrewrite.passes.plan` must name:

* the norm module whose forward is exactly the norm (``NormMatch.module``) and
  the parameter that is its gain;
* for each linear consumer, the ``nn.Linear`` module whose call computed it.

What cannot be named that way is reported, never guessed: a norm written inline
in a bigger module's forward is skipped; a linear consumer that is not an
``nn.Linear`` call (a bare ``x @ W``, a custom linear class) stays as it is and
reads the exact norm. A norm module called at several places (before the
layers and again before the head) is one :class:`ModuleSite`: rewritten when
one of its calls is, with the consumers of every call.

Sites found in one block of a repeated stack (see :mod:`~mxrewrite.passes.repeated`)
are copied to every block of the same structure, and names from a captured
submodule are prefixed with its path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn

from mxrewrite.config import RewriteConfig
from mxrewrite.modules import CastSettings, NormConstants, replacement_for
from mxrewrite.passes.match.fx_utils import _scope
from mxrewrite.passes.plan import LINEAR_OPS, LinearConsumer, Plan, SitePlan
from mxrewrite.passes.repeated import BlockGroups, block_copies, rebase

__all__ = ["ModuleSite", "module_sites"]

aten = torch.ops.aten
_GAIN_PASSTHROUGH = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.alias.default,
                     aten.clone.default, aten.contiguous.default}


@dataclass(frozen=True)
class ModuleSite:
    """One norm module and what becomes of it (qualified names relative to the model's root)."""

    norm: str
    status: str                         # "rewritten" | "skipped"
    reason: str
    hidden_size: int
    spelling: str
    linears: tuple[str, ...] = ()       # nn.Linear modules that become MXLinear
    kept: tuple[str, ...] = ()          # consumers left in high precision (reading the exact norm), with why
    gain: str | None = None             # the norm module's parameter that is its gain
    settings: CastSettings | None = None
    constants: NormConstants | None = None
    input_bytes: int = 2                # element sizes of the norm's input and output, for the report
    output_bytes: int = 2

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"

    def renamed(self, old: str, new: str) -> "ModuleSite":
        def sub(name: str) -> str:
            return rebase(name, old, new) if old else new + name
        return replace(self, norm=sub(self.norm), linears=tuple(map(sub, self.linears)),
                       kept=tuple(map(sub, self.kept)))


def _gain_parameter(gamma: fx.Node | None, norm: str) -> tuple[bool, str | None]:
    """``(ok, name)``: the gain as a parameter of the norm module (``name`` None: no gain)."""
    if gamma is None:
        return True, None
    node = gamma
    while node.op == "call_function" and node.target in _GAIN_PASSTHROUGH and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "get_attr" or not str(node.target).startswith(norm + "."):
        return False, None
    name = str(node.target)[len(norm) + 1:]
    return ("." not in name), name


def _linear_module(gm: fx.GraphModule, model: nn.Module, lin: LinearConsumer) -> str | None:
    """The qualified name of the ``nn.Linear`` whose forward computed ``lin``, or None."""
    path = _scope(lin.node)
    if not path or lin.node.target not in LINEAR_OPS or lin.weight_transposed:
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if replacement_for(module) is None:
        return None
    if gm.get_parameter(str(lin.weight.target)) is not module.weight:
        return None
    return path


def _settings(site: SitePlan, config: RewriteConfig) -> CastSettings:
    # the gain is applied before the norm's cast wherever that cast computes its own output: the exact RMSNorm,
    # and MXNorm under FP8 (faster, and more accurate with spread gains: benchmarks/RESULTS.md); MXNorm in the
    # MX formats keeps the cast's elements of x and so folds its gain into the weights (MXNORM.md)
    gain_in_cast = config.norm == "rmsnorm" or config.format == "fp8"
    return CastSettings(config.format, config.norm, config.p, config.scale_mode, site.match.eps_in_root,
                        gain_in_cast, config.grad_cast)


def _constants(site: SitePlan) -> NormConstants:
    return NormConstants(site.match.eps, site.correction, site.match.gamma_offset)


def _itemsize(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dtype.itemsize if isinstance(val, torch.Tensor) else 2


def _one_call(site: SitePlan, gm: fx.GraphModule, model: nn.Module, config: RewriteConfig,
              order: dict[fx.Node, int]) -> ModuleSite:
    m = site.match
    norm = m.module
    common = dict(hidden_size=m.hidden_size, spelling=m.spelling, input_bytes=_itemsize(m.input),
                  output_bytes=_itemsize(m.output))
    kept = tuple(f"{k.name} ({k.reason})" for k in site.kept)
    if not norm:
        scope = _scope(m.output) or "the model"
        return ModuleSite(m.name, "skipped", f"the norm is written inline in the forward of {scope}; mxrewrite "
                          "replaces norm modules (move it into a module of its own to have it rewritten)",
                          kept=kept, **common)
    if not site.rewritten:
        return ModuleSite(norm, "skipped", site.reason, kept=kept, **common)
    ok, gain = _gain_parameter(m.gamma, norm)
    if not ok:
        return ModuleSite(norm, "skipped", "the gain is not a parameter of the norm module", kept=kept, **common)
    linears, not_modules = [], []
    for lin in sorted(site.linears, key=lambda lin: order[lin.node]):  # in the model's order
        name = _linear_module(gm, model, lin)
        if name is None:
            not_modules.append(f"{lin.name} (not an nn.Linear module call: stays in high precision)")
        else:
            linears.append(name)
    kept += tuple(not_modules)
    if not linears:
        return ModuleSite(norm, "skipped", "no nn.Linear module reads it: " + "; ".join(not_modules), kept=kept,
                          **common)
    reason = site.reason
    if not_modules:
        reason = "; ".join(filter(None, [reason, "exact RMSNorm kept for: " + "; ".join(not_modules)]))
    return ModuleSite(norm, "rewritten", reason, linears=tuple(dict.fromkeys(linears)), kept=kept, gain=gain,
                      settings=_settings(site, config), constants=_constants(site), **common)


def _merge(calls: list[ModuleSite]) -> ModuleSite:
    """One norm module called at several places: rewritten if any call is, with every call's consumers."""
    rewritten = [c for c in calls if c.rewritten]
    if not rewritten:
        return calls[0]
    first = rewritten[0]
    linears = tuple(dict.fromkeys(n for c in rewritten for n in c.linears))
    kept = tuple(dict.fromkeys(k for c in calls for k in c.kept))
    others = [f"call {i + 1}: {c.reason}" for i, c in enumerate(calls) if not c.rewritten]
    reason = "; ".join(filter(None, [first.reason] + [f"{o} (reads the exact norm)" for o in others]))
    return replace(first, linears=linears, kept=kept, reason=reason)


def module_sites(plan: Plan, gm: fx.GraphModule, model: nn.Module, groups: BlockGroups | None = None,
                 prefix: str = "") -> list[ModuleSite]:
    """The module-level sites of ``plan`` (captured from ``model``, or from its submodule at ``prefix``)."""
    calls: dict[str, list[ModuleSite]] = {}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for site in plan.sites:
        one = _one_call(site, gm, model, plan.config, order)
        calls.setdefault(one.norm, []).append(one)
    sites = [_merge(c) for c in calls.values()]
    if prefix:
        sites = [s.renamed("", prefix + ".") for s in sites]
    if groups is None:
        return sites
    expanded = []
    for site in sites:
        rep, copies = block_copies(site.norm, groups)
        expanded.extend([site.renamed(rep, c) for c in copies] if copies else [site])
    return [_expand_linears(s, groups) for s in expanded]


def _expand_linears(site: ModuleSite, groups: BlockGroups) -> ModuleSite:
    """Linears in a repeated block fed by a norm outside it: every copy of the block reads that norm."""
    linears = []
    for name in site.linears:
        rep, copies = block_copies(name, groups)
        if rep and not site.norm.startswith(rep):
            linears.extend(rebase(name, rep, c) for c in copies)
        else:
            linears.append(name)
    return replace(site, linears=tuple(dict.fromkeys(linears)))
