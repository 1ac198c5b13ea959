"""Measured rescale constants (``rescale="calibrated"``): one per norm module, from real activations.

MXNorm's Gaussian constant c'(p, B) assumes Gaussian rows; heavier-tailed
activations have larger block maxima, so the bare estimate over-reads the RMS
(MXNORM.md). For each norm this measures ``c = mean_rows(RMS(x) / M_p(x))`` on
the inputs it receives while the original model runs the calibration inputs, so
that ``r = c * M_p`` tracks the true RMS of that site.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from mxrewrite.errors import MXRewriteError
from mxrewrite.formats.mx import block_amax
from mxrewrite.recording import run_watching

__all__ = ["measure_corrections"]


def rms_over_power_mean(x: torch.Tensor, p: int, block_size: int) -> torch.Tensor:
    """``RMS(row) / M_p(row)`` for every row of ``x`` with a non-zero estimate (float64)."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    amax = block_amax(rows, block_size)
    power_mean = amax.mean(-1) if p == 1 else amax.pow(2).mean(-1).sqrt()
    rms = rows.pow(2).mean(-1).sqrt()
    valid = power_mean > 0
    return rms[valid] / power_mean[valid]


def measure_corrections(model: nn.Module, norms: list[str], inputs: Iterable[tuple[tuple, dict]], *, p: int,
                        block_size: int) -> dict[str, float]:
    """Per norm module (qualified name): ``mean(RMS / M_p)`` over every row it normalises on ``inputs``."""
    sums = {name: 0.0 for name in norms}
    rows = {name: 0 for name in norms}

    def record(name: str, args: tuple, kwargs: dict, _) -> None:
        ratio = rms_over_power_mean(args[0], p, block_size)
        sums[name] += ratio.sum().item()
        rows[name] += ratio.numel()

    run_watching(model, inputs, [(name, model.get_submodule(name)) for name in norms], record, before=True)
    missing = [name for name in norms if not rows[name]]
    if missing:
        raise MXRewriteError(f"calibration saw no non-zero rows for {missing}; pass calibration_data with "
                             "representative inputs, or use rescale='gaussian'")
    return {name: sums[name] / rows[name] for name in norms}
