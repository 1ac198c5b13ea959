"""Measured rescale constants (``rescale="calibrated"``): one per norm module, from real activations.

MXNorm's Gaussian constant c'(p, B) assumes Gaussian rows; heavier-tailed
activations have larger block maxima, so the bare estimate over-reads the RMS
(MXNORM.md). For each norm this measures ``c = mean_rows(RMS(x) / M_p(x))`` on
the inputs it receives while the original model runs the calibration inputs, so
that ``r = c * M_p`` tracks the true RMS of that site. With the Gaussian constant
the same measurement on the example inputs says where the estimate misreads
(:func:`check_estimates`).
"""

from __future__ import annotations

from collections.abc import Iterable

import logging

import torch
import torch.nn as nn

from mxrewrite.errors import MXRewriteError
from mxrewrite.formats.mx import block_amax
from mxrewrite.recording import run_watching

__all__ = ["check_estimates", "measure_corrections"]

log = logging.getLogger(__name__)
# how far MXNorm's estimate may read from the RMS on the example inputs before optimize() says so
ESTIMATE_TOLERANCE = 0.25


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


def check_estimates(model: nn.Module, norms: list[str], inputs: list[tuple[tuple, dict]], *, p: int,
                    block_size: int, correction: float) -> None:
    """Warn where MXNorm with the constant ``correction`` reads the RMS of ``inputs`` badly.

    c'(p, B) assumes Gaussian rows: right for a model being trained from scratch, wrong by a large factor
    where a few channels dominate (a pretrained model's massive activations put an outlier in some blocks,
    and the power mean of the block maxima grows far more than the RMS): the rewritten model then computes a
    differently scaled norm there. One forward of the original model measures it, in eval mode: no dropout
    draws from the user's random stream, no running statistics change."""
    if not norms or any(t.is_meta for t in model.parameters()):  # nothing to measure on a meta model
        return
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        measured = measure_corrections(model, norms, inputs, p=p, block_size=block_size)
    except MXRewriteError:  # no non-zero rows to measure
        return
    finally:
        for module, training in modes.items():
            module.training = training
    # the estimate r = c' * M_p reads the RMS as c' / (RMS / M_p)
    reads = {name: correction / c for name, c in measured.items()}
    off = {name: r for name, r in reads.items() if abs(r - 1.0) > ESTIMATE_TOLERANCE}
    if off:
        worst = sorted(off.items(), key=lambda item: -abs(item[1] - 1.0))[:3]
        log.warning("mxrewrite: on the example inputs MXNorm's estimate reads the RMS at %s at %d of %d sites "
                    "(outlier channels; a trained model's massive activations do this): those norms will scale "
                    "their output differently from the original. For a pretrained model use norm='rmsnorm', or "
                    "rescale='calibrated' with representative calibration_data, and check with verify().",
                    ", ".join(f"{ratio:.2f}x ({name})" for name, ratio in worst), len(off), len(reads))
