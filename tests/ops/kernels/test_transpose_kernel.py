"""The tiled transpose kernel against ``t.t().contiguous()``: equal bytes, every tile edge case."""

from __future__ import annotations

import pytest
import torch

from mxrewrite.errors import LayoutError
from tests.helpers import generator
from tests.ops.kernels.conftest import INTERPRETED, run_interpreter_tests

pytest.importorskip("triton")

from mxrewrite.ops.kernels.transpose import TransposeConfig, transpose_triton  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_bytes(shape, seed, device="cpu", dtype=torch.uint8):
    return torch.randint(0, 256, shape, generator=generator(seed), dtype=torch.uint8).to(device).view(dtype)


def assert_transposed(t, config=TransposeConfig()):
    out = transpose_triton(t, config)
    assert out.dtype == t.dtype and out.shape == (t.shape[1], t.shape[0]) and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), t.t().contiguous().view(torch.uint8))


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_kernel_under_triton_interpreter():
    run_interpreter_tests(__file__)


def test_rejects_what_it_cannot_transpose():
    with pytest.raises(LayoutError, match="2-D tensor of one-byte elements"):
        transpose_triton(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="2-D tensor of one-byte elements"):
        transpose_triton(torch.zeros(2, 4, 4, dtype=torch.uint8))


if INTERPRETED:

    @pytest.mark.parametrize("shape", [(64, 64), (128, 32), (1, 96), (100, 3), (65, 129), (7, 1)], ids=str)
    def test_interp_matches_torch(shape):
        assert_transposed(random_bytes(shape, seed=sum(shape)), TransposeConfig(block=32, num_warps=1))

    def test_interp_float8_and_non_contiguous_input():
        assert_transposed(random_bytes((48, 80), seed=1, dtype=torch.float8_e4m3fn), TransposeConfig(block=32))
        wide = random_bytes((40, 96), seed=2)
        assert_transposed(wide[:, 16:80], TransposeConfig(block=16))

    def test_interp_empty():
        assert transpose_triton(random_bytes((0, 64), seed=0)).shape == (64, 0)


@gpu
@pytest.mark.parametrize("shape", [(16384, 4096), (4099, 5120), (14336, 4096), (3, 8192)], ids=str)
@pytest.mark.parametrize("config", [TransposeConfig(), TransposeConfig(128, 8), TransposeConfig(32, 2)], ids=repr)
def test_gpu_matches_torch(shape, config):
    assert_transposed(random_bytes(shape, seed=shape[0], device="cuda", dtype=torch.float8_e4m3fn), config)


@gpu
def test_gpu_compiled_graph_contains_the_kernel():
    from torch._inductor.utils import run_and_get_code

    import mxrewrite.ops  # noqa: F401

    t = random_bytes((512, 4096), seed=3, device="cuda")
    out, codes = run_and_get_code(torch.compile(torch.ops.mxrewrite.transpose_bytes, fullgraph=True), t)
    assert any("_transpose_kernel" in code for code in codes)
    assert torch.equal(out, t.t().contiguous())
