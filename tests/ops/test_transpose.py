"""``mxrewrite::transpose_bytes``: the op's CPU path, its errors, and its fake under torch.compile."""

from __future__ import annotations

import pytest
import torch

from mxrewrite.errors import LayoutError
from mxrewrite.ops import transpose_bytes


@pytest.mark.parametrize("dtype", (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2), ids=str)
def test_equals_the_contiguous_transpose(dtype):
    t = torch.randint(0, 256, (33, 70), dtype=torch.uint8).view(dtype)
    out = transpose_bytes(t)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8).t().contiguous())


@pytest.mark.parametrize("t", (torch.zeros(4, 4), torch.zeros(2, 3, 4, dtype=torch.uint8)), ids=("float32", "3-D"))
def test_rejects_other_tensors_with_a_clear_error(t):
    with pytest.raises(LayoutError, match="2-D tensor of one-byte elements"):
        transpose_bytes(t)


def test_compiles_into_one_graph():
    t = torch.randint(0, 256, (16, 48), dtype=torch.uint8)
    compiled = torch.compile(lambda a: transpose_bytes(a.view(torch.float8_e4m3fn)), fullgraph=True)
    assert torch.equal(compiled(t).view(torch.uint8), t.t().contiguous())
