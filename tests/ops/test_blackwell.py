"""Blackwell readiness, checked on CPU: the sm_100 ``torch._scaled_mm`` call of the ``scaled_mm`` backend.

Two things decide whether that call computes the right product on a B200, and both are
checked here without one:

* The block scales' tiled layout (:mod:`mxrewrite.ops.swizzle`): bit for bit against
  torchao's ``to_blocked`` over many shapes, padded ones included, and given back by an
  inverse written here from the layout's description (cuBLAS "1D block scaling factors
  layout"), not from the swizzle's code.
* The call's arguments (:func:`mxrewrite.ops.scaled_mm_args.scaled_mm_args`): run through
  torch's own meta implementation of ``aten._scaled_mm`` (``meta_scaled_mm`` in
  ``torch/_meta_registrations.py``), which checks dtypes, shapes, strides and the scales'
  element counts and returns the output's shape and dtype.

How the meta implementation is made to check what a B200 would: it does not query the
device capability at all (a test below makes ``torch.cuda.get_device_capability`` raise to
show it). It branches on ``device_hint(self)``: a FakeTensor's fake device, a real tensor's
device, and ``"cuda"`` for a plain meta tensor. Only ``"cuda"``/``"xpu"`` get the layout
checks (row-major ``mat_a``, column-major ``mat_b``, dims divisible by 16); ``"cpu"`` skips
them. So the operands here are either plain meta tensors or FakeTensors on a fake CUDA
device (``FakeTensorMode`` creates those in a CPU-only build); FakeTensors made from CPU
tensors would miss the layout checks. Blockwise (MX / NVFP4) scaling is chosen from the
scale dtypes: ``float8_e8m0fnu`` -> 32-element blocks, ``float8_e4m3fn`` -> 16-element blocks.

What the meta implementation cannot see: the order of the bytes inside a scale tensor
of the right size (unswizzled scales of a shape that needs no padding pass it - hence the
bit-exact swizzle tests), and checks only the CUDA kernel makes (no e5m2 x e5m2, sm_100 for
MX) - :func:`scaled_mm_args` refuses e5m2 x e5m2 itself.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch._meta_registrations import device_hint
from torch._subclasses.fake_tensor import FakeTensorMode

from mxrewrite.errors import BlockShapeError, LayoutError, UnsupportedDtypeError
from mxrewrite.formats import get_format
from mxrewrite.ops import matmul, scaled_mm_args as args_module
from mxrewrite.ops.block_matrix import BlockScaledMatrix
from mxrewrite.ops.scaled_mm_args import scaled_mm_args
from mxrewrite.ops.swizzle import swizzle_block_scales, swizzled_numel

E4M3, E5M2, E8M0 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu

# operand rows and scale columns around the 128 x 4 tile edges
SCALE_ROWS = (1, 31, 32, 33, 127, 128, 129, 255, 256, 300, 513)
SCALE_COLS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 33)

# (M, N, K): M and K / block on and off the tile edges; N and K bytes multiples of 16 as _scaled_mm needs
MXFP8_SHAPES = [(1, 16, 32), (127, 48, 96), (128, 128, 128), (200, 32, 256), (300, 272, 1120)]
NVFP4_SHAPES = [(1, 16, 32), (130, 64, 160), (256, 128, 512), (300, 272, 1120)]


def random_bytes(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def unswizzle(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``(rows, cols)`` scales back from the tiled layout, written from its description: 512-byte
    tiles of 128 rows x 4 columns, row tiles outer; inside a tile, byte ``16 * (r % 32) + 4 * (r // 32) + c``."""
    col_tiles = -(-cols // 4)
    p = torch.arange(flat.numel())
    tile, within = p // 512, p % 512
    row = (tile // col_tiles) * 128 + ((within % 16) // 4) * 32 + within // 16
    col = (tile % col_tiles) * 4 + within % 4
    full = torch.empty((-(-rows // 128) * 128, col_tiles * 4), dtype=flat.dtype)
    full[row, col] = flat
    return full


# ---------------------------------------------------------------------------------------------
# The swizzle, numerically on CPU


def test_swizzle_is_torchaos_to_blocked_bit_for_bit():
    to_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils").to_blocked
    for seed, (rows, cols) in enumerate(itertools.product(SCALE_ROWS, SCALE_COLS)):
        raw = random_bytes(rows, cols, seed)
        expected = to_blocked(raw)
        for dtype in (torch.uint8, E8M0, E4M3):  # the bytes move unchanged whatever they encode
            ours = swizzle_block_scales(raw.view(dtype))
            assert ours.dtype == dtype and ours.is_contiguous()
            assert torch.equal(ours.view(torch.uint8), expected), (rows, cols, dtype)


def test_unswizzle_gives_back_the_scales_and_zero_padding():
    for seed, (rows, cols) in enumerate(itertools.product(SCALE_ROWS, SCALE_COLS)):
        raw = random_bytes(rows, cols, seed) | 1  # no zero byte, so zero padding is told apart
        flat = swizzle_block_scales(raw)
        assert flat.shape == (swizzled_numel(rows, cols),)
        full = unswizzle(flat, rows, cols)
        assert torch.equal(full[:rows, :cols], raw), (rows, cols)
        padding = torch.ones_like(full, dtype=torch.bool)
        padding[:rows, :cols] = False
        assert (full[padding] == 0).all(), (rows, cols)


def test_swizzle_of_a_strided_view():
    """Scales sliced out of a wider matrix (not contiguous) swizzle like their contiguous copy."""
    wide = random_bytes(200, 12, 7)
    view = wide[:, 2:9]
    assert torch.equal(swizzle_block_scales(view), swizzle_block_scales(view.contiguous()))


def test_swizzle_refuses_what_it_cannot_tile():
    with pytest.raises(LayoutError, match="2-D"):
        swizzle_block_scales(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(UnsupportedDtypeError, match="block scales"):
        swizzle_block_scales(torch.zeros(4, 4))


# ---------------------------------------------------------------------------------------------
# The _scaled_mm arguments against torch's meta implementation


def device_route(route: str):
    """(context, device) under which tensors reach meta_scaled_mm's CUDA branch (module docstring)."""
    if route == "meta":
        return contextlib.nullcontext(), "meta"
    return FakeTensorMode(), "cuda"


ROUTES = ["meta", "fake-cuda"]


def operand(fmt: str, rows: int, k: int, device: str, elem: torch.dtype | None = None) -> BlockScaledMatrix:
    """An operand with the byte shapes a cast of ``(rows, k)`` has (contents irrelevant to the meta checks)."""
    spec = get_format(fmt)
    data = torch.empty(rows, k // spec.elems_per_byte, dtype=torch.uint8, device=device)
    scales = torch.empty(rows, k // spec.block_size, dtype=torch.uint8, device=device)
    return BlockScaledMatrix(data, scales, torch.ones((), device=device), spec, elem or spec.elem_dtype)


PAIRS = [  # (format, A's element type, B's element type, shapes)
    ("mxfp8", E4M3, E4M3, MXFP8_SHAPES),  # forward
    ("mxfp8", E5M2, E4M3, MXFP8_SHAPES),  # grad_input: e5m2 gradient x e4m3 weight
    ("mxfp8", E4M3, E5M2, MXFP8_SHAPES),  # grad_weight with the gradient as B
    ("nvfp4", torch.float4_e2m1fn_x2, torch.float4_e2m1fn_x2, NVFP4_SHAPES),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt,a_elem,b_elem,shapes", PAIRS, ids=["e4m3xe4m3", "e5m2xe4m3", "e4m3xe5m2", "nvfp4"])
def test_meta_scaled_mm_accepts_the_arguments(monkeypatch, route, fmt, a_elem, b_elem, shapes):
    def no_capability_query(*args, **kwargs):
        raise AssertionError("meta_scaled_mm asked for the device capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_capability_query)
    spec = get_format(fmt)
    context, device = device_route(route)
    with context:
        for m, n, k in shapes:
            a, b = operand(fmt, m, k, device, a_elem), operand(fmt, n, k, device, b_elem)
            mat_a, mat_b, scale_a, scale_b, kwargs = scaled_mm_args(a, b)
            assert device_hint(mat_a) == "cuda"  # the branch with the layout checks
            assert (mat_a.dtype, mat_b.dtype) == (a_elem, b_elem) and scale_a.dtype == scale_b.dtype == spec.scale_dtype
            kb = k // spec.elems_per_byte
            assert mat_a.shape == (m, kb) and mat_a.stride() == (kb, 1)  # row-major
            assert mat_b.shape == (kb, n) and mat_b.stride() == (1, kb)  # column-major
            assert scale_a.numel() == swizzled_numel(m, k // spec.block_size)
            assert scale_b.numel() == swizzled_numel(n, k // spec.block_size)
            out = torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, **kwargs)
            assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.device.type == device


def _refused(*args, match: str, **kwargs):
    with pytest.raises(RuntimeError, match=match):
        torch._scaled_mm(*args, **kwargs)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_meta_scaled_mm_refuses_wrong_layouts(route, fmt):
    """Each mistake the arguments could carry fails the meta implementation: the checks can fail."""
    spec = get_format(fmt)
    other_scale = E4M3 if spec.scale_dtype == E8M0 else E8M0
    context, device = device_route(route)
    with context:
        a, b = operand(fmt, 200, 128, device), operand(fmt, 64, 128, device)
        mat_a, mat_b, scale_a, scale_b, kw = scaled_mm_args(a, b)
        torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, **kw)  # the right arguments pass
        unswizzled = a.scales.view(spec.scale_dtype)  # (200, K / block): rows not padded to 128
        _refused(mat_a, mat_b, unswizzled, scale_b, match="blockwise scaling", **kw)
        # scale dtypes: raw bytes, the other format's scale type, or one of each
        _refused(mat_a, mat_b, scale_a.view(torch.uint8), scale_b.view(torch.uint8), match="float", **kw)
        _refused(mat_a, mat_b, scale_a.view(other_scale), scale_b.view(other_scale), match="blockwise scaling", **kw)
        _refused(mat_a, mat_b, scale_a, scale_b.view(other_scale), match="float", **kw)
        # data dtype: raw bytes
        _refused(a.data, mat_b, scale_a, scale_b, match="fp8 or fp4", **kw)
        # transposed operands: B row-major (not transposed), A column-major
        _refused(mat_a, b.data.view(mat_b.dtype), scale_a, scale_b, match="col_major", **kw)
        column_major_a = torch.empty_strided(mat_a.shape, (1, mat_a.shape[0]), dtype=mat_a.dtype, device=device)
        _refused(column_major_a, mat_b, scale_a, scale_b, match="row_major", **kw)


@pytest.mark.parametrize("fmt,n,k", [("mxfp8", 40, 64), ("nvfp4", 32, 48)])
def test_shape_check_mirrors_the_meta_implementation(monkeypatch, fmt, n, k):
    """N or K bytes not a multiple of 16: scaled_mm_args refuses, and so does the meta implementation
    when the check is skipped - so the backend's fallback condition is the one torch applies."""
    a, b = operand(fmt, 128, k, "meta"), operand(fmt, n, k, "meta")
    with pytest.raises(BlockShapeError, match="multiples of 16"):
        scaled_mm_args(a, b)
    monkeypatch.setattr(args_module, "scaled_mm_shape_ok", lambda a, b: True)
    mat_a, mat_b, scale_a, scale_b, kw = scaled_mm_args(a, b)
    _refused(mat_a, mat_b, scale_a, scale_b, match="divisible by 16", **kw)


def test_two_e5m2_operands_are_refused():
    """The CUDA implementation refuses e5m2 x e5m2 (cuBLASLt has no such GEMM); the meta one does not check."""
    a, b = operand("mxfp8", 128, 64, "meta", E5M2), operand("mxfp8", 32, 64, "meta", E5M2)
    with pytest.raises(UnsupportedDtypeError, match="e5m2"):
        scaled_mm_args(a, b)


def test_scaled_mm_backend_calls_torch_scaled_mm_with_these_arguments(monkeypatch):
    """block_scaled_mm(backend="scaled_mm") on meta operands: torch._scaled_mm runs (its meta implementation)
    for equal element types and fitting shapes, and the other pairs fall back to the emulation."""
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    for fmt, (m, n, k) in (("mxfp8", (200, 48, 96)), ("nvfp4", (130, 64, 160))):
        out = matmul.block_scaled_mm(operand(fmt, m, k, "meta"), operand(fmt, n, k, "meta"), backend="scaled_mm")
        assert out.shape == (m, n) and out.dtype == torch.float32
    assert len(calls) == 2
    mixed = (operand("mxfp8", 64, 64, "meta", E5M2), operand("mxfp8", 32, 64, "meta"))
    both_e5m2 = (operand("mxfp8", 64, 64, "meta", E5M2), operand("mxfp8", 32, 64, "meta", E5M2))
    odd_n = (operand("mxfp8", 64, 64, "meta"), operand("mxfp8", 40, 64, "meta"))
    for a, b in (mixed, both_e5m2, odd_n):
        assert matmul.block_scaled_mm(a, b, backend="scaled_mm").shape == (a.rows, b.rows)
    assert len(calls) == 2
