"""Stage 4, rewrite: put mxrewrite modules in place of each rewritten site's norm and linears.

The user's model keeps its class, forward code and module tree; only the
modules the plan names change::

    model.layers[0].input_layernorm   LlamaRMSNorm -> MXRMSNorm   (one fused norm + cast per call)
    model.layers[0].self_attn.q_proj  nn.Linear    -> MXLinear    (multiplies that cast)

The replacements hold the replaced modules' parameters, buffers and children as
the same objects under the same names (:func:`~mxrewrite.modules.adopt_state`),
so ``state_dict`` keys, optimizers, FSDP2 and tensor parallelism see the
original tensors. :func:`shared_copy` makes the model that is rewritten: a copy
of the user's model whose modules are new objects and whose parameters and
buffers are the user's, so the user's model itself is never changed. The one
exception: with ``fsdp_fp8_all_gather`` each converted linear's weight is a new
parameter over the same storage (:class:`~mxrewrite.modules.fp8_weight.Fp8AllGatherWeight`),
so build the optimizer from the optimized model.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import torch.nn as nn

from mxrewrite.config import RewriteConfig
from mxrewrite.modules import MXLinear, MXRMSNorm, replacement_for
from mxrewrite.modules.fp8_weight import Fp8AllGatherWeight
from mxrewrite.modules.functions import LinearSettings
from mxrewrite.passes.linear_plan import LinearChoice
from mxrewrite.passes.module_plan import ModuleSite

log = logging.getLogger(__name__)

__all__ = ["rewrite", "shared_copy"]


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares every parameter and buffer with it (tied weights stay tied)."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    memo = {id(t): t for t in tensors}
    return copy.deepcopy(model, memo)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def rewrite(model: nn.Module, sites: list[ModuleSite], linears: list[LinearChoice] = (),
            config: RewriteConfig | None = None) -> nn.Module:
    """Replace the modules of every rewritten site in ``model`` (in place), and under ``linears="all"`` every
    converted linear (``linears``, cast by itself as ``config`` says); returns ``model``."""
    own_cast = None
    if config is not None and config.linears == "all":
        own_cast = LinearSettings(config.format, config.scale_mode, config.grad_cast)
    converted: set[str] = set()
    for site in sites:
        if not site.rewritten:
            continue
        first_linear = model.get_submodule(site.linears[0])
        _replace(model, site.norm, MXRMSNorm(model.get_submodule(site.norm), site.gain, site.settings, site.constants,
                                             device=first_linear.weight.device))
        for name in site.linears:
            if name not in converted:
                linear = model.get_submodule(name)
                cls = replacement_for(linear)
                _replace(model, name, cls(linear, own_cast) if cls is MXLinear else cls(linear))
                converted.add(name)
    for choice in linears:
        if choice.converted and choice.name not in converted:
            _replace(model, choice.name, MXLinear(model.get_submodule(choice.name), own_cast))
            converted.add(choice.name)
    log.debug("replaced %d norm(s) and %d linear(s)", sum(s.rewritten for s in sites), len(converted))
    if config is not None and config.fsdp_fp8_all_gather:
        _gather_weights_in_fp8(model, converted)
    return model


def _gather_weights_in_fp8(model: nn.Module, names: set[str]) -> None:
    """Make the weight of each converted ``MXLinear`` in ``names`` an :class:`Fp8AllGatherWeight` parameter
    (same storage). A weight tied to another module keeps its parameter: it is gathered in high precision."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in sorted(names):
        linear = model.get_submodule(name)
        weight = linear.weight
        if isinstance(weight, Fp8AllGatherWeight):  # (a model optimized twice)
            continue
        if type(linear) is not MXLinear or uses[id(weight)] > 1:
            log.info("%s: weight gathered in high precision (tied to another module, or not a plain linear)", name)
            continue
        linear.weight = nn.Parameter(Fp8AllGatherWeight(weight.data), requires_grad=weight.requires_grad)
