"""Block-scaled matrix products ``A @ B.T`` (mxrewrite.ops.matmul): operand casts, the emulated
backend against exact float64 products, backend selection; the GPU backends against the
emulation where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from mxrewrite.errors import ConfigError
from mxrewrite.formats import mx_dequantize, mx_quantize, nvfp4_dequantize, nvfp4_quantize
from mxrewrite.ops.matmul import (
    BlockScaledMatrix,
    block_scaled_mm,
    default_backend,
    dequantize_matrix,
    mx_matmul,
    quantize_matrix,
)
from tests.helpers import mx_values64, nvfp4_values64


def operands(m, n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-4, 4, (m, 1), generator=g).float())
    b = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 4, (1, k), generator=g).float())
    return a.to(dtype), b.to(dtype)


def values64(m: BlockScaledMatrix) -> torch.Tensor:
    if m.spec.tensor_scale:
        return nvfp4_values64(m.data, m.scales, m.tensor_scale)
    return mx_values64(m.data, m.scales, m.elem_dtype, m.spec.block_size)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_matrix_is_the_format_cast(fmt, dtype):
    a, _ = operands(24, 8, 96, dtype=dtype)
    m = quantize_matrix(a, fmt)
    assert m.data.dtype == m.scales.dtype == torch.uint8 and m.rows == 24
    if fmt == "nvfp4":
        packed, scales, ts = nvfp4_quantize(a)
        assert torch.equal(m.data, packed) and torch.equal(m.scales, scales.view(torch.uint8))
        assert torch.equal(m.tensor_scale, ts) and m.elem_dtype == torch.float4_e2m1fn_x2
        # nvfp4_dequantize rounds tensor_scale * block_scale first (torchao's order); dequantize_matrix
        # multiplies the exact e2m1 * e4m3 product by the tensor scale: one rounding, so within 1 ulp
        torch.testing.assert_close(dequantize_matrix(m, torch.float32), nvfp4_dequantize(packed, scales, ts),
                                   rtol=2.0**-22, atol=0)
    else:
        data, scales = mx_quantize(a)
        assert torch.equal(m.data, data.view(torch.uint8)) and torch.equal(m.scales, scales.view(torch.uint8))
        assert m.tensor_scale.item() == 1.0 and m.elem_dtype == torch.float8_e4m3fn
        assert torch.equal(dequantize_matrix(m, torch.float32), mx_dequantize(data, scales))
        assert torch.equal(dequantize_matrix(m, torch.bfloat16), values64(m).bfloat16())  # MXFP8 fits bf16
    # the correctly rounded exact values (e2m1 * e4m3 * fp32 tensor scale fits a float64)
    assert torch.equal(dequantize_matrix(m, torch.float32), values64(m).float())


def test_quantize_matrix_e5m2_and_floor():
    a, _ = operands(8, 8, 64)
    m = quantize_matrix(a, "mxfp8", scale_mode="floor", elem_dtype=torch.float8_e5m2)
    data, scales = mx_quantize(a, elem_dtype=torch.float8_e5m2, scale_mode="floor")
    assert m.elem_dtype == torch.float8_e5m2
    assert torch.equal(m.data, data.view(torch.uint8)) and torch.equal(m.scales, scales.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_quantize_matrix_of_a_transpose_is_contiguous(fmt):
    """The GEMM kernels need K-contiguous operands; the backward casts transposed views."""
    a, _ = operands(64, 8, 64)
    m, ref = quantize_matrix(a.t(), fmt), quantize_matrix(a.t().contiguous(), fmt)
    assert m.data.is_contiguous() and m.scales.is_contiguous()
    assert torch.equal(m.data, ref.data) and torch.equal(m.scales, ref.scales)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("shape", [(16, 8, 64), (33, 17, 256), (1, 5, 32)], ids=str)
def test_emulated_mm_is_exact_products_with_float32_accumulation(fmt, shape):
    m, n, k = shape
    a, b = operands(m, n, k, seed=k)
    qa, qb = quantize_matrix(a, fmt), quantize_matrix(b, fmt)
    out = block_scaled_mm(qa, qb, backend="emulated")
    assert out.shape == (m, n) and out.dtype == torch.float32
    a64, b64 = values64(qa), values64(qb)
    ref = a64 @ b64.T
    tol = (a64.abs() @ b64.abs().T) * (k * 2.0**-24 + 2.0**-22)
    assert ((out.double() - ref).abs() <= tol).all()
    # and it approximates the unquantised product
    rel = (out.double() - a.double() @ b.double().T).norm() / (a.double() @ b.double().T).norm()
    assert rel < (0.08 if fmt == "mxfp8" else 0.25)


def test_mixed_element_types_fall_back_to_emulation():
    """e5m2 x e4m3 (the MX gradient GEMMs): the native scaled_mm backend only pairs equal types, so
    asking for it gives the emulated product."""
    a, b = operands(32, 16, 64)
    qa = quantize_matrix(a, "mxfp8", elem_dtype=torch.float8_e5m2)
    qb = quantize_matrix(b, "mxfp8")
    assert torch.equal(block_scaled_mm(qa, qb, backend="scaled_mm"), block_scaled_mm(qa, qb, backend="emulated"))


@pytest.mark.parametrize("fmt,a_elem", [("mxfp8", torch.float8_e5m2), ("mxfp8", torch.float8_e4m3fn), ("nvfp4", None)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_scaled_mm_op_against_float64_and_opcheck(fmt, a_elem, out_dtype):
    """``mxrewrite::block_scaled_mm`` (what ``mx_matmul`` calls) computes the exact product of the
    operands' values (float64 here) up to float32 accumulation and one rounding to ``out_dtype``;
    opcheck covers its schema and fake implementation, not its numbers."""
    a, b = operands(40, 24, 128, seed=3)
    qa, qb = quantize_matrix(a, fmt, elem_dtype=a_elem), quantize_matrix(b, fmt)
    args = (qa.data, qa.scales, qa.tensor_scale, qa.elem_dtype, qb.data, qb.scales, qb.tensor_scale, qb.elem_dtype,
            fmt, out_dtype)
    torch.library.opcheck(torch.ops.mxrewrite.block_scaled_mm.default, args)
    out = mx_matmul(qa, qb, out_dtype)
    assert out.shape == (40, 24) and out.dtype == out_dtype
    a64, b64 = values64(qa), values64(qb)
    ref = a64 @ b64.T
    rounding = 2.0**-24 if out_dtype == torch.float32 else 2.0**-8
    tol = (a64.abs() @ b64.abs().T) * (128 * 2.0**-24 + 2.0**-22) + ref.abs() * rounding
    assert ref.abs().min() > 0 and ((out.double() - ref).abs() <= tol).all()


def test_default_backend(monkeypatch):
    monkeypatch.delenv("MXREWRITE_MATMUL", raising=False)
    assert default_backend(torch.device("cpu")) == "emulated"
    monkeypatch.setenv("MXREWRITE_MATMUL", "triton")
    assert default_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("MXREWRITE_MATMUL", "cublas")
    with pytest.raises(ConfigError, match="MXREWRITE_MATMUL"):
        default_backend(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_gpu_backends_match_emulation(fmt):
    """The default GPU backend (Triton on Hopper, torch._scaled_mm on sm_100+) computes the same
    product as the emulation, up to float32-accumulation order and a bfloat16 output."""
    a, b = operands(256, 128, 512, seed=1)
    qa, qb = quantize_matrix(a.cuda(), fmt), quantize_matrix(b.cuda(), fmt)
    backend = default_backend(qa.data.device)
    out = block_scaled_mm(qa, qb, backend=backend)
    ref = values64(quantize_matrix(a, fmt)) @ values64(quantize_matrix(b, fmt)).T
    mag = values64(quantize_matrix(a, fmt)).abs() @ values64(quantize_matrix(b, fmt)).abs().T
    assert ((out.double().cpu() - ref).abs() <= mag * 2.0**-7).all(), backend
