"""The one-pass FP8 cast kernel against ``formats.fp8.fp8_cast``: equal bytes, edge values included."""

from __future__ import annotations

import pytest
import torch

from mxrewrite.formats.fp8 import fp8_cast
from tests.helpers import generator
from tests.ops.kernels.conftest import INTERPRETED, run_interpreter_tests

pytest.importorskip("triton")

from mxrewrite.ops.kernels.fp8_cast import Fp8CastConfig, fp8_cast_triton  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# saturation, ties of e4m3's grid, its subnormals and underflow, signed zeros, inf and NaN
EDGES = [448.0, 464.0, 480.0, 1e30, -1e30, 1.0625, 1.1875, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -6,
         0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan")]


def weights(shape, seed, dtype=torch.float32, device="cpu"):
    t = torch.randn(shape, generator=generator(seed)) * 0.02
    flat = t.view(-1)
    flat[:len(EDGES)] = torch.tensor(EDGES)[:flat.numel()]
    return t.to(dtype).to(device)


def assert_cast(t, scale, config=Fp8CastConfig()):
    out = fp8_cast_triton(t, scale, config)
    assert out.dtype == torch.float8_e4m3fn and out.shape == t.shape and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), fp8_cast(t, scale).view(torch.uint8))


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_kernel_under_triton_interpreter():
    run_interpreter_tests(__file__)


if INTERPRETED:

    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
    @pytest.mark.parametrize("shape", [(64, 64), (3, 100), (1000,)], ids=str)
    def test_interp_matches_the_reference(shape, dtype):
        assert_cast(weights(shape, seed=sum(shape), dtype=dtype), torch.tensor(2.0 ** 14),
                    Fp8CastConfig(block=256, num_warps=1))

    def test_interp_scale_below_one_and_non_contiguous_input():
        t = weights((96, 48), seed=1) * 1e4
        assert_cast(t.t(), torch.tensor(2.0 ** -5), Fp8CastConfig(block=128))

    def test_interp_empty():
        assert fp8_cast_triton(torch.zeros(0, 8), torch.tensor(1.0)).shape == (0, 8)


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [(2048, 8192), (4099, 5), (1,)], ids=str)
def test_gpu_matches_the_reference(shape, dtype):
    assert_cast(weights(shape, seed=shape[0], dtype=dtype, device="cuda"), torch.tensor(2.0 ** 12, device="cuda"))


@gpu
def test_gpu_compiled_graph_contains_the_kernel():
    from torch._inductor.utils import run_and_get_code

    import mxrewrite.ops  # noqa: F401

    t, scale = weights((512, 256), seed=3, device="cuda"), torch.tensor(2.0 ** 10, device="cuda")
    out, codes = run_and_get_code(torch.compile(torch.ops.mxrewrite.fp8_cast, fullgraph=True), t, scale)
    assert any("_fp8_cast_kernel" in code for code in codes)
    assert torch.equal(out.view(torch.uint8), fp8_cast(t, scale).view(torch.uint8))
