"""``mxrewrite::fp8_cast``: the op's CPU path and its fake under torch.compile."""

from __future__ import annotations

import torch

from mxrewrite.formats.fp8 import fp8_cast as fp8_cast_reference
from mxrewrite.ops import fp8_cast


def test_equals_the_reference_and_is_contiguous():
    t = torch.randn(40, 24) * 100
    out = fp8_cast(t.t(), torch.tensor(4.0))
    assert out.dtype == torch.float8_e4m3fn and out.is_contiguous() and out.shape == (24, 40)
    assert torch.equal(out.view(torch.uint8), fp8_cast_reference(t.t(), torch.tensor(4.0)).view(torch.uint8))
    assert out.float().abs().max() == 448  # saturated, not inf


def test_compiles_into_one_graph():
    t, scale = torch.randn(16, 48, dtype=torch.bfloat16), torch.tensor(8.0)
    compiled = torch.compile(lambda a, s: fp8_cast(a, s).float(), fullgraph=True)
    assert torch.equal(compiled(t, scale), fp8_cast_reference(t, scale).float())
