"""``optimize`` and ``get_report``: the public entry points (DESIGN.md, "The public API").

``optimize`` returns the user's model rewritten in place of modules: a copy that
keeps the model's class, methods, forward code and module tree and shares its
parameters and buffers (the same tensor objects), in which each rewritten
site's norm and the linears it feeds are mxrewrite modules. The pipeline:

1. capture the model for analysis (one block per structure of a repeated
   stack; when the whole model cannot be captured, each submodule that can be);
2. match the RMSNorms, 3. plan the sites (graph, then modules),
4. rewrite the modules of the copy, 5. lower (log the kernels used),
and the report. Capture only finds and confirms sites: the code that runs is
the model's own forward.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mxrewrite.config import RewriteConfig
from mxrewrite.errors import CaptureError, ConfigError, MXRewriteError
from mxrewrite.modules import replacement_for
from mxrewrite.passes.calibrate import check_estimates, measure_corrections
from mxrewrite.passes.capture import capture
from mxrewrite.passes.linear_plan import LinearChoice, other_linears
from mxrewrite.passes.lower import lower
from mxrewrite.passes.match import RejectedCandidate, find_rms_norms
from mxrewrite.passes.module_plan import ModuleSite, module_sites
from mxrewrite.passes.plan import plan
from mxrewrite.passes.repeated import BlockGroups, block_copies, rebase, representatives
from mxrewrite.passes.rewrite import rewrite, shared_copy
from mxrewrite.recording import run_watching
from mxrewrite.report import Report, build_report

log = logging.getLogger(__name__)

__all__ = ["get_report", "optimize", "split_inputs"]

Inputs = Any  # a tensor, a tuple of args, a tuple ending in a kwargs dict, or a kwargs dict


def split_inputs(inputs: Inputs) -> tuple[tuple, dict]:
    """Normalise example inputs to ``(args, kwargs)``.

    Accepted: a tensor; a tuple/list of positional args; a tuple whose last
    element is a dict (the keyword args); a dict of keyword args alone.
    """
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        if inputs and isinstance(inputs[-1], dict):
            return tuple(inputs[:-1]), dict(inputs[-1])
        return tuple(inputs), {}
    raise ConfigError(f"example inputs must be a tensor, a tuple of args (optionally ending in a dict of "
                      f"kwargs) or a dict of kwargs, got {type(inputs).__name__}")


# ---------------------------------------------------------------------------
# analysis: capture -> match -> plan, per captured region

@contextlib.contextmanager
def _plain_linears(module: nn.Module) -> Iterator[None]:
    """While capturing, run ``nn.Linear`` subclasses whose forward another library owns (torchao's
    ``Float8Linear``...) as plain linears: export cannot always trace them, and for finding sites a linear is
    a linear. They are never replaced, so what they compute at run time is theirs."""
    owned = [m for m in module.modules()
             if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward and replacement_for(m) is None]
    for m in owned:
        m.forward = types.MethodType(nn.Linear.forward, m)
    try:
        yield
    finally:
        for m in owned:
            del m.forward


@dataclass
class Found:
    """What the analysis found: norm sites, norm-like candidates that are not RMSNorms, and (under
    ``linears="all"``) the fate of every other linear."""

    sites: list[ModuleSite] = field(default_factory=list)
    rejected: list[RejectedCandidate] = field(default_factory=list)
    linears: list[LinearChoice] = field(default_factory=list)

    def extend(self, other: "Found") -> None:
        self.sites += other.sites
        self.rejected += other.rejected
        self.linears += other.linears


def _analyse(module: nn.Module, args: tuple, kwargs: dict, config: RewriteConfig, prefix: str = "") -> Found:
    """Sites of one captured region (``module`` at ``prefix``), one block per structure of repeated stacks."""
    with _plain_linears(module), representatives(module) as groups:
        try:
            gm = capture(module, args, kwargs)
        except CaptureError:
            groups = None
    if groups is None:  # the shortened model could not run (e.g. it indexes its layers by count)
        with _plain_linears(module):
            gm = capture(module, args, kwargs)
    matches, rejected = find_rms_norms(gm)
    site_plan = plan(gm, matches, rejected, config)
    sites = module_sites(site_plan, gm, module, groups, prefix)
    linears = other_linears(gm, module, sites, config, groups, prefix) if config.linears == "all" else []
    return Found(sites, _block_copies(rejected, groups, prefix), linears)


def _block_copies(rejected: list[RejectedCandidate], groups: BlockGroups | None,
                  prefix: str) -> list[RejectedCandidate]:
    """A candidate rejected in a representative block is rejected in each of its copies."""
    out = []
    for r in rejected:
        rep, copies = block_copies(r.name, groups) if groups else ("", ())
        for name in [rebase(r.name, rep, c) for c in copies] or [r.name]:
            out.append(replace(r, name=f"{prefix}.{name}" if prefix else name))
    return out


def _recorded_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, tuple[tuple, dict]]:
    """The inputs of every submodule's first call while ``model`` runs on the example."""
    submodules = {name: m for name, m in model.named_modules() if m is not model}
    recorded: dict[nn.Module, tuple[tuple, dict]] = {}
    run_watching(model, [(args, kwargs)], submodules.items(),
                 lambda name, a, kw, _: recorded.setdefault(submodules[name], (a, kw)), before=True)
    return recorded


def _regions(module: nn.Module, prefix: str, recorded: dict) -> Iterator[tuple[str, nn.Module, tuple, dict]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _regions(child, path, recorded)
        elif child in recorded and any(isinstance(m, nn.Linear) for m in child.modules()):
            yield path, child, *recorded[child]  # (a region without linears has no site)


def _analyse_parts(module: nn.Module, prefix: str, recorded: dict, config: RewriteConfig, reason: str) -> Found:
    """Partial success: each child region that can be captured is analysed; the others are reported."""
    found = Found([ModuleSite(prefix or "<model>", "skipped", f"could not be captured: {reason}", 0, "region")])
    for path, child, args, kwargs in _regions(module, prefix, recorded):
        try:
            found.extend(_analyse(child, args, kwargs, config, path))
        except CaptureError as exc:
            found.extend(_analyse_parts(child, path, recorded, config, str(exc)))
    return found


def find_sites(model: nn.Module, args: tuple, kwargs: dict, config: RewriteConfig) -> Found:
    """Every norm site of ``model`` (whole-model capture, or region by region where that fails)."""
    try:
        return _analyse(model, args, kwargs, config)
    except CaptureError as exc:
        log.warning("mxrewrite: the model could not be captured as a whole (%s); analysing its parts", exc)
        recorded = _recorded_inputs(model, args, kwargs)
        return _analyse_parts(model, "", recorded, config, str(exc))


# ---------------------------------------------------------------------------

def _calibrated(model: nn.Module, sites: list[ModuleSite], config: RewriteConfig,
                data: Iterable[Inputs]) -> list[ModuleSite]:
    norms = [s.norm for s in sites if s.rewritten]
    corrections = measure_corrections(model, norms, (split_inputs(d) for d in data), p=config.p,
                                      block_size=config.block_size)
    return [replace(s, constants=s.constants._replace(correction=corrections[s.norm])) if s.rewritten else s
            for s in sites]


def _build(model: nn.Module, args: tuple, kwargs: dict, config: RewriteConfig,
           calibration_data: Iterable[Inputs] | None, progress: bool | None) -> Report:
    stages = ["capture, match, plan", "calibrate", "rewrite", "lower"]
    bar = tqdm(stages, desc="mxrewrite", disable=progress is False, leave=False, delay=0 if progress else 2.0)
    with bar:
        bar.set_postfix_str(stages[0], refresh=False)
        found = find_sites(model, args, kwargs, config)
        sites = found.sites
        bar.update()
        if config.rescale == "calibrated" and config.norm == "mxnorm":
            bar.set_postfix_str(stages[1], refresh=False)
            data = calibration_data if calibration_data is not None else [(*args, kwargs)]
            sites = _calibrated(model, sites, config, data)
        elif config.norm == "mxnorm" and config.rescale == "gaussian":
            check_estimates(model, [s.norm for s in sites if s.rewritten], [(args, kwargs)], p=config.p,
                            block_size=config.block_size, correction=config.default_correction())
        bar.update()
        bar.set_postfix_str(stages[2], refresh=False)
        rewrite(model, sites, found.linears, config)
        bar.update()
        device = next((t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        lower(device, config.format)
        bar.update()
    report = build_report(config, sites, found.rejected, found.linears)
    model.mx_report = report
    log.info("mxrewrite: %d site(s) rewritten, %d skipped", len(report.rewritten), len(report.skipped))
    return report


def optimize(model: nn.Module, example_inputs: Inputs = None, *, config: RewriteConfig | None = None,
             calibration_data: Iterable[Inputs] | None = None, progress: bool | None = None,
             **overrides) -> nn.Module:
    """Rewrite every RMSNorm -> Linear site of ``model`` into a fused MXFP8/NVFP4 cast (MXNorm).

    Args:
        model: any ``nn.Module``. It is not modified: the result is a copy of it
            (same class, methods, forward and module tree) that shares its
            parameters and buffers, the same tensor objects under the same names.
            Training either trains both; an optimizer, ``state_dict``, FSDP2 or
            tensor parallelism applied to the result sees those tensors. The
            rewritten norms and linears are :class:`~mxrewrite.modules.MXRMSNorm`
            and :class:`~mxrewrite.modules.MXLinear` modules holding the replaced
            modules' parameters.
        example_inputs: inputs to find the sites with (a tuple of args, optionally
            ending in a dict of kwargs); when omitted, that happens on the first call.
        config: a :class:`RewriteConfig`; keyword ``overrides`` replace its fields,
            e.g. ``optimize(model, x, format="nvfp4")``.
        calibration_data: inputs for ``rescale="calibrated"`` (default: the example inputs).
        progress: show a progress bar (default: only when analysis takes a while).

    Returns:
        The rewritten model; its report is ``get_report(result)`` (also ``result.mx_report``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if getattr(model, "mx_report", None) is not None or getattr(model, "_mx_pending", False):
        log.info("model is already optimized by mxrewrite; returning it unchanged")
        return model
    config = (config or RewriteConfig()).replace(**overrides) if overrides else (config or RewriteConfig())
    optimized = shared_copy(model)
    optimized.mx_config = config
    if example_inputs is not None:
        _build(optimized, *split_inputs(example_inputs), config, calibration_data, progress)
        return optimized

    def build_on_first_call(module, args, kwargs):
        if torch.compiler.is_compiling():
            raise MXRewriteError("the model was compiled before mxrewrite found its sites; pass example_inputs "
                                 "to mxrewrite.optimize (or call the model once) before torch.compile")
        handle.remove()
        module._mx_pending = False
        _build(module, args, kwargs, config, calibration_data, progress)

    optimized._mx_pending = True
    handle = optimized.register_forward_pre_hook(build_on_first_call, with_kwargs=True)
    return optimized


def get_report(optimized: nn.Module) -> Report:
    """The report of a model returned by :func:`optimize`."""
    report = getattr(optimized, "mx_report", None)
    if report is None:
        if getattr(optimized, "_mx_pending", False):
            raise MXRewriteError("no report yet: the sites are found on the model's first call; call it once or "
                                 "pass example_inputs to mxrewrite.optimize")
        raise MXRewriteError(f"{type(optimized).__name__} was not produced by mxrewrite.optimize")
    return report
