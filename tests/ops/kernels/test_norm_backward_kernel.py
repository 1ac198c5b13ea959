"""The straight-through norm gradient kernel against ``rms_norm_backward_reference``.

The kernel reduces ``<g, x>`` in another order than torch and may fuse
multiply-adds, so results agree to float32 rounding, not bit for bit: each
element within a few float32 ulp of the row's largest term ``|rho * g|``, plus
one rounding of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

from mxrewrite.ops.reference import rms_norm_backward_reference
from tests.helpers import generator
from tests.ops.kernels.conftest import INTERPRETED, run_interpreter_tests

pytest.importorskip("triton")

from mxrewrite.ops.kernels.norm_backward import rms_norm_backward_triton  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(shape, dtype, seed, device="cpu"):
    g = generator(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    rho = 1.0 / x.float().pow(2).mean(-1).add(1e-6).sqrt()
    return grad.to(device), x.to(device), rho.to(device)


def a_gain(hidden, seed, device="cpu"):
    """A float32 gain with mixed signs and magnitudes, as ``1 + gamma`` or a plain weight gives."""
    return (1.0 + 0.5 * torch.randn(hidden, generator=generator(seed))).to(device)


def assert_matches_reference(grad, x, rho, gain=None):
    dx = rms_norm_backward_triton(grad, x, rho, gain)
    ref = rms_norm_backward_reference(grad.cpu(), x.cpu(), rho.cpu(), None if gain is None else gain.cpu())
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.device == x.device
    dx, ref = dx.cpu().double(), ref.double()
    # float32 error of the cancelling sum, relative to the row's largest term, plus the output rounding
    g = grad.cpu().double() * (1.0 if gain is None else gain.cpu().double())
    row_scale = (rho.cpu().double().unsqueeze(-1) * g).abs().amax(-1, keepdim=True)
    out_eps = torch.finfo(x.dtype).eps
    tolerance = 8 * torch.finfo(torch.float32).eps * row_scale + out_eps * ref.abs()
    excess = (dx - ref).abs() - tolerance
    assert not bool((excess > 0).any()), f"{x.dtype} {tuple(x.shape)}: worst excess {excess.max().item():.3g}"


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_kernel_under_triton_interpreter():
    run_interpreter_tests(__file__)


if INTERPRETED:

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_interp_matches_reference(dtype):
        for shape in [(5, 64), (2, 3, 96), (1, 224), (9, 32), (1, 1000)]:
            assert_matches_reference(*inputs(shape, dtype, seed=sum(shape)))
            assert_matches_reference(*inputs(shape, dtype, seed=sum(shape)), gain=a_gain(shape[-1], seed=1))

    def test_interp_empty_and_zero_rho():
        grad, x, rho = inputs((0, 64), torch.float32, seed=0)
        assert rms_norm_backward_triton(grad, x, rho).shape == (0, 64)
        grad, x, rho = inputs((3, 64), torch.float32, seed=1)
        assert_matches_reference(grad, x, torch.zeros_like(rho))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", (2048, 4096, 5120, 8192, 14336, 16384))
def test_gpu_matches_reference(hidden, dtype):
    assert_matches_reference(*inputs((257, hidden), dtype, seed=hidden, device="cuda"))
    assert_matches_reference(*inputs((257, hidden), dtype, seed=hidden, device="cuda"),
                             gain=a_gain(hidden, seed=hidden, device="cuda"))


@gpu
def test_gpu_compiled_graph_contains_the_kernel():
    from torch._inductor.utils import run_and_get_code

    import mxrewrite.ops  # noqa: F401

    grad, x, rho = inputs((128, 4096), torch.bfloat16, seed=3, device="cuda")
    gain = a_gain(4096, seed=3, device="cuda")
    compiled = torch.compile(torch.ops.mxrewrite.rms_norm_backward, fullgraph=True)
    out, codes = run_and_get_code(compiled, grad, x, rho, gain)
    assert any("_rms_norm_backward_kernel" in code for code in codes)
    assert torch.equal(out, rms_norm_backward_triton(grad, x, rho, gain))
