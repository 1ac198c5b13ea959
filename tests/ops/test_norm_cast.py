"""``mxrewrite::norm_cast`` (MXNorm or exact RMSNorm fused with an MXFP8/NVFP4 cast) and
``mxrewrite::rms_norm_backward`` on CPU: the reference composition, rho against independent
float64 formulas and torch's rms_norm, gains, errors, and ``torch.library.opcheck``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mxrewrite.ops  # noqa: F401  (registers torch.ops.mxrewrite)
from mxrewrite.errors import BlockShapeError, ConfigError, UnsupportedDtypeError
from mxrewrite.formats import get_format, mx_quantize, nvfp4_quantize
from mxrewrite.formats.nvfp4 import MIN_TENSOR_SCALE, NVFP4_SCALE_RANGE
from mxrewrite.ops import gaussian_correction, norm_constant, typed_views
from mxrewrite.ops.mxnorm_constants import mxnorm_output_bound, rmsnorm_output_bound
from tests.helpers import assert_same_bits, float32_ulp, wide_range

norm_cast = torch.ops.mxrewrite.norm_cast
rms_norm_backward = torch.ops.mxrewrite.rms_norm_backward
FORMATS = ("mxfp8", "nvfp4")
EPS = 1e-6


def call(x, gamma=None, *, fmt="mxfp8", norm="mxnorm", p=2, scale_mode="rceil", eps=EPS, correction=None,
         gamma_offset=0.0, eps_in_root=True):
    """The op with floats for its constants; ``gamma_offset`` adds to the gain first, as a rewritten norm of
    Gemma's ``1 + weight`` does."""
    if correction is None:
        correction = gaussian_correction(p, get_format(fmt).block_size)
    if gamma is not None and gamma_offset:
        gamma = gamma.float() + gamma_offset
    return norm_cast(x, gamma, norm_constant(eps), norm_constant(correction), fmt, norm, p, scale_mode, eps_in_root)


def activations(shape, dtype, seed):
    """Rows with a per-row scale over several binades and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, (*shape[:-1], 1), generator=g).float())
    x[..., 3] *= 30.0
    return x.to(dtype)


def rho64(x, *, norm, p, block, correction, eps, eps_in_root=True):
    """rho = 1 / r from MXNORM.md (mxnorm) or RMSNorm's definition, all in float64."""
    x = x.double()
    if norm == "mxnorm":
        m = x.abs().unflatten(-1, (-1, block)).amax(-1)
        r = correction * (m**p).mean(-1) ** (1.0 / p) + eps
    else:
        ms = x.square().mean(-1)
        r = (ms + eps).sqrt() if eps_in_root else ms.sqrt() + eps
    return 1.0 / r


def assert_rho_close(rho, x, *, norm, p, block, correction, eps, eps_in_root=True):
    """rho against the float64 formula.

    MXNorm: bit-identical to the documented rounding (r = float32(c * M + eps), then an IEEE
    float32 division 1 / r), hence within 1.5 float32 ulp of the exact 1 / r: rounding r costs
    up to 2**-24 relative, which is between 0.5 and 1 ulp of rho depending on where rho sits in
    its binade, and the division adds half an ulp (so "within 1 ulp" does not hold in general).
    RMSNorm: the mean of squares is summed in float32 (as torch.rms_norm does): within 4 ulps.
    """
    r = 1.0 / rho64(x, norm=norm, p=p, block=block, correction=correction, eps=eps, eps_in_root=eps_in_root)
    err_ulps = (rho.double() - 1.0 / r).abs() / float32_ulp(rho)
    if norm == "mxnorm":
        assert_same_bits(rho, 1.0 / r.float(), "rho = 1 / float32(r)")
        assert (err_ulps <= 1.5).all(), err_ulps.max()
    else:
        assert (err_ulps <= 4).all(), err_ulps.max()


def compose(x, rho, gain, fmt, scale_mode, tensor_scale):
    """The cast of xhat = x * rho (* gain), straight from mxrewrite.formats."""
    xhat = x.float() * rho.unsqueeze(-1)
    if gain is not None:
        xhat = xhat * gain
    if fmt == "nvfp4":
        data, scales, _ = nvfp4_quantize(xhat, tensor_scale)
    else:
        data, scales = mx_quantize(xhat, scale_mode=scale_mode)
    return data.view(torch.uint8), scales.view(torch.uint8)


CONFIGS = [
    dict(fmt="mxfp8", norm="mxnorm", p=2),
    dict(fmt="mxfp8", norm="mxnorm", p=1, scale_mode="floor"),
    dict(fmt="nvfp4", norm="mxnorm", p=2),
    dict(fmt="nvfp4", norm="mxnorm", p=1),
    dict(fmt="mxfp8", norm="rmsnorm", gamma=True),
    dict(fmt="mxfp8", norm="rmsnorm", gamma=True, gamma_offset=1.0, scale_mode="floor"),
    dict(fmt="nvfp4", norm="rmsnorm", gamma=True, eps_in_root=False),
    dict(fmt="nvfp4", norm="rmsnorm", gamma=True, gamma_offset=1.0),
    dict(fmt="mxfp8", norm="mxnorm", p=2, gamma=True, gamma_offset=1.0),
    dict(fmt="mxfp8", norm="rmsnorm"),
]


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 256), (2, 16384)], ids=str)
def test_equals_reference_composition(config, dtype, shape):
    config = dict(config)
    use_gamma = config.pop("gamma", False)
    fmt, norm, p = config["fmt"], config["norm"], config.get("p", 2)
    spec = get_format(fmt)
    x = activations(shape, dtype, seed=shape[-1])
    gamma = (torch.randn(shape[-1], generator=torch.Generator().manual_seed(2)) * 0.2).to(dtype) if use_gamma else None
    data, scales, rho, tscale = call(x, gamma, **config)

    lead, hidden = shape[:-1], shape[-1]
    assert data.dtype == scales.dtype == torch.uint8
    assert data.shape == (*lead, hidden // spec.elems_per_byte)
    assert scales.shape == (*lead, hidden // spec.block_size)
    assert rho.dtype == torch.float32 and rho.shape == lead
    assert tscale.dtype == torch.float32 and tscale.shape == ()

    correction = gaussian_correction(p, spec.block_size)
    assert_rho_close(rho, x, norm=norm, p=p, block=spec.block_size, correction=correction, eps=EPS,
                     eps_in_root=config.get("eps_in_root", True))

    # the cast: exactly the formats' quantize of x * rho * gain with the op's own rho
    gain = None if gamma is None else gamma.float() + config.get("gamma_offset", 0.0)
    if fmt == "nvfp4":
        bound = (mxnorm_output_bound(p, hidden // 16, correction) if norm == "mxnorm"
                 else rmsnorm_output_bound(hidden))
        max_gain = 1.0 if gain is None else gain.abs().max().item()
        assert tscale.item() == pytest.approx(bound * max_gain / NVFP4_SCALE_RANGE, rel=1e-6)
    else:
        assert tscale.item() == 1.0
    ref_data, ref_scales = compose(x, rho, gain, fmt, config.get("scale_mode", "rceil"), tscale)
    assert_same_bits(data, ref_data, "data")
    assert_same_bits(scales, ref_scales, "scales")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("p", [1, 2])
def test_mxnorm_rho_matches_float64_formula(fmt, p):
    block = get_format(fmt).block_size
    for seed, hidden in enumerate((16 * block, 4096, 16384)):
        x = wide_range((3, hidden), torch.float32, seed=seed, block=block)
        for correction, eps in ((gaussian_correction(p, block), EPS), (0.37, 0.0), (1.0, 1e-3)):
            rho = call(x, fmt=fmt, p=p, correction=correction, eps=eps)[2]
            assert_rho_close(rho, x, norm="mxnorm", p=p, block=block, correction=correction, eps=eps)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("hidden", [64, 4096])
def test_rmsnorm_matches_torch_rms_norm(eps, hidden):
    x = activations((6, hidden), torch.float32, seed=hidden)
    rho = call(x, norm="rmsnorm", eps=eps)[2]
    ours = x * rho.unsqueeze(-1)
    theirs = F.rms_norm(x, (hidden,), eps=eps)
    assert ((ours - theirs).abs() <= 4 * float32_ulp(theirs)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_gamma_forms(fmt):
    """gamma (plain) and 1 + gamma (Gemma) multiply the normalised row before the cast."""
    x = activations((4, 128), torch.float32, seed=1)
    gamma = torch.randn(128, generator=torch.Generator().manual_seed(3)) * 0.5
    for norm in ("rmsnorm", "mxnorm"):
        base = call(x, None, fmt=fmt, norm=norm)
        plain = call(x, gamma, fmt=fmt, norm=norm)
        gemma = call(x, gamma, fmt=fmt, norm=norm, gamma_offset=1.0)
        ones = call(x, torch.ones(128), fmt=fmt, norm=norm)
        zeros_gemma = call(x, torch.zeros(128), fmt=fmt, norm=norm, gamma_offset=1.0)
        for a, b in zip(base, ones):
            assert torch.equal(a, b)
        for a, b in zip(base, zeros_gemma):
            assert torch.equal(a, b)
        assert torch.equal(plain[2], base[2]) and torch.equal(gemma[2], base[2])  # rho ignores the gain
        ref = compose(x, base[2], gamma, fmt, "rceil", plain[3])
        assert torch.equal(plain[0], ref[0]) and torch.equal(plain[1], ref[1])
        ref = compose(x, base[2], 1.0 + gamma, fmt, "rceil", gemma[3])
        assert torch.equal(gemma[0], ref[0]) and torch.equal(gemma[1], ref[1])


def test_eps_outside_the_root():
    x = activations((4, 64), torch.float32, seed=4)
    x[0] = 0.0
    rho_in = call(x, norm="rmsnorm", eps=1e-2)[2]
    rho_out = call(x, norm="rmsnorm", eps=1e-2, eps_in_root=False)[2]
    assert_rho_close(rho_out, x, norm="rmsnorm", p=2, block=32, correction=1.0, eps=1e-2, eps_in_root=False)
    assert rho_out[0].item() == pytest.approx(100.0) and rho_in[0].item() == pytest.approx(10.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_rows_and_zero_gain_stay_finite(fmt):
    """A zero row gives rho = 1 / eps (MXNorm) or 1 / sqrt(eps) (RMSNorm); a zero gain the smallest NVFP4 tensor
    scale (2**-120, not 0, whose inverse would make every code NaN); both cast to zeros."""
    x = torch.zeros(2, 64)
    for norm in ("mxnorm", "rmsnorm"):
        data, scales, rho, tscale = call(x, torch.zeros(64), fmt=fmt, norm=norm)
        expected_rho = 1 / EPS if norm == "mxnorm" else 1 / math.sqrt(EPS)
        assert rho.tolist() == pytest.approx([expected_rho] * 2, rel=1e-6)
        assert tscale.item() == (MIN_TENSOR_SCALE if fmt == "nvfp4" else 1.0)
        dq_data, dq_scales = typed_views(fmt, data, scales)
        if fmt == "mxfp8":
            assert (dq_data.float() == 0).all()
        else:
            assert (data & 0x77 == 0).all()  # every e2m1 code is +-0
            assert torch.isfinite(dq_scales.float()).all()


def test_nvfp4_static_tensor_scale_never_saturates():
    """The static per-tensor scale comes from the norm's output bound, so even the worst row (all
    mass in one block, or one spike) keeps every block scale <= 448 and loses nothing to saturation."""
    hidden = 256
    worst = torch.zeros(3, hidden)
    worst[0, :16] = 1.0                                     # one nonzero block: MXNorm's bound for p=2
    worst[1, 7] = 5.0                                       # one spike: sqrt(D) for RMSNorm
    worst[2] = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    for norm in ("mxnorm", "rmsnorm"):
        for p in (1, 2):
            data, scales, rho, tscale = call(worst, fmt="nvfp4", norm=norm, p=p, eps=0.0)
            xhat = worst * rho.unsqueeze(-1)
            assert (xhat.abs().amax(-1) <= NVFP4_SCALE_RANGE * tscale * (1 + 1e-6)).all()
            assert (scales.view(torch.float8_e4m3fn).float() <= 448).all()


def test_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ConfigError, match="unknown format"):
        call(x, fmt="mxfp4")
    with pytest.raises(ConfigError, match="unknown norm"):
        call(x, norm="layernorm")
    with pytest.raises(ConfigError, match="p=3"):
        call(x, p=3, correction=0.4)
    with pytest.raises(ConfigError, match="scale mode"):
        call(x, scale_mode="ceil")
    with pytest.raises(BlockShapeError, match="block size 32") as info:
        call(torch.randn(4, 48))
    assert isinstance(info.value, ValueError)
    call(torch.randn(4, 48), fmt="nvfp4")  # 48 is a whole number of 16-element blocks
    with pytest.raises(UnsupportedDtypeError, match="torch.bfloat16"):
        call(x.double())
    with pytest.raises(UnsupportedDtypeError, match="gamma"):
        call(x, torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="gamma has shape"):
        call(x, torch.ones(32))


def test_rms_norm_backward_is_rmsnorms_gradient():
    """With the exact rho, the straight-through formula is RMSNorm's gradient (float64 autograd)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 128, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, 128, generator=g, dtype=torch.float64)
    eps = 1e-3
    x_ref = x.clone().requires_grad_(True)
    F.rms_norm(x_ref, (128,), eps=eps).backward(grad)
    rho = x.square().mean(-1).add(eps).rsqrt()
    dx = rms_norm_backward(grad.float(), x.float(), rho.float())
    assert dx.dtype == torch.float32 and dx.shape == x.shape
    torch.testing.assert_close(dx.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
    dx_bf16 = rms_norm_backward(grad.float(), x.bfloat16(), rho.float())
    assert dx_bf16.dtype == torch.bfloat16
    gain = torch.randn(128, generator=g, dtype=torch.float64)
    x_ref.grad = None
    (F.rms_norm(x_ref, (128,), eps=eps) * gain).backward(grad)
    dx = rms_norm_backward(grad.float(), x.float(), rho.float(), gain.float())
    torch.testing.assert_close(dx.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [dict(fmt="mxfp8", norm="mxnorm"), dict(fmt="nvfp4", norm="mxnorm", p=1),
                                    dict(fmt="mxfp8", norm="rmsnorm", gamma=True, gamma_offset=1.0),
                                    dict(fmt="nvfp4", norm="rmsnorm", gamma=True)], ids=config_id)
def test_opcheck_norm_cast(config):
    config = dict(config)
    fmt, p = config["fmt"], config.get("p", 2)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    gamma = torch.randn(64, dtype=torch.bfloat16) if config.get("gamma") else None
    if gamma is not None and config.get("gamma_offset"):
        gamma = gamma.float() + config["gamma_offset"]
    args = (x, gamma, norm_constant(EPS), norm_constant(gaussian_correction(p, get_format(fmt).block_size)), fmt,
            config["norm"], p, "rceil", True)
    torch.library.opcheck(norm_cast.default, args)


def test_opcheck_rms_norm_backward():
    x = torch.randn(3, 64)
    torch.library.opcheck(rms_norm_backward.default, (torch.randn(3, 64), x, x.square().mean(-1).rsqrt()))
    torch.library.opcheck(rms_norm_backward.default,
                          (torch.randn(2, 2, 32), torch.randn(2, 2, 32, dtype=torch.bfloat16), torch.rand(2, 2)))
    torch.library.opcheck(rms_norm_backward.default, (torch.randn(3, 64), x, torch.rand(3), torch.randn(64)))


def test_constants_must_be_float64_tensors_on_the_input_device():
    x = torch.randn(2, 64)
    with pytest.raises(ConfigError, match="0-d float64 tensor.*norm_constant"):
        norm_cast(x, None, torch.tensor(EPS), norm_constant(0.4), "mxfp8", "mxnorm", 2, "rceil", True)
    with pytest.raises(ConfigError, match="correction as a 0-d float64"):
        norm_cast(x, None, norm_constant(EPS), torch.tensor([0.4, 0.4], dtype=torch.float64), "mxfp8", "mxnorm", 2, "rceil", True)
