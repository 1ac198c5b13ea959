"""Measured rescale constants (``rescale="calibrated"``): one per site, from real activations.

MXNorm's Gaussian constant c'(p, B) assumes Gaussian rows; heavier-tailed
activations have larger block maxima, so the bare estimate over-reads the RMS
(MXNORM.md). For each site this measures ``c = mean_rows(RMS(x) / M_p(x))`` on
the calibration inputs, so that ``r = c * M_p`` tracks the true RMS of that site.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from mxrewrite.errors import MXRewriteError
from mxrewrite.formats.mx import block_amax
from mxrewrite.passes.match import NormMatch


class _Recorder(fx.Interpreter):
    """Runs the graph and accumulates RMS / M_p per watched node."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, str], p: int, block_size: int):
        super().__init__(gm)
        self.watched, self.p, self.block_size = watched, p, block_size
        self.sums: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        name = self.watched.get(n)
        if name is not None:
            x = value.detach().float().reshape(-1, value.shape[-1])
            amax = block_amax(x, self.block_size).double()
            power_mean = (amax if self.p == 1 else amax * amax).mean(-1)
            estimate = power_mean if self.p == 1 else power_mean.sqrt()
            rms = x.double().pow(2).mean(-1).sqrt()
            valid = estimate > 0
            self.sums[name] = self.sums.get(name, 0.0) + (rms[valid] / estimate[valid]).sum().item()
            self.rows[name] = self.rows.get(name, 0) + int(valid.sum())
        return value


def measure_corrections(gm: fx.GraphModule, matches: list[NormMatch], inputs: Iterable[tuple[tuple, dict]],
                        *, p: int, block_size: int) -> dict[str, float]:
    """Per-norm constant ``mean(RMS / M_p)`` over every row the calibration inputs produce."""
    recorder = _Recorder(gm, {m.input: m.name for m in matches}, p, block_size)
    with torch.no_grad():
        for args, kwargs in inputs:
            flat = fx_pytree.tree_flatten_spec((args, kwargs), gm._in_spec)
            recorder.run(*flat)
    missing = [m.name for m in matches if not recorder.rows.get(m.name)]
    if missing:
        raise MXRewriteError(f"calibration saw no non-zero rows for {missing}; pass calibration_data with "
                             "representative inputs, or use rescale='gaussian'")
    return {name: recorder.sums[name] / recorder.rows[name] for name in recorder.rows}
