"""``mxrewrite::mx_linear`` on CPU: the emulated forward against an exact float64 reference, and
the straight-through backward against float64 autograd of the same forward.

Straight-through reference (MXNORM.md, "Backward"): with rho_e the op's rho, the surrogate
``rho_st(x) = rho_e - rho_e**3 * (|x|**2 - |x|**2.detach()) / (2 D)`` has value rho_e and
gradient RMSNorm's at rho_e; ``y_ref = alpha * ((x * rho_st * gain) @ W^T) + b`` in float64,
without quantisation, is the function whose gradients the op's backward computes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import mxrewrite.ops  # noqa: F401  (registers torch.ops.mxrewrite)
from mxrewrite.errors import ConfigError
from mxrewrite.formats import get_format, mx_dequantize, mx_quantize, nvfp4_quantize
from mxrewrite.ops import gaussian_correction, norm_constant
from tests.helpers import float32_ulp, mx_values64, nvfp4_values64

norm_cast = torch.ops.mxrewrite.norm_cast
mx_linear = torch.ops.mxrewrite.mx_linear
EPS = 1e-6
# e5m2 gradient times e4m3 operand: each product is off by at most (1 + 2**-3) * (1 + 2**-4) - 1;
# with an e4m3 gradient (grad_cast="e4m3") by (1 + 2**-4)**2 - 1
MX_GRAD_RELATIVE = {"mx": (1 + 2.0**-3) * (1 + 2.0**-4) - 1, "e4m3": (1 + 2.0**-4) ** 2 - 1}


def make_inputs(lead, hidden, out_features, *, dtype=torch.float32, seed=0, gamma=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g) * torch.exp2(torch.randint(-3, 3, (*lead, 1), generator=g).float())
    w = torch.randn(out_features, hidden, generator=g) / hidden**0.5
    gam = 1.0 + 0.3 * torch.randn(hidden, generator=g) if gamma else None
    b = torch.randn(out_features, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(gam), cast(b)


def run_forward(x, w, gamma, b, *, fmt="mxfp8", norm="mxnorm", p=2, gamma_offset=0.0, gamma_in_cast=False,
                alpha=1.0, grad_cast="hp", out_dtype=torch.float32, scale_mode="rceil"):
    """norm_cast then mx_linear, as the rewrite wires them (the gain offset added to gamma first, in autograd);
    returns y and the cast activation."""
    spec = get_format(fmt)
    c = gaussian_correction(p, spec.block_size) if norm == "mxnorm" else 1.0
    if gamma is not None and gamma_offset:
        gamma = gamma.float() + gamma_offset
    cast = norm_cast(x.detach(), gamma.detach() if gamma_in_cast and gamma is not None else None, norm_constant(EPS),
                     norm_constant(c), fmt, norm, p, scale_mode, True)
    data, scales, rho, tscale = cast
    y = mx_linear(x, rho, data, scales, tscale, w, gamma, b, fmt, scale_mode, gamma_in_cast, alpha, out_dtype,
                  grad_cast)
    return y, cast


def activation_values64(fmt, data, scales, tscale):
    if fmt == "nvfp4":
        return nvfp4_values64(data, scales, tscale)
    return mx_values64(data, scales, torch.float8_e4m3fn, 32)


def weight_values64(fmt, w_eff):
    """The weight cast along its input dim, as exact float64 values."""
    if fmt == "nvfp4":
        packed, scales, ts = nvfp4_quantize(w_eff)
        return nvfp4_values64(packed, scales.view(torch.uint8), ts)
    data, scales = mx_quantize(w_eff)
    return mx_values64(data.view(torch.uint8), scales.view(torch.uint8), torch.float8_e4m3fn, 32)


FORWARD_CASES = [
    dict(fmt="mxfp8"),
    dict(fmt="mxfp8", gamma=False, bias=False),
    dict(fmt="mxfp8", alpha=0.125, gamma_offset=1.0),
    dict(fmt="mxfp8", norm="rmsnorm", gamma_in_cast=True, alpha=3.0),
    dict(fmt="mxfp8", scale_mode="floor", lead=(2, 3, 5)),
    dict(fmt="nvfp4"),
    dict(fmt="nvfp4", gamma=False, alpha=0.5, lead=(2, 3, 5)),
    dict(fmt="nvfp4", norm="rmsnorm", gamma_in_cast=True, gamma_offset=1.0),
    dict(fmt="nvfp4", p=1, bias=False, lead=(4, 7)),
    dict(fmt="mxfp8", dtype=torch.bfloat16, out_dtype=torch.bfloat16),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items()) or "default"


@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_forward_equals_dequantized_matmul(case):
    case = dict(case)
    lead = case.pop("lead", (6,))
    dtype = case.pop("dtype", torch.float32)
    x, w, gamma, b = make_inputs(lead, 128, 48, dtype=dtype, gamma=case.pop("gamma", True),
                                 bias=case.pop("bias", True))
    fmt = case["fmt"]
    y, (data, scales, _, tscale) = run_forward(x, w, gamma, b, **case)
    assert y.shape == (*lead, 48) and y.dtype == case.get("out_dtype", torch.float32)

    gain = None if gamma is None else gamma.float() + case.get("gamma_offset", 0.0)
    w_eff = w if gain is None or case.get("gamma_in_cast", False) else w.float() * gain
    if case.get("scale_mode") == "floor":
        wd, ws = mx_quantize(w_eff, scale_mode="floor")
        w64 = mx_values64(wd.view(torch.uint8), ws.view(torch.uint8), torch.float8_e4m3fn, 32)
    else:
        w64 = weight_values64(fmt, w_eff)
    a64 = activation_values64(fmt, data, scales, tscale).reshape(-1, 128)
    alpha = case.get("alpha", 1.0)
    b64 = torch.zeros(48, dtype=torch.float64) if b is None else b.double()
    ref = alpha * (a64 @ w64.T) + b64
    # float32 accumulation of exact products: |error| <= K * 2**-24 * sum |a| |w| (+ rounding of y)
    magnitude = alpha * (a64.abs() @ w64.abs().T) + b64.abs()
    ours = y.reshape(-1, 48).double()
    tol = magnitude * (128 * 2.0**-24 + 2.0**-22)
    if y.dtype == torch.bfloat16:
        tol = tol + float32_ulp(ref.float()) * 2**16  # one bfloat16 rounding of the output
    assert ((ours - ref).abs() <= tol).all()


def test_forward_mxfp8_is_the_float32_emulation_bit_for_bit():
    """On CPU the MXFP8 path is exactly: dequantise both operands to float32, matmul, * alpha, + bias."""
    x, w, gamma, b = make_inputs((2, 5), 64, 40)
    y, (data, scales, _, _) = run_forward(x, w, gamma, b, alpha=0.7)
    act = mx_dequantize(data.view(torch.float8_e4m3fn).reshape(-1, 64),
                        scales.view(torch.float8_e8m0fnu).reshape(-1, 2))
    wd, ws = mx_quantize(w * gamma)
    expected = (act @ mx_dequantize(wd, ws).t()) * 0.7 + b
    assert torch.equal(y, expected.reshape(2, 5, 40))


def test_alpha_scales_the_product_only():
    x, w, gamma, b = make_inputs((8,), 64, 32)
    y1, _ = run_forward(x, w, gamma, None)
    y_half, _ = run_forward(x, w, gamma, None, alpha=0.5)
    y_bias, _ = run_forward(x, w, gamma, b, alpha=0.5)
    assert torch.equal(y_half, 0.5 * y1)
    assert torch.equal(y_bias, 0.5 * y1 + b)


# ---- backward ----

def surrogate_reference(x, w, gamma, b, rho, grad_out, *, alpha, gamma_offset):
    """float64 autograd of alpha * ((x * rho_st * gain) @ W^T) + b; returns the grads of x, W, gamma, b."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    gam64 = None if gamma is None else gamma.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    hidden = x.shape[-1]
    rho_e = rho.double().unsqueeze(-1)
    sq = x64.square().sum(-1, keepdim=True)
    rho_st = rho_e - rho_e**3 * (sq - sq.detach()) / (2 * hidden)
    xhat = x64 * rho_st
    if gam64 is not None:
        xhat = xhat * (gam64 + gamma_offset)
    y = alpha * (xhat @ w64.T)
    if b64 is not None:
        y = y + b64
    y.backward(grad_out.double())
    return [None if t is None else t.grad for t in (x64, w64, gam64, b64)]


def op_grads(x, w, gamma, b, grad_out, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, gamma, b)]
    y, cast = run_forward(*leaves, **kwargs)
    y.backward(grad_out)
    return [None if t is None else t.grad for t in leaves], cast[2]


def assert_close_normwise(ours, ref, rtol, what):
    """Elementwise within rtol of the largest reference entry (cancellations make per-element rtol meaningless)."""
    assert ours.shape == ref.shape, what
    scale = ref.abs().max().clamp(min=1e-30)
    err = (ours.double() - ref).abs().max()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs {rtol:g} * {scale:.3g}"


BACKWARD_CASES = [
    dict(fmt="mxfp8"),
    dict(fmt="mxfp8", alpha=0.25, gamma_offset=1.0, lead=(3, 13)),
    dict(fmt="nvfp4", lead=(37,)),
    dict(fmt="nvfp4", norm="rmsnorm", gamma_in_cast=True, alpha=2.0),
    dict(fmt="mxfp8", norm="mxnorm", p=1, gamma=False, bias=False),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_backward_hp_matches_float64_surrogate(case):
    """grad_cast="hp", float32 inputs: every gradient within 5e-6 of the largest reference entry
    (float32 GEMMs over at most 128 terms; observed about 2e-7)."""
    case = dict(case)
    lead = case.pop("lead", (16,))
    x, w, gamma, b = make_inputs(lead, 128, 48, seed=1, gamma=case.pop("gamma", True), bias=case.pop("bias", True))
    grad_out = torch.randn(*lead, 48, generator=torch.Generator().manual_seed(2))
    grads, rho = op_grads(x, w, gamma, b, grad_out, grad_cast="hp", **case)
    ref = surrogate_reference(x, w, gamma, b, rho, grad_out, alpha=case.get("alpha", 1.0),
                              gamma_offset=case.get("gamma_offset", 0.0))
    for name, ours, theirs in zip(("x", "weight", "gamma", "bias"), grads, ref):
        if theirs is None:
            assert ours is None
            continue
        assert ours.dtype == torch.float32
        assert_close_normwise(ours, theirs, 5e-6, f"grad {name}")


def test_backward_rmsnorm_equals_autograd_through_rms_norm():
    """For the exact RMSNorm the straight-through gradient is the true one: compare with float64
    autograd through F.rms_norm (differences only from rho being float32)."""
    lead, hidden, out_features, offset, alpha = (4, 9), 128, 40, 1.0, 0.5
    x, w, gamma, b = make_inputs(lead, hidden, out_features, seed=3)
    grad_out = torch.randn(*lead, out_features, generator=torch.Generator().manual_seed(4))
    grads, _ = op_grads(x, w, gamma, b, grad_out, norm="rmsnorm", gamma_in_cast=True, gamma_offset=offset,
                        alpha=alpha, grad_cast="hp")
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, gamma, b)]
    x64, w64, gam64, b64 = leaves
    y = alpha * ((F.rms_norm(x64, (hidden,), eps=EPS) * (gam64 + offset)) @ w64.T) + b64
    y.backward(grad_out.double())
    for name, ours, leaf in zip(("x", "weight", "gamma", "bias"), grads, leaves):
        assert_close_normwise(ours, leaf.grad, 5e-6, f"grad {name}")


@pytest.mark.parametrize("grad_cast", ["mx", "e4m3"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_backward_mx_within_the_casts_error(case, grad_cast):
    """grad_cast="mx": the two backward GEMMs run on an e5m2 gradient and an e4m3 operand. Each
    product is then off by at most MX_GRAD_RELATIVE (~0.2) of its magnitude, so per element
    |error| <= 0.2 * (|G| @ |W|) for H = G W, and that bound carried through the (linear)
    norm gradient, the gamma sum and |G|^T @ |x gain| for the weight. "e4m3": the same with ~0.13."""
    case = dict(case)
    lead = case.pop("lead", (16,))
    x, w, gamma, b = make_inputs(lead, 128, 48, seed=5, gamma=case.pop("gamma", True), bias=case.pop("bias", True))
    grad_out = torch.randn(*lead, 48, generator=torch.Generator().manual_seed(6))
    alpha, offset = case.get("alpha", 1.0), case.get("gamma_offset", 0.0)
    grads, rho = op_grads(x, w, gamma, b, grad_out, grad_cast=grad_cast, **case)
    ref = surrogate_reference(x, w, gamma, b, rho, grad_out, alpha=alpha, gamma_offset=offset)

    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).double()
    g2 = grad_out.reshape(-1, 48).double() * abs(alpha)
    r = rho.reshape(-1, 1).double()
    gain = torch.ones(hidden, dtype=torch.float64) if gamma is None else (gamma.double() + offset).abs()
    slack = MX_GRAD_RELATIVE[grad_cast] * 1.01
    err_h = slack * (g2.abs() @ w.double().abs())                     # |error| of H = alpha G W
    bound_x = r * gain * err_h + r**3 / hidden * x2.abs() * (gain * err_h * x2.abs()).sum(-1, keepdim=True)
    bound_w = slack * (g2.abs().T @ (x2 * r * gain).abs())
    bound_gamma = ((x2 * r).abs() * err_h).sum(0)
    bounds = {"x": bound_x.reshape(x.shape), "weight": bound_w, "gamma": bound_gamma}

    for name, ours, theirs in zip(("x", "weight", "gamma", "bias"), grads, ref):
        if theirs is None:
            continue
        err = (ours.double() - theirs).abs()
        if name == "bias":  # the bias gradient is a plain float32 sum: no cast involved
            assert_close_normwise(ours, theirs, 1e-6, "grad bias")
            continue
        assert (err <= bounds[name] + 1e-6 * theirs.abs().max()).all(), f"grad {name}"
        # and it is a useful gradient: normwise within 10 % of the reference
        assert (ours.double() - theirs).norm() < 0.1 * theirs.norm(), f"grad {name}"


@pytest.mark.parametrize("grad_cast, grad_dtype", [("mx", torch.float8_e5m2), ("e4m3", torch.float8_e4m3fn)])
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_mx_gradient_casts_use_the_gradient_element_type(fmt, grad_cast, grad_dtype, monkeypatch):
    """grad_cast="mx" casts the output gradient with e5m2 elements ("e4m3": e4m3) and the other operand (W,
    or x * rho * gain) with e4m3, both blocked along the GEMM's reduction dim; "hp" casts nothing."""
    module = importlib.import_module("mxrewrite.ops.mx_linear")  # the package attribute is the op itself
    calls = []
    original = module.quantize_matrix

    def spy(t, fmt, **kwargs):
        calls.append((tuple(t.shape), kwargs.get("elem_dtype")))
        return original(t, fmt, **kwargs)

    tokens, hidden, out_features = 40, 64, 48
    x, w, gamma, b = make_inputs((tokens,), hidden, out_features, seed=14)
    grad_out = torch.randn(tokens, out_features, generator=torch.Generator().manual_seed(15))
    leaves = [t.requires_grad_(True) for t in (x, w, gamma, b)]
    y, _ = run_forward(*leaves, fmt=fmt, grad_cast=grad_cast)
    monkeypatch.setattr(module, "quantize_matrix", spy)
    y.backward(grad_out)
    assert sorted(calls, key=str) == sorted([
        ((tokens, 64), grad_dtype), ((hidden, 64), None),            # H = G W: reduce over N=48 -> 64
        ((out_features, 64), grad_dtype), ((hidden, 64), None),      # dW = G^T xg: reduce over 40 -> 64
    ], key=str)
    y, _ = run_forward(*leaves, fmt=fmt, grad_cast="hp")
    calls.clear()  # the forward casts the weight
    y.backward(grad_out)
    assert calls == []


def test_backward_pads_token_count_to_whole_blocks():
    """37 tokens: the MX weight-gradient GEMM reduces over tokens, padded with zeros to 64; padding
    must change nothing, so the result equals running on the same tokens plus 27 zero-gradient ones."""
    x, w, gamma, b = make_inputs((37,), 64, 32, seed=7)
    grad_out = torch.randn(37, 32, generator=torch.Generator().manual_seed(8))
    grads, _ = op_grads(x, w, gamma, b, grad_out, grad_cast="mx")
    x_pad = torch.cat([x, torch.randn(27, 64, generator=torch.Generator().manual_seed(16))])
    grad_pad = torch.cat([grad_out, torch.zeros(27, 32)])
    grads_pad, _ = op_grads(x_pad, w, gamma, b, grad_pad, grad_cast="mx")
    assert torch.equal(grads[0], grads_pad[0][:37])
    assert torch.equal(grads[1], grads_pad[1])
    assert torch.equal(grads[3], grads_pad[3])
    torch.testing.assert_close(grads[2], grads_pad[2], rtol=1e-6, atol=1e-6)  # summation order differs


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_odd_sizes(fmt):
    """5 tokens, 20 output features (neither a multiple of any block) and, for NVFP4, a hidden size of
    48 (three 16-blocks, not a whole 32-block): only the hidden dim is blocked in the forward, and
    the MX backward pads its reduction dims (tokens, output features) to 32."""
    hidden = 48 if fmt == "nvfp4" else 64
    x, w, gamma, b = make_inputs((5,), hidden, 20, seed=12)
    grad_out = torch.randn(5, 20, generator=torch.Generator().manual_seed(13))
    y, _ = run_forward(x, w, gamma, b, fmt=fmt)
    assert y.shape == (5, 20)
    grads, rho = op_grads(x, w, gamma, b, grad_out, fmt=fmt, grad_cast="hp")
    ref = surrogate_reference(x, w, gamma, b, rho, grad_out, alpha=1.0, gamma_offset=0.0)
    for name, ours, theirs in zip(("x", "weight", "gamma", "bias"), grads, ref):
        assert_close_normwise(ours, theirs, 5e-6, f"grad {name}")
    grads, _ = op_grads(x, w, gamma, b, grad_out, fmt=fmt, grad_cast="mx")
    for name, ours, theirs in zip(("x", "weight", "gamma", "bias"), grads, ref):
        assert (ours.double() - theirs).norm() < 0.15 * theirs.norm(), f"grad {name}"


def test_backward_bfloat16_parameters():
    """bfloat16 model: gradients come back in the parameters' dtypes, and are those of the float32 run on the
    same values rounded once to bfloat16 (on CPU the backward computes in float32 either way)."""
    x, w, gamma, b = make_inputs((2, 32), 64, 32, dtype=torch.bfloat16, seed=9)
    grad_out = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(17)).bfloat16()
    for grad_cast in ("hp", "mx"):
        grads, _ = op_grads(x, w, gamma, b, grad_out, grad_cast=grad_cast, out_dtype=torch.bfloat16)
        assert [t.dtype for t in grads] == [torch.bfloat16] * 4
        grads32, _ = op_grads(*(t.float() for t in (x, w, gamma, b, grad_out)), grad_cast=grad_cast)
        for ours, theirs in zip(grads, grads32):
            torch.testing.assert_close(ours, theirs.bfloat16(), rtol=0, atol=0)


def test_only_requested_gradients():
    x, w, gamma, b = make_inputs((8,), 64, 32, seed=10)
    w.requires_grad_(True)
    y, _ = run_forward(x, w, gamma, b)
    y.sum().backward()
    assert w.grad is not None and x.grad is None and gamma.grad is None


def test_errors():
    x, w, gamma, b = make_inputs((4,), 64, 32)
    with pytest.raises(ConfigError, match="grad_cast"):
        run_forward(x, w, gamma, b, grad_cast="fp16")
    with pytest.raises(ValueError, match="does not take inputs of size 64"):
        run_forward(x, torch.randn(32, 96), gamma, b)
    data, scales, rho, ts = norm_cast(x, None, norm_constant(EPS), norm_constant(0.4), "mxfp8", "mxnorm", 2, "rceil",
                                      True)
    with pytest.raises(ConfigError, match="unknown format"):
        mx_linear(x, rho, data, scales, ts, w, gamma, b, "fp16", "rceil", False, 1.0, torch.float32, "hp")
    with pytest.raises(ConfigError, match="scaled per tensor"):
        mx_linear(x, rho, data, scales, ts, w, gamma, b, "fp8", "rceil", False, 1.0, torch.float32, "hp")


@pytest.mark.parametrize("fmt,grad_cast", [("mxfp8", "mx"), ("nvfp4", "hp")])
def test_opcheck(fmt, grad_cast):
    x, w, gamma, b = make_inputs((2, 3), 64, 32, seed=11)
    spec = get_format(fmt)
    c = norm_constant(gaussian_correction(2, spec.block_size))
    data, scales, rho, ts = norm_cast(x, None, norm_constant(EPS), c, fmt, "mxnorm", 2, "rceil", True)
    args = (x.requires_grad_(True), rho, data, scales, ts, w.requires_grad_(True), gamma.requires_grad_(True),
            b.requires_grad_(True), fmt, "rceil", False, 0.5, torch.float32, grad_cast)
    torch.library.opcheck(mx_linear.default, args)
