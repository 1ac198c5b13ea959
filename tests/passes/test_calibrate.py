"""Calibration (``rescale="calibrated"``): mean(RMS / M_p) over the rows each norm normalises, zero rows left out.

Whole models are checked against an independent computation in ``test_reference.py``; this file pins the
edges: rows whose estimate is zero (padding, a zeroed embedding) carry no ratio and are not counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mxrewrite.errors import MXRewriteError
from mxrewrite.passes.calibrate import measure_corrections
from tests.reference_model import power_mean_ratio

D = 64


class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.RMSNorm(D), nn.RMSNorm(D)

    def forward(self, x):
        return self.b(self.a(x) * 3.0)


@pytest.mark.parametrize("p,block", [(2, 32), (1, 16)])
def test_zero_rows_are_left_out(p, block):
    x = torch.randn(3, 8, D, generator=torch.Generator().manual_seed(0)) * 5
    x[0, :3] = 0  # rows a padded batch would hold
    x[2, 7] = 0
    inputs = [((x,), {}), ((x[1:] * -2,), {})]
    got = measure_corrections(TwoNorms(), ["a", "b"], inputs, p=p, block_size=block)
    nonzero = torch.cat([x.reshape(-1, D), (x[1:] * -2).reshape(-1, D)])
    nonzero = nonzero[nonzero.abs().amax(-1) > 0]
    expected = power_mean_ratio(nonzero, p, block).mean().item()
    # b normalises a's output (unit RMS rows, times 3): the same ratio per row, and the same zero rows
    assert got == pytest.approx({"a": expected, "b": expected}, rel=1e-6)


def test_only_zero_rows_is_an_error():
    with pytest.raises(MXRewriteError, match="no non-zero rows for \\['a', 'b'\\]"):
        measure_corrections(TwoNorms(), ["a", "b"], [((torch.zeros(2, 4, D),), {})], p=2, block_size=32)
