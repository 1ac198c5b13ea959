"""The fused norm-cast Triton kernel against the torch reference, bit for bit.

On CPU the kernel runs under Triton's interpreter (small shapes, every mode and
the edge cases of the formats); on a GPU over the hidden sizes of real models.
Data and block scales must be bit-identical to ``norm_cast_reference``. ``rho``
must be bit-identical for MXNorm (its power mean is summed in float64); for the
exact RMSNorm the float32 sum of squares runs in a different order, so ``rho``
may differ by a couple of ulp, and data and scales are compared with the
reference cast of ``x * rho_kernel``.

NaN: every e4m3 NaN code (0x7F, 0xFF) counts as the same value, and NVFP4 blocks
with a NaN scale are compared by their scale only (e2m1 has no NaN; the codes of
such a block are arbitrary, see ``mxrewrite.formats.nvfp4``).
"""

from __future__ import annotations

import math

import pytest
import torch

from mxrewrite.formats import get_format, mx_quantize, nvfp4_quantize
from mxrewrite.ops.reference import norm_cast_reference, static_scale_base
from tests.helpers import edge_rows, generator, wide_range
from tests.ops.kernels.conftest import INTERPRETED, run_interpreter_tests

triton = pytest.importorskip("triton")
tl = triton.language

from mxrewrite.ops.kernels.codecs import (  # noqa: E402
    e2m1_pack,
    e4m3_encode,
    f32_divide,
    nvfp4_block_scales,
    nvfp4_tensor_scale_inverses,
)
from mxrewrite.ops.kernels.norm_cast import (  # noqa: E402
    LaunchConfig,
    block_runs,
    chunk_blocks_for,
    launch_config,
    norm_cast_triton,
)

CORRECTION = 0.418492
# (norm, p, eps_in_root)
NORM_CASES = [("mxnorm", 2, True), ("mxnorm", 1, True), ("rmsnorm", 2, True), ("rmsnorm", 2, False)]
NORM_IDS = ["mxnorm-p2", "mxnorm-p1", "rmsnorm", "rmsnorm-eps-outside-root"]
FORMATS = ("mxfp8", "nvfp4")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GAINS = [(False, 0.0), (True, 0.0), (True, 1.0)]  # (has gamma, gamma_offset)
# float32 sums of squares in two orders differ by a few ulp, and an ulp of mean(x**2) is up to two of rho
# (measured on the H100: at most 4 over 16M rows)
ULP_TOLERANCE_RMSNORM = 8

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------- comparisons

def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bits as integers in the order of the values (for ulp distances)."""
    b = t.float().contiguous().view(torch.int32).long()
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def assert_rho_close(ours: torch.Tensor, ref: torch.Tensor, max_ulp: int, what: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32, f"{what}: rho {ours.shape} {ours.dtype}"
    ours, ref = ours.cpu(), ref.cpu()
    nan_o, nan_r = ours.isnan(), ref.isnan()
    assert torch.equal(nan_o, nan_r), f"{what}: rho NaN at different rows"
    dist = (ordered_bits(ours) - ordered_bits(ref)).abs()[~nan_o]
    worst = dist.max().item() if dist.numel() else 0
    assert worst <= max_ulp, f"{what}: rho differs by {worst} ulp (allowed {max_ulp})"


def nan_blocks(fmt: str, scales: torch.Tensor) -> torch.Tensor:
    """Blocks whose scale byte is NaN (E8M0 0xFF; e4m3 0x7F / 0xFF)."""
    if fmt == "mxfp8":
        return scales == 0xFF
    return (scales & 0x7F) == 0x7F


def assert_cast_equal(fmt: str, ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
                      what: str) -> None:
    (data, scales), (ref_data, ref_scales) = [(d.cpu(), s.cpu()) for d, s in (ours, ref)]
    for name, a, b in (("data", data, ref_data), ("scales", scales, ref_scales)):
        assert a.dtype == torch.uint8 and a.shape == b.shape, f"{what}: {name} {a.shape} {a.dtype} vs {b.shape}"
    same_scales = (scales == ref_scales) | (nan_blocks(fmt, scales) & nan_blocks(fmt, ref_scales))
    assert_no_difference(same_scales, scales, ref_scales, f"{what}: scales")

    spec = get_format(fmt)
    if fmt in ("mxfp8", "fp8"):
        same_data = (data == ref_data) | (((data & 0x7F) == 0x7F) & ((ref_data & 0x7F) == 0x7F))
    else:
        bytes_per_block = spec.block_size // spec.elems_per_byte
        skip = nan_blocks(fmt, ref_scales).repeat_interleave(bytes_per_block, dim=-1)
        same_data = (data == ref_data) | skip
    assert_no_difference(same_data, data, ref_data, f"{what}: data")


def assert_no_difference(same: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} bytes differ, first at {first} "
                             f"(ours {ours[first].item():#04x}, reference {ref[first].item():#04x})")


def applied_gain(gamma, gamma_offset):
    """The gain a rewritten norm hands the cast: ``gamma``, or Gemma's ``1 + gamma`` in float32."""
    return gamma.float() + gamma_offset if gamma is not None and gamma_offset else gamma


def reference_cast(x, gamma, rho, *, fmt, scale_mode, tensor_scale):
    """The reference's cast of ``x * rho (* gain)`` for a given ``rho`` (``norm_cast_reference``'s tail)."""
    spec = get_format(fmt)
    xhat = x.float() * rho.unsqueeze(-1)
    if gamma is not None:
        xhat = xhat * gamma.float()
    if not spec.block_scaled:
        data = (xhat / tensor_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = torch.empty((*x.shape[:-1], 0), dtype=torch.uint8)
    elif spec.tensor_scale:
        data, scales, _ = nvfp4_quantize(xhat, tensor_scale)
    else:
        data, scales = mx_quantize(xhat, elem_dtype=spec.elem_dtype, block_size=spec.block_size,
                                   scale_mode=scale_mode)
    return data.view(torch.uint8), scales.view(torch.uint8)


def check_against_reference(x, gamma, *, fmt, norm, p, eps_in_root=True, scale_mode="rceil", eps=1e-6,
                            gamma_offset=0.0, correction=CORRECTION, what="", launch_cfg=None):
    """Run the kernel on ``x`` (CPU or GPU) and compare with the reference evaluated on CPU; with
    ``gamma_offset`` both get the gain ``gamma + offset`` (what a rewritten norm of Gemma's form passes)."""
    gamma = applied_gain(gamma, gamma_offset)
    kwargs = dict(fmt=fmt, norm=norm, p=p, scale_mode=scale_mode, eps=eps, correction=correction,
                  eps_in_root=eps_in_root)
    data, scales, rho, tscale = norm_cast_triton(x, gamma, launch_cfg=launch_cfg, **kwargs)
    x_cpu = x.cpu()
    gamma_cpu = gamma.cpu() if gamma is not None else None
    ref_data, ref_scales, ref_rho, ref_tscale = norm_cast_reference(x_cpu, gamma_cpu, **kwargs)
    what = what or f"{fmt} {norm} p={p} {x.dtype} {tuple(x.shape)} gamma={gamma is not None}"

    assert tscale.shape == () and tscale.dtype == torch.float32
    assert torch.equal(tscale.cpu().view(torch.int32), ref_tscale.view(torch.int32)), f"{what}: tensor scale"
    assert_rho_close(rho, ref_rho, 0 if norm == "mxnorm" else ULP_TOLERANCE_RMSNORM, what)
    expected = reference_cast(x_cpu, gamma_cpu, rho.cpu(), fmt=fmt, scale_mode=scale_mode, tensor_scale=ref_tscale)
    if norm == "mxnorm":
        expected = (ref_data, ref_scales)
    assert_cast_equal(fmt, (data, scales), expected, what)
    return data, scales, rho, tscale


def gaussian_rows(shape, dtype, seed, device="cpu"):
    """Gaussian rows, each at its own scale (2**-8 .. 2**8), shifted off zero mean."""
    g = generator(seed)
    row_scale = torch.exp2(torch.randint(-8, 9, (*shape[:-1], 1), generator=g).float())
    x = (torch.randn(shape, generator=g) + 0.25) * row_scale
    return x.to(dtype).to(device)


def random_rows(shape, dtype, seed, device="cpu"):
    """Wide-range rows (subnormals to 2**60) for bf16/fp32; float16 cannot hold them, so Gaussian rows."""
    if dtype == torch.float16:
        return gaussian_rows(shape, dtype, seed, device)
    return wide_range(shape, dtype, seed).to(device)


def gain(hidden, dtype, seed, device="cpu"):
    return (torch.randn(hidden, generator=generator(seed)) * 0.5 + 0.1).to(dtype).to(device)


def codec_inputs(stride: int) -> torch.Tensor:
    """float32 values covering the e4m3 and e2m1 ranges (every ``stride``-th bit pattern below 2**9,
    both signs) plus infinities, NaN, the largest floats and exact ties."""
    pos = torch.arange(0, 0x44000000, stride, dtype=torch.int64).to(torch.int32).view(torch.float32)
    specials = torch.tensor([float("inf"), float("nan"), 448.0, 464.0, 465.0, 480.0, 3e38, 2.0**-10, 2.0**-9,
                             0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0])
    return torch.cat([pos, -pos, specials, -specials])


@triton.jit
def encode_kernel(x_ptr, e4m3_ptr, e2m1_ptr, pair_ptr, n, HW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(x_ptr + offs, mask=offs < n)
    partner = tl.load(x_ptr + (n - 1 - offs), mask=offs < n)  # x reversed: every value meets another
    tl.store(e4m3_ptr + offs, e4m3_encode(y, HW), mask=offs < n)
    tl.store(e2m1_ptr + offs, e2m1_pack(y, tl.zeros_like(y), HW), mask=offs < n)  # (+0 -> code 0)
    tl.store(pair_ptr + offs, e2m1_pack(y, partner, HW), mask=offs < n)


def encode_with_codecs(x: torch.Tensor, hardware_fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel codecs over ``x``: (e4m3 bytes, e2m1 codes, e2m1 pairs of ``x`` and ``x`` reversed)."""
    e4m3 = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    e2m1 = torch.empty_like(e4m3)
    pairs = torch.empty_like(e4m3)
    block = 1 << 16 if x.device.type == "cpu" else 1024
    encode_kernel[(triton.cdiv(x.numel(), block),)](x, e4m3, e2m1, pairs, x.numel(), HW=hardware_fp8, BLOCK=block)
    return e4m3.cpu(), e2m1.cpu(), pairs.cpu()


def assert_codecs_match_reference(x: torch.Tensor, e4m3: torch.Tensor, e2m1: torch.Tensor, pairs: torch.Tensor,
                                  what: str) -> None:
    from mxrewrite.formats.e2m1 import e2m1_encode

    x = x.cpu()
    nan = x.isnan()
    want_e4m3 = torch.clamp(x, -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    same = (e4m3 == want_e4m3) | (nan & ((e4m3 & 0x7F) == 0x7F))
    assert_no_difference(same, e4m3, want_e4m3, f"{what} e4m3 encode")
    want_e2m1 = e2m1_encode(torch.clamp(x, -6.0, 6.0))
    same = (e2m1 == want_e2m1) | nan
    assert_no_difference(same, e2m1, want_e2m1, f"{what} e2m1 encode")
    want_pairs = want_e2m1 | want_e2m1.flip(0) << 4
    same = (pairs == want_pairs) | nan | nan.flip(0)
    assert_no_difference(same, pairs, want_pairs, f"{what} e2m1 pack")


# per-tensor scales for the block-scale arithmetic: the floor 2**-120, ordinary ones, and those whose
# 1 / t / s is subnormal (t > 2**117) or zero (t = inf)
TENSOR_SCALES = [2.0**-120, 3.1e-36, 0.0123, 1.0, 0.37 * 2**40, 2.0**117 * 1.37, 2.0**125 * 1.9, float("inf")]
E4M3_NORMALS = torch.arange(0x08, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def nonnegative_floats(stride: int) -> torch.Tensor:
    """Every ``stride``-th float32 from 0 to inf (subnormals included), NaN and the largest finite float."""
    bits = torch.arange(0, 0x7F800001, stride, dtype=torch.int64).to(torch.int32)
    extra = torch.tensor([0x7F800000, 0x7FC00000, 0x7F7FFFFF, 1, 0x00800000], dtype=torch.int32)
    return torch.cat([bits, extra]).view(torch.float32)


def subnormal_ties(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(a, b)`` with ``a / b`` exactly halfway between two float32 subnormals, ``b`` an e4m3 value."""
    gen = generator(7)
    b = E4M3_NORMALS[torch.randint(0, len(E4M3_NORMALS), (count,), generator=gen)]
    odd = 2 * torch.randint(0, 1 << 16, (count,), generator=gen, dtype=torch.int64) + 1
    a = (odd.double() * 2.0**-150 * b.double()).float()
    keep = a.double() == odd.double() * 2.0**-150 * b.double()  # a is that product exactly
    return a[keep], b[keep]


@triton.jit
def divide_kernel(a_ptr, b_ptr, out_ptr, n, HW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs, mask=offs < n)
    b = tl.load(b_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, f32_divide(a.to(tl.float64), b, HW), mask=offs < n)


@triton.jit
def block_scale_kernel(amax_ptr, code_ptr, factor_ptr, tscale, n, HW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    amax = tl.load(amax_ptr + offs, mask=offs < n)
    rcp, inv = nvfp4_tensor_scale_inverses(tl.cast(tscale, tl.float32))
    code, factor = nvfp4_block_scales(amax, rcp, inv, HW)
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=offs < n)
    tl.store(factor_ptr + offs, factor, mask=offs < n)


def assert_same_floats(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-identical float32, any NaN matching any NaN."""
    ours, ref = ours.cpu(), ref.cpu()
    same = (ours.view(torch.int32) == ref.view(torch.int32)) | (ours.isnan() & ref.isnan())
    if not bool(same.all()):
        i = (~same).nonzero()[0].item()
        raise AssertionError(f"{what}: {int((~same).sum())} values differ, first at {i} "
                             f"(ours {ours[i].item()!r}, IEEE {ref[i].item()!r})")


def check_f32_divide(a: torch.Tensor, device: str, hardware: bool) -> None:
    """``f32_divide(a, b)`` equals torch's IEEE float32 division for every finite ``a`` and e4m3 ``b``."""
    divisors = torch.cat([E4M3_NORMALS, torch.tensor([float("nan")])])
    a = a[a.isfinite()]  # (the residual of inf / b is NaN; the kernels divide 1 / t <= 2**120)
    ties_a, ties_b = subnormal_ties(4096)
    b = torch.cat([divisors.repeat(len(a)), ties_b])
    a = torch.cat([a.repeat_interleave(len(divisors)), ties_a])
    out = torch.empty_like(a, device=device)
    block = 1 << 14
    divide_kernel[(triton.cdiv(len(a), block),)](a.to(device), b.to(device), out, len(a), HW=hardware, BLOCK=block)
    assert_same_floats(out, a / b, f"f32_divide, hardware={hardware}")


def check_nvfp4_block_scales(amax: torch.Tensor, device: str, hardware_fp8: bool) -> None:
    """The block-scale codes and cast factors equal ``nvfp4_quantize``'s IEEE arithmetic for each tensor scale."""
    for tscale in TENSOR_SCALES:
        t = torch.tensor(tscale, dtype=torch.float32)
        scales = torch.clamp(amax / 6.0 / t, min=2.0**-6, max=448.0).to(torch.float8_e4m3fn)
        want_factor = (1.0 / t) / scales.float()
        code = torch.empty(amax.shape, dtype=torch.uint8, device=device)
        factor = torch.empty(amax.shape, dtype=torch.float32, device=device)
        block = 1 << 14
        block_scale_kernel[(triton.cdiv(len(amax), block),)](amax.to(device), code, factor, tscale, len(amax),
                                                               HW=hardware_fp8, BLOCK=block)
        want_code, code = scales.view(torch.uint8), code.cpu()
        same = (code == want_code) | (((code & 0x7F) == 0x7F) & ((want_code & 0x7F) == 0x7F))  # NaN of any sign
        assert_no_difference(same, code, want_code, f"block scale codes, t={tscale}")
        assert_same_floats(factor, want_factor, f"cast factors, t={tscale}")


# ---------------------------------------------------------------- plain python

def check_each_edge_row(x, names, eps, device, **kwargs):
    """Every edge row (``tests.helpers.edge_rows``) cast on its own: its edge case alone sets rho and the scales."""
    for i, name in enumerate(names):
        check_against_reference(x[i:i + 1].to(device), None, eps=eps, **kwargs,
                                what=f"{kwargs['fmt']} {kwargs['norm']} p={kwargs['p']} {x.dtype} {name} eps={eps}")

def test_block_runs_cover_each_block_once():
    for num_blocks in list(range(1, 80)) + [160, 448, 512, 896]:
        runs = block_runs(num_blocks)
        assert 1 <= len(runs) <= 3
        covered = []
        for run in runs:
            assert run.count & (run.count - 1) == 0 and 0 < run.valid <= run.count
            covered.extend(range(run.start, run.start + run.valid))
        assert covered == list(range(num_blocks)), num_blocks
    # hidden sizes of real models need no padding: 5120 = 4096 + 1024, 14336 = 8192 + 4096 + 2048
    assert all(r.valid == r.count for r in block_runs(5120 // 32) + block_runs(14336 // 32) + block_runs(14336 // 16))


def test_chunks_divide_the_row():
    for num_blocks in (1, 3, 7, 160, 448, 512, 896):
        for wanted in (1, 2, 16, 64, 100):
            chunk = chunk_blocks_for(num_blocks, wanted)
            assert num_blocks % chunk == 0 and chunk <= wanted and chunk & (chunk - 1) == 0
    assert chunk_blocks_for(448, 64) == 64 and chunk_blocks_for(160, 64) == 32


def test_launch_config_for_nvfp4_with_a_gain():
    """NVFP4 with a gain takes the configurations without one, but rows of 8192 in two loops."""
    for hidden in (2048, 4096, 5120, 14336, 16384):
        for n_rows in (1, 4096, 65536):
            assert launch_config(hidden, n_rows, "nvfp4", has_gain=True) == launch_config(hidden, n_rows, "nvfp4")
    assert launch_config(8192, 65536, "nvfp4").chunk_blocks == 0
    assert launch_config(8192, 65536, "nvfp4", has_gain=True) == LaunchConfig(1, 4, 2048 // 16)
    assert launch_config(8192, 65536, "mxfp8", has_gain=True) == launch_config(8192, 65536, "mxfp8")


def test_launch_config_guards_a_symbolic_row_count_only_by_thresholds():
    """Under torch.compile with dynamic shapes the row count is a SymInt: the heuristics may compare it with
    thresholds (a guard each) but must not pin its value (a recompile for every batch size)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    for fmt, has_gain in (("mxfp8", False), ("nvfp4", False), ("nvfp4", True)):
        for hidden in (2048, 4096, 5120, 8192, 16384):
            env = ShapeEnv()
            n_rows = env.create_symintnode(env.create_symbol(40000, ConstantSource("rows"),
                                                             dynamic_dim=DimDynamic.DYNAMIC), hint=40000)
            assert launch_config(hidden, n_rows, fmt, has_gain=has_gain) == launch_config(hidden, 40000, fmt, has_gain)
            pinned = [g.expr for g in env.guards if "Eq" in str(g.expr) or "Ne" in str(g.expr)]
            assert not pinned, (fmt, hidden, pinned)


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_kernels_bit_exact_under_triton_interpreter():
    run_interpreter_tests(__file__)


# ---------------------------------------------------------------- CPU, Triton interpreter

if INTERPRETED:
    INTERP_SHAPES = [(5, 64), (3, 96), (2, 3, 224), (1, 480)]

    def test_interp_codecs_match_the_reference_casts():
        x = codec_inputs(stride=997)
        assert_codecs_match_reference(x, *encode_with_codecs(x, hardware_fp8=False), "software")

    def test_interp_branch_free_divisions_match_ieee():
        check_f32_divide(nonnegative_floats(stride=3_000_017), "cpu", hardware=False)
        check_nvfp4_block_scales(nonnegative_floats(stride=300_007), "cpu", hardware_fp8=False)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_interp_modes(fmt, norm, p, eps_in_root, dtype):
        for i, shape in enumerate(INTERP_SHAPES):
            for has_gamma, offset in GAINS:
                x = gaussian_rows(shape, dtype, seed=i) if i % 2 else random_rows(shape, dtype, seed=i)
                gamma = gain(shape[-1], dtype, seed=i) if has_gamma else None
                check_against_reference(x, gamma, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root,
                                        gamma_offset=offset)

    @pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
    def test_interp_fp8(norm, p, eps_in_root):
        """FP8 (static per-tensor scale; the gain folded into the weights, or applied in the cast with the
        scale raised by max|gain|): every dtype and shape, the two-loop variant, and the edge rows, bit for bit."""
        kwargs = dict(fmt="fp8", norm=norm, p=p, eps_in_root=eps_in_root)
        for i, shape in enumerate(INTERP_SHAPES):
            for dtype in DTYPES:
                x = gaussian_rows(shape, dtype, seed=i) if i % 2 else random_rows(shape, dtype, seed=i)
                for has_gamma, offset in GAINS:
                    gamma = gain(shape[-1], dtype, seed=i) if has_gamma else None
                    check_against_reference(x, gamma, gamma_offset=offset, **kwargs)
        for shape, cfg in [((5, 192), LaunchConfig(2, 4, 4)), ((3, 256), LaunchConfig(2, 4, 0, block_split=2))]:
            for gamma in (None, gain(shape[-1], torch.float32, seed=2)):
                check_against_reference(random_rows(shape, torch.bfloat16, seed=1), gamma, launch_cfg=cfg,
                                        **kwargs)
        rows, names = edge_rows(64)
        for eps in (1e-6, 0.0):
            check_each_edge_row(rows, names, eps, "cpu", **kwargs)

    def test_interp_static_scales_follow_the_constant():
        """The per-tensor scale the kernel derives from the rescale constant (a tensor it loads) is the
        reference's for calibrated-looking constants, and at the power-of-two edge: at hidden 224 (7 blocks
        of 32), p=1 and c=1, FP8's bound / 448 is exactly 2**-6, which is the scale; c one ulp below 1
        makes it 2**-5."""
        x = gaussian_rows((3, 224), torch.bfloat16, seed=4)
        below_one = math.nextafter(1.0, 0.0)
        for correction in (1.0, below_one, 0.2, 0.371, 1.7):
            check_against_reference(x, None, fmt="fp8", norm="mxnorm", p=1, correction=correction)
            check_against_reference(x, gain(224, torch.float32, 3), fmt="fp8", norm="mxnorm", p=2,
                                    correction=correction)
            for gamma in (None, gain(224, torch.float32, 3)):
                check_against_reference(x, gamma, fmt="nvfp4", norm="mxnorm", p=2, correction=correction)
        for correction, scale in ((1.0, 2.0**-6), (below_one, 2.0**-5)):
            tscale = check_against_reference(x, None, fmt="fp8", norm="mxnorm", p=1, correction=correction)[3]
            assert tscale.item() == scale
            # a gain whose largest magnitude is a power of two moves the edge by exactly that power
            gamma = torch.full((224,), 0.25).index_fill_(0, torch.tensor([5]), -4.0)
            tscale = check_against_reference(x, gamma, fmt="fp8", norm="mxnorm", p=1, correction=correction)[3]
            assert tscale.item() == scale * 4

    @pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
    def test_interp_floor_scale_mode(norm, p, eps_in_root):
        for dtype in (torch.bfloat16, torch.float32):
            x = wide_range((6, 96), dtype, seed=3)
            check_against_reference(x, None, fmt="mxfp8", norm=norm, p=p, eps_in_root=eps_in_root,
                                    scale_mode="floor")
            check_against_reference(x, gain(96, dtype, 5), fmt="mxfp8", norm=norm, p=p, eps_in_root=eps_in_root,
                                    scale_mode="floor", gamma_offset=1.0)

    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
    @pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_interp_edge_cases(fmt, norm, p, eps_in_root, dtype):
        """Zero rows, one huge value, subnormals, +-inf, NaN (tests.helpers.edge_rows), with and without eps."""
        rows, names = edge_rows(64)
        x = rows.to(dtype)
        for eps in (1e-6, 0.0):
            check_each_edge_row(x, names, eps, "cpu", fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root)
            # and all of them at once, with a gain
            check_against_reference(x, gain(64, dtype, 7), fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root,
                                    eps=eps, gamma_offset=1.0)

    @pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_interp_two_loop_variant(fmt, norm, p, eps_in_root):
        """The chunked variant (two loops, the second re-reading the rows) gives the same bits, as do blocks
    loaded in two pieces and programs of several rows (the last one partly masked)."""
        for shape, cfg in [((5, 192), LaunchConfig(2, 4, 4)), ((3, 256), LaunchConfig(4, 4, 4)),
                           ((2, 96), LaunchConfig(1, 4, 1)), ((5, 192), LaunchConfig(2, 4, 2, block_split=2)),
                           ((3, 256), LaunchConfig(2, 4, 0, block_split=2)), ((7, 256), LaunchConfig(4, 4, 0))]:
            x = random_rows(shape, torch.bfloat16, seed=shape[-1])
            for has_gamma, offset in GAINS:
                gamma = gain(shape[-1], torch.float32, seed=3) if has_gamma else None
                check_against_reference(x, gamma, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root,
                                        gamma_offset=offset, launch_cfg=cfg)
        rows, names = edge_rows(64)
        check_against_reference(rows, None, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root, eps=0.0,
                                launch_cfg=LaunchConfig(2, 4, 1))

    @pytest.mark.parametrize("fmt", FORMATS + ("fp8",))
    def test_interp_degenerate_gains(fmt):
        """A zero gain (the NVFP4 / FP8 tensor scale clamps at 2**-120), Gemma's 1 + gamma = 0, a NaN gain, and
        (FP8) an infinite one."""
        x = gaussian_rows((4, 96), torch.bfloat16, seed=11)
        nan_gain = gain(96, torch.float32, 2)
        nan_gain[17] = float("nan")
        inf_gain = gain(96, torch.float32, 2)
        inf_gain[3] = -float("inf")
        cases = [(torch.zeros(96), 0.0), (-torch.ones(96), 1.0), (nan_gain, 0.0)] + [(inf_gain, 0.0)] * (fmt == "fp8")
        for gamma, offset in cases:
            for norm, p, eps_in_root in NORM_CASES[::2]:
                check_against_reference(x, gamma, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root,
                                        gamma_offset=offset)

    def test_interp_nvfp4_tensor_scale_reads_only_the_gain():
        """NVFP4's per-tensor scale comes from max|1 + gamma| over the real elements only: here below 1, so a
        padded or masked element (gamma = 0, |1 + 0| = 1) would raise it. Rows of 240 are cast in runs of
        8, 4 and 4 blocks (the last padded); 4112 takes two masked chunks in the kernel that reduces the gain."""
        for hidden in (240, 4112):
            gamma = (gain(hidden, torch.float32, 9) * 0.1 - 0.5).to(torch.bfloat16)
            for rows in (3, 0):
                x = gaussian_rows((rows, hidden), torch.bfloat16, seed=hidden)
                for norm, p in (("rmsnorm", 2), ("mxnorm", 1)):
                    _, _, _, tscale = check_against_reference(x, gamma, fmt="nvfp4", norm=norm, p=p,
                                                              gamma_offset=1.0)
                    assert tscale.item() < static_scale_base(hidden, fmt="nvfp4", norm=norm, p=p,
                                                             correction=CORRECTION)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_interp_row_counts_and_layouts(fmt):
        for shape in [(0, 64), (1, 64), (13, 64), (2, 0, 96), (3, 4, 5, 32), (1, 2048)]:
            x = gaussian_rows(shape, torch.bfloat16, seed=sum(shape))
            data, scales, rho, _ = check_against_reference(x, None, fmt=fmt, norm="mxnorm", p=2)
            spec = get_format(fmt)
            assert data.shape == (*shape[:-1], shape[-1] // spec.elems_per_byte)
            assert scales.shape == (*shape[:-1], shape[-1] // spec.block_size)
            assert rho.shape == shape[:-1]
        x = gaussian_rows((64, 6), torch.float32, seed=1).t()  # non-contiguous (6, 64)
        check_against_reference(x, None, fmt=fmt, norm="rmsnorm", p=2)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_interp_swizzled_scales_match_to_blocked(fmt):
        to_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils").to_blocked
        spec = get_format(fmt)
        for rows, hidden in [(1, 96), (128, 128), (130, 96), (2, 7 * spec.block_size)]:
            x = gaussian_rows((rows, hidden), torch.bfloat16, seed=rows + hidden)
            kwargs = dict(fmt=fmt, norm="mxnorm", p=2, scale_mode="rceil", eps=1e-6, correction=CORRECTION)
            data, scales, rho, _ = norm_cast_triton(x, None, **kwargs)
            data_sw, scales_sw, rho_sw, _ = norm_cast_triton(x, None, swizzle_scales=True, **kwargs)
            assert torch.equal(data, data_sw) and torch.equal(rho, rho_sw)
            expected = to_blocked(scales.reshape(rows, hidden // spec.block_size))
            assert scales_sw.shape == expected.shape
            assert torch.equal(scales_sw, expected), f"{fmt} {rows}x{hidden}: swizzled scales"


# ---------------------------------------------------------------- GPU

GPU_HIDDEN = (2048, 4096, 5120, 8192, 14336, 16384)


@gpu
@pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
def test_gpu_hidden_sizes(hidden, fmt, norm, p, eps_in_root):
    x = gaussian_rows((301, hidden), torch.bfloat16, seed=hidden, device="cuda")
    check_against_reference(x, None, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root)


@gpu
@pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hidden", (5120, 16384))
def test_gpu_two_loop_variant_with_gain(hidden, fmt, norm, p, eps_in_root):
    """The two-loop variant with a gain (the hidden-size tests cover it without one), two rows a program,
    and whole blocks per thread in both variants."""
    x = gaussian_rows((301, hidden), torch.bfloat16, seed=hidden + 7, device="cuda")
    for cfg in (LaunchConfig(2, 8, 32), LaunchConfig(1, 8, 32, block_split=2), LaunchConfig(1, 8, 0, block_split=2),
                LaunchConfig(2, 4, 64)):
        check_against_reference(x, gain(hidden, torch.bfloat16, 5, "cuda"), fmt=fmt, norm=norm, p=p,
                                eps_in_root=eps_in_root, gamma_offset=1.0, launch_cfg=cfg)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm,p", [("mxnorm", 2), ("rmsnorm", 2)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hidden", (5120, 14336))
def test_gpu_dtypes_and_gains(hidden, fmt, norm, p, dtype):
    x = random_rows((64, 2, hidden), dtype, seed=hidden + 1, device="cuda")
    check_against_reference(x, gain(hidden, dtype, 3, "cuda"), fmt=fmt, norm=norm, p=p, gamma_offset=1.0)
    check_against_reference(x, gain(hidden, dtype, 4, "cuda"), fmt=fmt, norm=norm, p=p, scale_mode="floor")


@gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_edge_cases(fmt, norm, p, eps_in_root, dtype):
    rows, names = edge_rows(64)
    x = rows.to(dtype)
    for eps in (1e-6, 0.0):
        check_each_edge_row(x, names, eps, "cuda", fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root)
    # the edge rows tiled across a real hidden size, many rows
    big = torch.cat([x] * 32, dim=-1).repeat(7, 1).cuda()
    check_against_reference(big, None, fmt=fmt, norm=norm, p=p, eps_in_root=eps_in_root)


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_row_counts(fmt):
    for shape in [(0, 4096), (1, 4096), (1, 14336), (3, 5, 2048), (65537, 2048)]:
        x = gaussian_rows(shape, torch.bfloat16, seed=sum(shape), device="cuda")
        check_against_reference(x, None, fmt=fmt, norm="mxnorm", p=2)


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_swizzled_scales_match_to_blocked(fmt):
    to_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils").to_blocked
    spec = get_format(fmt)
    for rows, hidden in [(1000, 5120), (256, 4096), (3, 14336)]:
        x = gaussian_rows((rows, hidden), torch.bfloat16, seed=rows, device="cuda")
        kwargs = dict(fmt=fmt, norm="mxnorm", p=2, scale_mode="rceil", eps=1e-6, correction=CORRECTION)
        _, scales, _, _ = norm_cast_triton(x, None, **kwargs)
        _, scales_sw, _, _ = norm_cast_triton(x, None, swizzle_scales=True, **kwargs)
        expected = to_blocked(scales.reshape(rows, hidden // spec.block_size).cpu())
        assert torch.equal(scales_sw.cpu(), expected), f"{fmt} {rows}x{hidden}"


@gpu
def test_gpu_codecs_match_the_reference_casts():
    """The hardware float32 -> e4m3 conversion the kernels use rounds like torch's cast after the clamp."""
    x = codec_inputs(stride=61).cuda()
    for hardware in (True, False):
        assert_codecs_match_reference(x, *encode_with_codecs(x, hardware), f"hardware={hardware}")


@gpu
def test_gpu_branch_free_divisions_match_ieee():
    """The NVFP4 block-scale divisions without IEEE division equal it, over every 64th float32 (block maxima)."""
    for hardware in (True, False):
        check_f32_divide(nonnegative_floats(stride=30_011), "cuda", hardware)
        check_nvfp4_block_scales(nonnegative_floats(stride=64), "cuda", hardware)


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_compiled_graph_contains_the_kernel(fmt):
    """torch.compile(fullgraph=True) sees the Triton kernels themselves (triton_op; NVFP4 with a gain runs
    the per-tensor-scale kernel first), and computes the same bits."""
    from torch._inductor.utils import run_and_get_code

    from mxrewrite.ops import norm_constant

    def f(x, gamma):
        return torch.ops.mxrewrite.norm_cast(x, gamma.float() + 1.0, norm_constant(1e-6, "cuda"),
                                             norm_constant(CORRECTION, "cuda"), fmt, "rmsnorm", 2, "rceil", True)

    x = gaussian_rows((256, 5120), torch.bfloat16, seed=0, device="cuda")
    gamma = gain(5120, torch.bfloat16, 1, "cuda")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out, codes = run_and_get_code(compiled, x, gamma)
    kernels = ["_norm_cast_kernel"] + (["_gain_tensor_scale_kernel"] if fmt == "nvfp4" else [])
    for kernel in kernels:
        assert any(kernel in code for code in codes), f"Inductor's code does not launch {kernel}"
    for a, b in zip(out, f(x, gamma)):
        assert torch.equal(a, b)


@gpu
def test_gpu_op_runs_the_kernel():
    from mxrewrite.ops import norm_constant

    x = gaussian_rows((33, 4096), torch.float16, seed=2, device="cuda")
    out = torch.ops.mxrewrite.norm_cast(x, None, norm_constant(1e-5, "cuda"), norm_constant(CORRECTION, "cuda"),
                                        "nvfp4", "rmsnorm", 2, "rceil", True)
    direct = norm_cast_triton(x, None, fmt="nvfp4", norm="rmsnorm", p=2, scale_mode="rceil", eps=1e-5,
                              correction=CORRECTION, eps_in_root=True)
    for a, b in zip(out, direct):
        assert a.is_cuda and torch.equal(a, b)


@gpu
@pytest.mark.parametrize("norm,p,eps_in_root", NORM_CASES, ids=NORM_IDS)
@pytest.mark.parametrize("hidden", (4096, 5120, 14336))
def test_gpu_fp8(hidden, norm, p, eps_in_root):
    """FP8 (static per-tensor scale, hardware e4m3 conversion) on the GPU, bit for bit, without and with a gain
    (the scale then set by the largest gain); the edge rows too."""
    for dtype in (torch.bfloat16, torch.float32):
        x = gaussian_rows((301, hidden), dtype, seed=hidden + 3, device="cuda")
        check_against_reference(x, None, fmt="fp8", norm=norm, p=p, eps_in_root=eps_in_root)
        check_against_reference(x, gain(hidden, dtype, 5, "cuda"), fmt="fp8", norm=norm, p=p,
                                eps_in_root=eps_in_root, gamma_offset=1.0)
    rows, names = edge_rows(64)
    check_each_edge_row(rows, names, 1e-6, "cuda", fmt="fp8", norm=norm, p=p, eps_in_root=eps_in_root)
