"""FP8 with per-tensor scales (``format="fp8"``): the dynamic cast bit for bit against torchao's tensorwise
float8 cast with power-of-two scales (and an independent float64 restatement), the static scale of a normalised activation, and
``mxrewrite::fp8_mm`` against a dequantised float64 matmul."""

from __future__ import annotations

import math

import pytest
import torch

from mxrewrite.errors import UnsupportedDtypeError
from mxrewrite.formats.fp8 import fp8_dequantize, fp8_quantize, fp8_quantize_with_transpose, static_scale
from mxrewrite.ops.fp8 import fp8_matmul, fp8_mm
from mxrewrite.ops.reference import fp8_activation_scale, norm_cast_reference
from tests.helpers import wide_range

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_DTYPES = (E4M3, E5M2)


def independent_cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensorwise recipe restated: float64 ``max / amax`` rounded to float32, then down to a power of two,
    saturating round to nearest."""
    fmax = torch.finfo(dtype).max
    amax = t.double().abs().max().clamp(min=1e-12)
    scale = 2.0 ** math.floor(math.log2(torch.tensor(fmax / amax.item(), dtype=torch.float64).float().item()))
    scale = torch.tensor(scale, dtype=torch.float32)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), 1.0 / scale


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("src", (torch.bfloat16, torch.float32), ids=str)
def test_dynamic_cast_matches_an_independent_restatement(dtype, src):
    for seed in range(3):
        t = wide_range((33, 64), src, seed=seed)
        data, scale = fp8_quantize(t, dtype)
        ref_data, ref_scale = independent_cast(t, dtype)
        assert data.dtype == dtype and scale.shape == () and scale.dtype == torch.float32
        assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))
        assert scale.item() == pytest.approx(ref_scale.item(), rel=1e-7)
        # the largest magnitude lands in the format's top binade
        assert torch.finfo(dtype).max / 2 < data.float().abs().max().item() <= torch.finfo(dtype).max
        assert math.log2(scale.item()).is_integer()


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_dynamic_cast_is_torchaos_tensorwise_cast(dtype):
    utils = pytest.importorskip("torchao.float8.float8_utils")
    t = wide_range((64, 96), torch.bfloat16, seed=4)
    scale = utils.tensor_to_scale(t, dtype, round_scales_to_power_of_2=True)
    expected = utils.to_fp8_saturated(t.float() * scale, dtype)
    data, dequant = fp8_quantize(t, dtype)
    assert torch.equal(data.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequant, scale.reciprocal())


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_a_slice_casts_its_normal_values_as_the_whole_tensor_does(dtype):
    """Data parallel ranks each scale their own slice: with power-of-two scales every value that is normal in
    both casts dequantises to the same number, so only the format's subnormal range depends on the split."""
    t = torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) * torch.logspace(-1, 1, 96)
    t[32:] *= 9.0
    whole = fp8_dequantize(*fp8_quantize(t, dtype))
    halves = torch.cat([fp8_dequantize(*fp8_quantize(part, dtype)) for part in t.chunk(2)])
    tiny = torch.finfo(dtype).tiny
    normal = torch.cat([(part * (1 / fp8_quantize(part, dtype)[1])).abs() >= tiny for part in t.chunk(2)])
    normal &= (t * (1 / fp8_quantize(t, dtype)[1])).abs() >= tiny
    assert fp8_quantize(t[:32], dtype)[1] != fp8_quantize(t, dtype)[1]      # the slices' scales differ
    assert normal.float().mean() > 0.9
    assert torch.equal(whole[normal], halves[normal])


def test_all_zero_tensor_gets_a_finite_scale():
    data, scale = fp8_quantize(torch.zeros(4, 32))
    assert torch.isfinite(scale) and scale > 0 and not data.float().any()


def test_static_scale_is_the_power_of_two_just_above_bound_over_448():
    for bound in (1.0, 8.0, 64.0, 64.5, 119.7, 448.0, 1e-3):
        s = static_scale(bound)
        assert math.log2(s).is_integer()
        assert bound / s <= 448.0 < 2 * bound / s


@pytest.mark.parametrize("norm", ("rmsnorm", "mxnorm"))
def test_normalised_rows_at_the_bound_do_not_saturate(norm):
    """A one-hot row reaches the norm's bound (sqrt(D) for RMSNorm, K**(1/p)/c for MXNorm): the static scale
    must hold it exactly, not clip it."""
    hidden, correction = 256, 0.418492
    x = torch.zeros(2, hidden)
    x[0, 5], x[1, 200] = 3.0, -0.25
    data, scales, rho, tscale = norm_cast_reference(x, None, fmt="fp8", norm=norm, p=2, scale_mode="rceil",
                                                    eps=0.0, correction=correction)
    assert scales.shape == (2, 0)
    assert tscale.item() == fp8_activation_scale(hidden, norm=norm, p=2, correction=correction)
    value = fp8_dequantize(data.view(E4M3), tscale)
    exact = x * rho.unsqueeze(-1)
    peak = exact.abs().amax(-1)
    assert torch.allclose(value.abs().amax(-1), peak, rtol=2 ** -3)  # e4m3 rounding, no clipping
    assert peak[0].item() == pytest.approx(hidden ** 0.5 if norm == "rmsnorm" else (hidden // 32) ** 0.5 / correction,
                                           rel=1e-6)


def operands(m, n, k, a_dtype=E4M3, b_dtype=E4M3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, sa = fp8_quantize(torch.randn(m, k, generator=g) * 3, a_dtype)
    b, sb = fp8_quantize(torch.randn(n, k, generator=g) / 5, b_dtype)
    return a, b, sa, sb


def dequantised_product(a, b, sa, sb):
    return (a.double() * sa.double()) @ (b.double() * sb.double()).t()


@pytest.mark.parametrize("a_dtype,b_dtype", [(E4M3, E4M3), (E5M2, E4M3)], ids=["e4m3xe4m3", "e5m2xe4m3"])
@pytest.mark.parametrize("m,n,k", [(32, 48, 64), (7, 24, 40), (1, 16, 16)])
def test_fp8_mm_is_the_dequantised_product(m, n, k, a_dtype, b_dtype):
    a, b, sa, sb = operands(m, n, k, a_dtype, b_dtype)
    y = fp8_mm(a, b, sa, sb, torch.float32)
    ref = dequantised_product(a, b, sa, sb)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # _scaled_mm's contract: the second operand (K, N), column-major
    assert torch.equal(fp8_matmul(a, b.t(), sa, sb, torch.float32), y)


def test_fp8_mm_rejects_bad_operands():
    a, b, sa, sb = operands(8, 16, 32)
    with pytest.raises(UnsupportedDtypeError, match="fp8_mm operand a"):
        fp8_mm(a.float(), b, sa, sb, torch.float32)
    with pytest.raises(ValueError, match=r"\(M, K\) by \(N, K\)"):
        fp8_mm(a, b[:, :16], sa, sb, torch.float32)
    with pytest.raises(ValueError, match="0-d"):
        fp8_mm(a, b, sa.reshape(1, 1), sb, torch.float32)


def test_fp8_mm_op_registration():
    """Fake (meta) implementation and autograd registration, as torch.compile and export use them (the
    schema check is left out: it compares outputs with allclose, which has no float8 kernels on CPU)."""
    a, b, sa, sb = operands(16, 32, 64)
    torch.library.opcheck(torch.ops.mxrewrite.fp8_mm.default, (a, b, sa, sb, torch.float32),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_cast_with_transpose_gives_both_layouts_of_one_cast():
    t = wide_range((24, 64), torch.bfloat16, seed=2)
    data, data_t, scale = fp8_quantize_with_transpose(t, E5M2)
    ref_data, ref_scale = fp8_quantize(t, E5M2)
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8)) and torch.equal(scale, ref_scale)
    assert data_t.is_contiguous() and torch.equal(data_t.view(torch.uint8), ref_data.t().view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,n,k", [(4096, 1024, 4096), (100, 1000, 4104), (1, 16, 64)])
def test_fp8_mm_on_the_gpu_is_the_dequantised_product(m, n, k):
    """torch._scaled_mm on FP8 tensor cores (or the float32 fallback before sm_89), padding included."""
    a, b, sa, sb = (t.cuda() for t in operands(m, n, k, E4M3, E5M2, seed=3))
    ref = dequantised_product(a, b, sa, sb)
    for fast in (False, True):
        y = fp8_mm(a, b, sa, sb, torch.float32, fast)
        assert y.shape == (m, n)
        # Hopper's FP8 tensor cores accumulate in reduced precision between float32 promotions (measured on
        # the H200: 1.0e-4 relative at K = 4096 without fast accumulation); a wrong scale or layout is O(1)
        assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-2 if fast else 1e-3)
