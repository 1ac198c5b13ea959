"""``optimize`` and ``get_report``: the public entry points (DESIGN.md, "The public API")."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mxrewrite.config import RewriteConfig
from mxrewrite.errors import ConfigError, MXRewriteError
from mxrewrite.passes.calibrate import measure_corrections
from mxrewrite.passes.capture import capture
from mxrewrite.passes.lower import lower
from mxrewrite.passes.match import find_rms_norms
from mxrewrite.passes.plan import Plan, plan
from mxrewrite.passes.rewrite import rewrite
from mxrewrite.report import Report, build_report

log = logging.getLogger(__name__)

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


class MXOptimized(nn.Module):
    """The rewritten model: an ``nn.Module`` sharing the original's parameters under the same names.

    It exposes the original model's submodules, parameters and buffers (so
    ``state_dict`` keys match and optimizers see the same tensors) and runs the
    rewritten graph, captured from the first call when ``optimize`` was given
    no example inputs. ``graph_module`` is that graph, ``mx_report`` the report,
    ``mx_plan`` the plan it came from.
    """

    def __init__(self, model: nn.Module, config: RewriteConfig, calibration_data: Iterable | None,
                 progress: bool | None):
        super().__init__()
        # share, don't own: the same submodules and tensors under the same qualified names
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self.training = model.training
        object.__setattr__(self, "_mx_source", model)
        object.__setattr__(self, "_mx_graph", None)
        self.mx_config = config
        self.mx_plan: Plan | None = None
        self.mx_report: Report | None = None
        self._mx_calibration = calibration_data
        self._mx_progress = progress

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        return self._mx_graph

    def _build(self, args: tuple, kwargs: dict) -> None:
        config = self.mx_config
        stages = ["capture", "match", "plan", "rewrite", "lower"]
        bar = tqdm(stages, desc="mxrewrite", disable=self._mx_progress is False, leave=False,
                   delay=0 if self._mx_progress else 2.0)
        with bar:
            bar.set_postfix_str("capture", refresh=False)
            gm = capture(self._mx_source, args, kwargs)
            bar.update()
            bar.set_postfix_str("match", refresh=False)
            matches, rejected = find_rms_norms(gm)
            bar.update()
            bar.set_postfix_str("plan", refresh=False)
            corrections = None
            if config.rescale == "calibrated" and config.norm == "mxnorm":
                data = self._mx_calibration if self._mx_calibration is not None else [(args, kwargs)]
                corrections = measure_corrections(gm, matches, (split_inputs(d) for d in data),
                                                  p=config.p, block_size=config.block_size)
            site_plan = plan(gm, matches, rejected, config, corrections)
            bar.update()
            bar.set_postfix_str("rewrite", refresh=False)
            gm = rewrite(gm, site_plan)
            bar.update()
            bar.set_postfix_str("lower", refresh=False)
            device = next((t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
            gm = lower(gm, device)
            bar.update()
        object.__setattr__(self, "_mx_graph", gm)
        self.mx_plan = site_plan
        self.mx_report = build_report(site_plan)
        log.info("mxrewrite: %d site(s) rewritten, %d skipped", len(self.mx_report.rewritten),
                 len(self.mx_report.skipped))

    def train(self, mode: bool = True) -> "MXOptimized":
        """Switch mode; a captured graph whose computation depends on the mode (dropout, batch norm)
        refuses to switch, with an error saying to capture again in the other mode."""
        if self._mx_graph is not None:
            self._mx_graph.train(mode)
        return super().train(mode)

    def forward(self, *args, **kwargs):
        if self._mx_graph is None:
            if torch.compiler.is_compiling():
                raise MXRewriteError("the model was compiled before mxrewrite captured it; pass example_inputs "
                                     "to mxrewrite.optimize (or call the model once) before torch.compile")
            self._build(args, kwargs)
        return self._mx_graph(*args, **kwargs)


def optimize(model: nn.Module, example_inputs: Inputs = None, *, config: RewriteConfig | None = None,
             calibration_data: Iterable[Inputs] | None = None, progress: bool | None = None,
             **overrides) -> MXOptimized:
    """Rewrite every RMSNorm -> Linear site of ``model`` into a fused MXFP8/NVFP4 cast (MXNorm).

    Args:
        model: any ``nn.Module``; it is not modified (the result shares its parameters).
        example_inputs: inputs to capture the graph with (batch and sequence dims
            stay dynamic); when omitted, capture happens on the first call.
        config: a :class:`RewriteConfig`; keyword ``overrides`` replace its fields,
            e.g. ``optimize(model, x, format="nvfp4")``.
        calibration_data: inputs for ``rescale="calibrated"`` (default: the example inputs).
        progress: show a progress bar (default: only when capture takes a while).

    Returns:
        An :class:`MXOptimized` module: trainable, works under ``torch.compile(fullgraph=True)``;
        its report is ``get_report(result)``.
    """
    if isinstance(model, MXOptimized):
        log.info("model is already optimized by mxrewrite; returning it unchanged")
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize expects an nn.Module, got {type(model).__name__}")
    config = (config or RewriteConfig()).replace(**overrides) if overrides else (config or RewriteConfig())
    optimized = MXOptimized(model, config, calibration_data, progress)
    if example_inputs is not None:
        optimized._build(*split_inputs(example_inputs))
    return optimized


def get_report(optimized: nn.Module) -> Report:
    """The report of a module returned by :func:`optimize`."""
    report = getattr(optimized, "mx_report", None)
    if report is None:
        if isinstance(optimized, MXOptimized):
            raise MXRewriteError("no report yet: the model is captured on its first call; call it once or pass "
                                 "example_inputs to mxrewrite.optimize")
        raise MXRewriteError(f"{type(optimized).__name__} was not produced by mxrewrite.optimize")
    return report
