"""The Triton block-scaled GEMM (``mxrewrite.ops.kernels.mx_gemm``) and the matmul backend choice.

Tolerance. The kernel multiplies the exact dequantised operands (bfloat16 on
the GPU, float32 under the interpreter; both exact) and accumulates in float32,
so against a float64 product of the same operands its error is accumulation
rounding alone: ``|out - ref| <= K * 2**-23 * (|A| @ |B|^T) * tensor_scales``
(a worst-case bound, twice the round-to-nearest one). Against the emulated
backend the same bound applies on CPU (float32 operands, float32 output); on
CUDA that backend rounds its output to bfloat16, so ``2**-8 * |emulated|`` is
added.

Values below float32's normal range are flushed by the tensor cores (as in
cuBLAS), and ``tl.dot_scaled`` also flushes blocks with E8M0 scale byte 0: the
exhaustive code/scale test checks those limits explicitly.

CPU CI runs the kernels under Triton's interpreter in a child process
(``test_kernels_under_interpreter``, as set out in ``conftest.py``), at tiny
sizes; it skips, saying why, when triton is missing or its interpreter lacks a
feature the kernels use. The GPU tests skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from mxrewrite.errors import BlockShapeError, ConfigError, LayoutError
from mxrewrite.ops import matmul
from mxrewrite.ops.matmul import BlockScaledMatrix, block_scaled_mm, dequantize_matrix, quantize_matrix
from tests.ops.kernels.conftest import CHILD_TIMEOUT_S, INTERPRETED, REPO_ROOT

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and triton")

# (format, A element dtype, B element dtype): MXFP8 forward, the MX backward pair, NVFP4.
FORMATS = [
    ("mxfp8", torch.float8_e4m3fn, torch.float8_e4m3fn),
    ("mxfp8", torch.float8_e5m2, torch.float8_e4m3fn),
    ("nvfp4", None, None),
]
FORMAT_IDS = ["mxfp8", "mx-e5m2xe4m3", "nvfp4"]


def make_pair(fmt, elem_a, elem_b, m, n, k, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    b = torch.randn(n, k, generator=gen) * 0.05
    return (quantize_matrix(a.to(device), fmt, elem_dtype=elem_a),
            quantize_matrix(b.to(device), fmt, elem_dtype=elem_b))


def assert_matches(out, a: BlockScaledMatrix, b: BlockScaledMatrix, emulated=None):
    """``out`` within the accumulation bound of the float64 product (and of the emulated backend).

    Everything is compared on the CPU; an ``emulated`` result computed on CUDA had its output rounded
    to bfloat16, which widens its tolerance.
    """
    out, a, b = out.cpu(), _cpu(a), _cpu(b)
    da = dequantize_matrix(a, torch.float64, with_tensor_scale=False)
    db = dequantize_matrix(b, torch.float64, with_tensor_scale=False)
    tscale = float(a.tensor_scale) * float(b.tensor_scale)
    ref = (da @ db.t()) * tscale
    k = da.shape[1]
    bound = k * 2.0**-23 * (da.abs() @ db.abs().t()) * tscale + 1e-30
    assert out.dtype == torch.float32 and out.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), "NaN positions differ from the reference"
    err = (out.double() - ref).abs()[~nan]
    assert (err <= bound[~nan]).all(), f"max error / bound = {(err / bound[~nan]).max().item():.3g}"
    if emulated is not None:
        slack = 2.0**-8 * emulated.double().abs().cpu() if emulated.is_cuda else 0.0
        diff = (out.double() - emulated.cpu().double()).abs()
        assert (diff <= 2 * bound + slack)[~nan].all(), "differs from the emulated backend beyond rounding"


# ---------------------------------------------------------------------------------------------
# Backend choice (CPU; no triton needed)


def test_cpu_is_emulated(monkeypatch):
    monkeypatch.delenv("MXREWRITE_MATMUL", raising=False)
    assert matmul.default_backend(torch.device("cpu")) == "emulated"


@pytest.mark.parametrize(("capability", "triton_ok", "expected"), [
    ((9, 0), True, "triton"),
    ((8, 9), True, "triton"),
    ((9, 0), False, "emulated"),
    ((10, 0), True, "scaled_mm"),
    ((12, 0), False, "scaled_mm"),
])
def test_cuda_backend_by_capability(monkeypatch, capability, triton_ok, expected):
    from mxrewrite.ops import kernels

    monkeypatch.delenv("MXREWRITE_MATMUL", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernels, "available", lambda: triton_ok)
    assert matmul.default_backend(torch.device("cuda")) == expected


def test_rocm_is_emulated(monkeypatch):
    """The Triton kernel is NVIDIA-only (inline PTX, float8e4nv): ROCm builds keep the emulation."""
    from mxrewrite.ops import kernels

    monkeypatch.delenv("MXREWRITE_MATMUL", raising=False)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(kernels, "available", lambda: True)
    assert matmul.default_backend(torch.device("cuda")) == "emulated"


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("MXREWRITE_MATMUL", "triton")
    assert matmul.default_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("MXREWRITE_MATMUL", "cublas")
    with pytest.raises(ConfigError, match="MXREWRITE_MATMUL"):
        matmul.default_backend(torch.device("cpu"))


def test_mx_linear_forward_runs_the_chosen_gemm(monkeypatch):
    """``mx_linear`` goes through ``block_scaled_mm``: with the triton backend chosen, the Triton GEMM runs once,
    on the activation cast it was given and the weight's MXFP8 cast (checked against the independent float64
    cast of ``tests/reference_model.py``), and what it returns is the layer's output."""
    import mxrewrite.ops.mx_linear  # noqa: F401  (registers the op)
    from tests.reference_model import mx_fake_quant

    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_matrix(x.reshape(-1, 64), "mxfp8")
    product = (mx_fake_quant(x.reshape(-1, 64), "rceil") @ mx_fake_quant(w, "rceil").t()).float()
    calls = []

    def spy(a, b, out_dtype):
        calls.append((a, b, out_dtype))
        return product.clone()

    monkeypatch.setitem(sys.modules, "mxrewrite.ops.kernels.mx_gemm", types.SimpleNamespace(triton_block_scaled_mm=spy))
    monkeypatch.setenv("MXREWRITE_MATMUL", "triton")
    y = torch.ops.mxrewrite.mx_linear(x, torch.ones(3, 5), q.data.reshape(3, 5, 64), q.scales.reshape(3, 5, 2),
                                      q.tensor_scale, w, None, None, "mxfp8", "rceil", False, 1.0, torch.float32, "mx")
    ((a, b, out_dtype),) = calls
    assert (a.elem_dtype, b.elem_dtype, out_dtype) == (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float32)
    assert (a.rows, b.rows) == (15, 48)
    assert torch.equal(a.data, q.data) and torch.equal(a.scales, q.scales)
    assert torch.equal(dequantize_matrix(b, torch.float64), mx_fake_quant(w, "rceil"))
    assert torch.equal(y.reshape(15, 48), product)


# ---------------------------------------------------------------------------------------------
# Operand checks (raise before any launch: no interpreter or GPU needed)


@needs_triton
def test_rejects_mixed_formats():
    from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm

    a = quantize_matrix(torch.randn(4, 64), "mxfp8")
    b = quantize_matrix(torch.randn(4, 64), "nvfp4")
    with pytest.raises(ConfigError, match="one format"):
        triton_block_scaled_mm(a, b)


@needs_triton
def test_rejects_mismatched_k_and_layout():
    from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm

    a = quantize_matrix(torch.randn(4, 64), "mxfp8")
    b = quantize_matrix(torch.randn(4, 96), "mxfp8")
    with pytest.raises(BlockShapeError, match="reduction dim"):
        triton_block_scaled_mm(a, b)
    wide = quantize_matrix(torch.randn(64, 64), "mxfp8")
    transposed = BlockScaledMatrix(wide.data.t(), wide.scales, wide.tensor_scale, wide.spec, wide.elem_dtype)
    with pytest.raises(LayoutError, match="contiguous"):
        triton_block_scaled_mm(transposed, a)
    bad_scales = BlockScaledMatrix(a.data, a.scales[:, :1], a.tensor_scale, a.spec, a.elem_dtype)
    with pytest.raises(BlockShapeError, match="scales"):
        triton_block_scaled_mm(bad_scales, a)
    with pytest.raises(ConfigError, match="method"):
        triton_block_scaled_mm(a, a, method="cutlass")


# ---------------------------------------------------------------------------------------------
# Interpreter (CPU CI): defined only in the child process that runs with TRITON_INTERPRET=1


def _interpreter_skip_reason() -> str | None:
    """Why this triton's interpreter cannot run the kernels, or None.

    A probe kernel uses the features the GEMM needs (float8 bitcasts, interleave,
    3-D reshape, a float32 tl.dot, tl.dot_scaled); only its failure skips, so a
    bug in the GEMM itself still fails the tests.
    """
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, s_ptr, out_ptr, out2_ptr):
        r = tl.arange(0, 16)
        c = tl.arange(0, 32)
        codes = tl.load(x_ptr + r[:, None] * 32 + c[None, :])
        vals = tl.interleave(codes, codes).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        vals = tl.reshape(tl.reshape(vals, (16, 2, 32)) * 2.0, (16, 64))
        tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(vals, tl.trans(vals)))
        scales = tl.load(s_ptr + r[:, None] * 2 + tl.arange(0, 2)[None, :])
        wide = tl.reshape(tl.interleave(codes, codes), (16, 64))
        acc = tl.dot_scaled(wide, scales, "e4m3", tl.trans(wide), scales, "e4m3")
        tl.store(out2_ptr + r[:, None] * 16 + r[None, :], acc)

    x = torch.full((16, 32), 0x38, dtype=torch.uint8)  # e4m3 1.0
    s = torch.full((16, 2), 127, dtype=torch.uint8)
    out, out2 = torch.empty(16, 16), torch.empty(16, 16)
    try:
        probe[(1,)](x, s, out, out2)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means "cannot run here"
        return f"Triton {triton.__version__}'s interpreter lacks a feature the GEMM uses: {exc!r}"[:500]
    if not (torch.all(out == 256.0) and torch.all(out2 == 64.0)):
        return f"Triton {triton.__version__}'s interpreter computes the probe wrongly"
    return None


if INTERPRETED and HAVE_TRITON:
    from mxrewrite.ops.kernels.mx_gemm import TileConfig, triton_block_scaled_mm, triton_dequantize

    _SKIP = _interpreter_skip_reason()
    interp = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

    @interp
    @pytest.mark.parametrize(("fmt", "elem_a", "elem_b"), FORMATS, ids=FORMAT_IDS)
    @pytest.mark.parametrize("method", ["dequant", "dot_scaled", "materialize"])
    @pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 32), (17, 33, 96), (32, 24, 128)])
    def test_interp_matches_reference(fmt, elem_a, elem_b, method, m, n, k):
        a, b = make_pair(fmt, elem_a, elem_b, m, n, k, seed=m * n + k)
        out = triton_block_scaled_mm(a, b, method=method)
        assert_matches(out, a, b, emulated=block_scaled_mm(a, b, backend="emulated"))

    @interp
    @pytest.mark.parametrize(("fmt", "elem_a", "elem_b"), FORMATS, ids=FORMAT_IDS)
    def test_interp_single_block_k_tile(fmt, elem_a, elem_b):
        """A K tile of one MX block (the scale broadcast over a single block)."""
        a, b = make_pair(fmt, elem_a, elem_b, 20, 40, 64, seed=3)
        out = triton_block_scaled_mm(a, b, config=TileConfig(16, 32, 32, group_m=1, num_stages=1, num_warps=1))
        assert_matches(out, a, b)

    @interp
    def test_interp_nan_and_extreme_scales():
        """Scale byte 0xFF makes its block NaN; byte 0 (2**-127) and 240 (2**113) stay exact."""
        a, b = make_pair("mxfp8", None, None, 4, 16, 64, seed=5)
        a.scales[0, 1] = 255
        a.scales[1, 0] = 0
        a.scales[2, 0] = 240
        b.scales[:, 0] = 100
        out = triton_block_scaled_mm(a, b)
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
        assert_matches(out, a, b)

    @interp
    @pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
    def test_interp_dequantize(fmt):
        m = quantize_matrix(torch.randn(19, 96), fmt)
        expected = dequantize_matrix(m, torch.float32, with_tensor_scale=False)
        torch.testing.assert_close(triton_dequantize(m), expected, rtol=0, atol=0)


@needs_triton
def test_kernels_under_interpreter():
    """Re-run this file's ``test_interp_*`` tests with TRITON_INTERPRET=1 (a child process, no GPU)."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "interp_", __file__]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"interpreter run failed (exit {proc.returncode}):\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")
    if " passed" not in proc.stdout:
        reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
        pytest.skip("interpreter run skipped everything: " + (reasons[0] if reasons else proc.stdout[-500:]))


# ---------------------------------------------------------------------------------------------
# GPU


@needs_cuda
@pytest.mark.gpu
def test_gpu_default_backend_is_triton_below_sm100(monkeypatch):
    monkeypatch.delenv("MXREWRITE_MATMUL", raising=False)
    expected = "scaled_mm" if torch.cuda.get_device_capability()[0] >= 10 else "triton"
    assert matmul.default_backend(torch.device("cuda")) == expected


# A fixed tile keeps compile time down; one autotuned case per format covers the public path.
GPU_SHAPES = [(1, 256, 4096), (77, 200, 96), (300, 136, 1056), (512, 384, 512)]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "elem_a", "elem_b"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("method", ["dequant", "dot_scaled", "materialize"])
@pytest.mark.parametrize(("m", "n", "k"), GPU_SHAPES)
def test_gpu_matches_emulated(fmt, elem_a, elem_b, method, m, n, k):
    from mxrewrite.ops.kernels.mx_gemm import TileConfig, triton_block_scaled_mm

    if method == "dot_scaled" and fmt == "nvfp4":
        pytest.skip("tl.dot_scaled takes E8M0 scales only; NVFP4 always dequantises")
    a, b = make_pair(fmt, elem_a, elem_b, m, n, k, device="cuda", seed=m + n + k)
    config = None if (m, n, k) == (512, 384, 512) else TileConfig(128, 128, 64, num_stages=3, num_warps=4)
    out = triton_block_scaled_mm(a, b, method=method, config=config)
    assert_matches(out, a, b, emulated=block_scaled_mm(a, b, backend="emulated"))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dequant", "dot_scaled", "materialize"])
def test_gpu_nan_and_extreme_scales(method):
    from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm

    a, b = make_pair("mxfp8", None, None, 130, 128, 256, device="cuda", seed=7)
    a.scales[0, 1] = 255
    a.scales[1, 0] = 0
    a.scales[2, 3] = 240
    b.scales[:, 3] = 100
    out = triton_block_scaled_mm(a, b, method=method)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
    assert_matches(out, a, b)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_gpu_dequantize(fmt):
    from mxrewrite.ops.kernels.mx_gemm import triton_dequantize

    m = quantize_matrix(torch.randn(333, 4096 + 64, device="cuda"), fmt)
    expected = dequantize_matrix(m, torch.bfloat16, with_tensor_scale=False)
    torch.testing.assert_close(triton_dequantize(m), expected, rtol=0, atol=0)


def _cpu(m: BlockScaledMatrix) -> BlockScaledMatrix:
    return BlockScaledMatrix(m.data.cpu(), m.scales.cpu(), m.tensor_scale.cpu(), m.spec, m.elem_dtype)


def _every_code_matrix(elem: torch.dtype, max_scale: int) -> BlockScaledMatrix:
    """255 rows x 256 columns holding every finite code of ``elem`` with scale bytes 0..max_scale."""
    from mxrewrite.formats import MXFP8

    codes = torch.arange(256, dtype=torch.uint8)
    finite = torch.isfinite(codes.view(elem).float())
    row = torch.where(finite, codes, torch.zeros_like(codes))
    data = row.repeat(255, 1)
    scales = ((torch.arange(255).unsqueeze(1) + 31 * torch.arange(8)) % (max_scale + 1)).to(torch.uint8)
    return BlockScaledMatrix(data.cuda(), scales.cuda(), torch.ones((), device="cuda"), MXFP8, elem)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("elem", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_gpu_every_mx_code_and_scale(elem):
    """Every finite code under every scale byte: the unpacking is exact, subnormals and extremes included."""
    from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm, triton_dequantize

    a = _every_code_matrix(elem, max_scale=254)
    expected = dequantize_matrix(a, torch.bfloat16, with_tensor_scale=False)
    assert torch.equal(triton_dequantize(a).view(torch.int16), expected.view(torch.int16))
    # A @ I picks each element out unchanged (one exact product per output; scales kept finite),
    # except that the tensor cores flush values below float32's normal range, as cuBLAS does.
    a = _every_code_matrix(elem, max_scale=230)
    eye = quantize_matrix(torch.eye(256, device="cuda"), "mxfp8")
    exact = dequantize_matrix(a, torch.bfloat16, with_tensor_scale=False).float()
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    for method in ("dequant", "materialize"):
        out = triton_block_scaled_mm(a, eye, method=method)
        assert torch.equal(out[normal], exact[normal]), method
        assert (out[~normal].abs() < torch.finfo(torch.float32).tiny).all(), method
    # tl.dot_scaled (Triton 3.6 on sm_90) also flushes the blocks whose scale byte is 0 (2**-127)
    out = triton_block_scaled_mm(a, eye, method="dot_scaled")
    kept = normal & (a.scales.repeat_interleave(32, dim=1) != 0)
    assert torch.equal(out[kept], exact[kept])


@needs_cuda
@pytest.mark.gpu
def test_gpu_every_nvfp4_code_and_scale():
    from mxrewrite.formats import NVFP4
    from mxrewrite.ops.kernels.mx_gemm import triton_block_scaled_mm, triton_dequantize

    codes = torch.arange(256, dtype=torch.uint8).repeat(126, 1)  # every pair of codes, 512 elements a row
    scale_bytes = torch.arange(126 * 32) % 127  # every finite positive e4m3 scale, subnormals included
    a = BlockScaledMatrix(codes.cuda(), scale_bytes.reshape(126, 32).to(torch.uint8).cuda(),
                          torch.tensor(0.75, device="cuda"), NVFP4, NVFP4.elem_dtype)
    expected = dequantize_matrix(a, torch.bfloat16, with_tensor_scale=False)
    assert torch.equal(triton_dequantize(a).view(torch.int16), expected.view(torch.int16))
    b, _ = make_pair("nvfp4", None, None, 1, 40, 512, device="cuda")
    assert_matches(triton_block_scaled_mm(a, b), a, b, emulated=block_scaled_mm(a, b, backend="emulated"))
