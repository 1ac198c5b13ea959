"""NVFP4 casts (e2m1 elements, e4m3 block scales, fp32 tensor scale) against torchao, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrewrite.errors import BlockShapeError, LayoutError, UnsupportedDtypeError
from mxrewrite.formats import nvfp4_dequantize, nvfp4_quantize, tensor_scale_from_amax
from mxrewrite.formats.nvfp4 import MIN_TENSOR_SCALE
from tests.helpers import assert_same_bits, e2m1_half_ulp, edge_rows, generator, nvfp4_values64, wide_range

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

SHAPES = [(4, 16), (4, 32), (3, 5, 64), (2, 3, 2, 128), (3, 1024), (2, 16384)]
DTYPES = (torch.bfloat16, torch.float32)


def ao_quantize(x, tensor_scale):
    scales, packed = nvfp4_tensor.nvfp4_quantize(x, 16, tensor_scale)
    return packed.view(torch.uint8), scales


def assert_matches_torchao(x: torch.Tensor, tensor_scale: torch.Tensor, what: str) -> None:
    packed, scales, ts = nvfp4_quantize(x, tensor_scale)
    ao_packed, ao_scales = ao_quantize(x, tensor_scale)
    assert packed.dtype == torch.uint8 and scales.dtype == torch.float8_e4m3fn
    assert packed.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert scales.shape == (*x.shape[:-1], x.shape[-1] // 16)
    assert ts.shape == () and ts.dtype == torch.float32
    assert_same_bits(packed, ao_packed.reshape(packed.shape), f"{what}: packed data")
    assert_same_bits(scales, ao_scales.reshape(scales.shape), f"{what}: block scales")
    assert_same_bits(ts, tensor_scale.float(), f"{what}: tensor scale")


def tensor_scales(x: torch.Tensor) -> list[torch.Tensor]:
    """Several given per-tensor scales: torchao's amax rule, 1, and ones that push block scales to their clamps."""
    amax = x.float().abs().nan_to_num(0.0, 0.0, 0.0).amax()
    return [nvfp4_tensor.per_tensor_amax_to_scale(amax), torch.tensor(1.0), torch.tensor(2.0**-100),
            torch.tensor(3.5e-3), torch.tensor(1e6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_matches_torchao(dtype, shape):
    x = wide_range(shape, dtype, seed=sum(shape) + len(shape) + (dtype == torch.float32))
    for t in tensor_scales(x):
        assert_matches_torchao(x, t, f"{dtype} {shape} tensor scale {t.item():g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_cases_match_torchao(dtype):
    rows, names = edge_rows(32)
    x = rows.to(dtype)
    for i, name in enumerate(names):
        for t in (torch.tensor(1.0), torch.tensor(0.37), torch.tensor(2.0**-100)):
            assert_matches_torchao(x[i:i + 1], t, f"{name} tensor scale {t.item():g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 32), (3, 5, 64), (2, 16384)], ids=str)
def test_dequantize_matches_torchao(dtype, shape):
    x = wide_range(shape, dtype, seed=7)
    t = nvfp4_tensor.per_tensor_amax_to_scale(x.float().abs().amax())
    packed, scales, ts = nvfp4_quantize(x, t)
    theirs = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=t)
    for out_dtype in DTYPES:
        ours = nvfp4_dequantize(packed, scales, ts, out_dtype=out_dtype)
        assert ours.shape == x.shape and ours.dtype == out_dtype
        assert_same_bits(ours, theirs.dequantize(out_dtype), f"dequantize to {out_dtype}")


def test_dequantize_4d_equals_2d():
    """torchao's NVFP4Tensor takes 2-D/3-D only: a 4-D tensor must decode like its 2-D reshape."""
    x = wide_range((2, 3, 2, 64), torch.bfloat16, seed=9)
    packed, scales, ts = nvfp4_quantize(x, torch.tensor(0.01))
    flat = nvfp4_dequantize(packed.reshape(-1, 32), scales.reshape(-1, 4), ts)
    assert torch.equal(nvfp4_dequantize(packed, scales, ts), flat.reshape(x.shape))


def test_edge_case_dequantize_matches_torchao():
    rows, names = edge_rows(32)
    t = torch.tensor(0.37)
    packed, scales, ts = nvfp4_quantize(rows, t)
    theirs = nvfp4_tensor.NVFP4Tensor.to_nvfp4(rows, per_tensor_scale=t).dequantize(torch.float32)
    assert_same_bits(nvfp4_dequantize(packed, scales, ts), theirs, "edge-case dequantize")


def test_nan_block():
    """e2m1 has no NaN. Ours (like torchao) gives a NaN block a NaN e4m3 scale byte (0x7F), so
    the whole block dequantises to NaN; the element codes are whatever e2m1's integer
    encoding makes of the NaN bit pattern (bit-identical to torchao, checked above). The
    neighbouring block is unaffected."""
    x = torch.randn(1, 32, generator=generator(30))
    x[0, 3] = float("nan")
    packed, scales, ts = nvfp4_quantize(x, torch.tensor(0.01))
    assert scales.view(torch.uint8)[0, 0].item() & 0x7F == 0x7F
    deq = nvfp4_dequantize(packed, scales, ts)
    assert deq[0, :16].isnan().all()
    assert deq[0, 16:].isfinite().all()


def test_inf_saturates_to_six_block_scales():
    x = torch.randn(1, 16, generator=generator(31))
    x[0, 2] = float("inf")
    x[0, 5] = float("-inf")
    t = torch.tensor(2.0**-7)
    packed, scales, ts = nvfp4_quantize(x, t)
    assert scales.float().item() == 448.0
    deq = nvfp4_dequantize(packed, scales, ts)
    assert deq[0, 2].item() == 6 * 448 * t.item() and deq[0, 5].item() == -6 * 448 * t.item()


def test_default_tensor_scale():
    """Without a given scale: amax / (6 * 448), torchao's ``per_tensor_amax_to_scale``; an all-zero
    tensor gets 1.0 (torchao would divide by 0 and return NaN) and encodes to zeros."""
    x = wide_range((4, 64), torch.float32, seed=11)
    _, _, ts = nvfp4_quantize(x)
    assert_same_bits(ts, nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax()), "tensor scale")
    packed, scales, ts = nvfp4_quantize(torch.zeros(2, 32))
    assert ts.item() == 1.0
    assert (nvfp4_dequantize(packed, scales, ts) == 0).all()


@pytest.mark.parametrize("amax", [1e-30, 1e-36, 1e-40, 1e-45])
def test_default_tensor_scale_of_a_tiny_tensor_stays_finite(amax):
    """torchao's rule amax / 2688 gives so small a scale that ``(1 / t) / s`` overflows to inf, and the
    zeros of the tensor encode as NaN codes (decoded as nonzero values); ours clamps the default
    scale to MIN_TENSOR_SCALE = 2**-120, which keeps every block finite and zeros zero."""
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[1, 17] = amax, -amax / 2, amax / 3
    packed, scales, ts = nvfp4_quantize(x)
    assert ts.item() >= MIN_TENSOR_SCALE == 2.0**-120
    deq = nvfp4_dequantize(packed, scales, ts)
    assert deq.isfinite().all()
    assert (deq[x == 0] == 0).all()
    expected = torch.clamp(torch.tensor(amax) / 2688.0, min=MIN_TENSOR_SCALE)
    assert_same_bits(tensor_scale_from_amax(torch.tensor(amax)), expected, "default tensor scale")


def test_float16_input_equals_its_float32_upcast():
    x = wide_range((4, 64), torch.float32, seed=3).to(torch.float16)
    t = torch.tensor(0.02)
    for a, b in zip(nvfp4_quantize(x, t), nvfp4_quantize(x.float(), t)):
        assert_same_bits(a, b, "float16 vs float32")


@pytest.mark.parametrize("view", ["transpose", "strided"])
def test_non_contiguous_input_equals_contiguous(view):
    base = wide_range((64, 128), torch.bfloat16, seed=5)
    x = {"transpose": base.t(), "strided": base[::2, ::2]}[view]
    assert not x.is_contiguous()
    for a, b in zip(nvfp4_quantize(x, torch.tensor(1e-3)), nvfp4_quantize(x.contiguous(), torch.tensor(1e-3))):
        assert_same_bits(a, b, view)
    for a, b in zip(nvfp4_quantize(x), nvfp4_quantize(x.contiguous())):
        assert_same_bits(a, b, view + " (default tensor scale)")


def test_block_shape_error():
    with pytest.raises(BlockShapeError, match="NVFP4 block size 16") as info:
        nvfp4_quantize(torch.randn(4, 40))
    assert isinstance(info.value, ValueError)
    packed, scales, ts = nvfp4_quantize(torch.randn(4, 64))
    # scales that do not match, including broadcastable ones that would silently decode other rows' blocks
    for bad in (scales[:, :2], scales[:1], scales.reshape(2, 8)):
        with pytest.raises(BlockShapeError, match="do not match"):
            nvfp4_dequantize(packed, bad.contiguous(), ts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8], ids=str)
def test_unsupported_input_dtype(dtype):
    with pytest.raises(UnsupportedDtypeError) as info:
        nvfp4_quantize(torch.ones(2, 32).to(dtype))
    assert isinstance(info.value, TypeError)
    for name in ("torch.bfloat16", "torch.float16", "torch.float32"):
        assert name in str(info.value)


def test_dequantize_rejects_non_contiguous():
    packed, scales, ts = nvfp4_quantize(torch.randn(64, 64))
    with pytest.raises(LayoutError, match="contiguous"):
        nvfp4_dequantize(packed.t(), scales, ts)
    with pytest.raises(LayoutError):
        nvfp4_dequantize(packed, scales.t(), ts)


# ---- property: dequantize(quantize(x)) is within half an e2m1 ulp at the block's scale ----

@st.composite
def finite_rows(draw, dtype):
    """A few 16-element blocks of finite values; the tensor's amax stays >= 2**-100 so that the
    default tensor scale (amax / 2688) and the block scales are normal float32 numbers."""
    n = draw(st.integers(1, 4)) * 16
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(min_value=-(2.0**126), max_value=2.0**126, width=32), min_size=n, max_size=n))
        x = torch.tensor(values, dtype=torch.float32)
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
        x = x * 2.0 ** draw(st.integers(-60, 60))
    x[draw(st.integers(0, n - 1))] = draw(st.floats(2.0**-100, 2.0**126, width=32)) * draw(st.sampled_from([1, -1]))
    return x.to(dtype).nan_to_num(posinf=0.0, neginf=0.0).reshape(-1, 16)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_roundtrip_error_at_most_half_ulp(data, dtype):
    """|dq(q(x)) - x| <= S * ulp_e2m1(|x| / S) / 2, S = tensor scale * block scale, with the default
    tensor scale; plus saturation above 6 * S (the e4m3 block scale rounds the block max to
    within 2**-4, so the max may land a little above 6) and a few float32 ulps for the
    rounded reciprocal ``(1 / t) / s`` the cast multiplies by."""
    x = data.draw(finite_rows(dtype))
    packed, scales, ts = nvfp4_quantize(x)
    deq = nvfp4_values64(packed, scales.view(torch.uint8), ts)
    x64 = x.double()
    scale = (scales.double() * ts.double()).repeat_interleave(16, -1)
    v = x64.abs() / scale
    bound = scale * torch.maximum(e2m1_half_ulp(v), v - 6) + x64.abs() * 2.0**-21
    err = (deq - x64).abs()
    ok = err <= bound
    assert ok.all(), f"x={x64[~ok].tolist()} dq={deq[~ok].tolist()} bound={bound[~ok].tolist()}"
