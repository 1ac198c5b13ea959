"""Rewriting: the norm and the linears it feeds become mxrewrite modules; everything else stays the model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mxrewrite.api import get_report, optimize
from mxrewrite.modules import MXLinear, MXRMSNorm
from tests.helpers import MXCallCounter
from tests.passes.test_plan import D, FanOut, Head


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("norm", ["mxnorm", "rmsnorm"])
def test_fan_out_site_becomes_one_cast_and_three_mx_linears(norm):
    torch.manual_seed(0)
    model, x = FanOut(), torch.randn(3, 5, D)
    opt = optimize(model, (x,), norm=norm, progress=False)
    assert type(opt) is FanOut and opt is not model
    assert isinstance(opt.norm, MXRMSNorm) and opt.norm.settings.gain_in_cast == (norm == "rmsnorm")
    assert all(isinstance(m, MXLinear) for m in (opt.q, opt.k, opt.v))
    assert type(opt.out) is nn.Linear  # no norm feeds it
    (site,) = get_report(opt).rewritten
    assert site.consumers == ("q", "k", "v")
    assert any("w_raw" in k and "not an nn.Linear" in k for k in site.kept_consumers)
    counter = MXCallCounter(opt)
    x2 = torch.randn(4, 9, D)  # another token count
    out = opt(x2)
    # one cast per call, and every MX linear really multiplied it (through the reshape, scale and transpose)
    assert counter.norms == {"norm": 1} and counter.linears == {"q": 1, "k": 1, "v": 1}
    assert rel_err(out, model(x2)) < 0.1


def test_non_linear_consumers_read_the_exact_norm():
    """Residual, bare matmul and h @ h^T read the exact RMSNorm: with the MX linears' outputs replaced by the
    original ones, the rewritten model computes the original exactly."""
    torch.manual_seed(0)
    model, x = FanOut(), torch.randn(3, 5, D)
    opt = optimize(model, (x,), progress=False)
    for name in ("q", "k", "v"):
        original = getattr(model, name)
        getattr(opt, name).register_forward_hook(lambda m, args, out, original=original: original(args[0].exact()))
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_norm_with_only_linear_consumers():
    torch.manual_seed(0)
    model, ids = Head(), torch.randint(0, 50, (2, 7))
    opt = optimize(model, (ids,), include_head=True, progress=False)
    assert isinstance(opt.block_norm, MXRMSNorm) and isinstance(opt.final_norm, MXRMSNorm)
    assert isinstance(opt.up, MXLinear) and isinstance(opt.lm_head, MXLinear)
    assert rel_err(opt(ids), model(ids)) < 0.1


def test_skipped_sites_leave_the_model_unchanged():
    model, ids = Head(d=48), torch.randint(0, 50, (2, 7))
    opt = optimize(model, (ids,), progress=False)  # 48 is not divisible by 32
    assert not any(isinstance(m, (MXRMSNorm, MXLinear)) for m in opt.modules())
    torch.testing.assert_close(opt(ids), model(ids), rtol=0, atol=0)


def test_row_preserving_views_keep_the_cast():
    class Chains(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(D)
            self.a, self.b, self.c = nn.Linear(D, 16), nn.Linear(D, 16), nn.Linear(D, 16)

        def forward(self, x):
            h = self.norm(x)
            a = self.a(h.unsqueeze(1).flatten(0, 1))          # (B, 1, S, D) -> (B, S, D)
            b = self.b(h[:, 1:].contiguous())                # leading-dim slice
            c = self.c(h.permute(1, 0, 2).reshape(-1, D))     # permute keeping the last dim, then flatten
            return a.sum() + b.sum() + c.sum(), a, b, c

    torch.manual_seed(0)
    model, x = Chains(), torch.randn(3, 6, D)
    opt = optimize(model, (x,), include_head=True, progress=False)  # a, b, c are returned: output heads
    counter = MXCallCounter(opt)
    out, ref = opt(x), model(x)
    assert counter.linears == {"a": 1, "b": 1, "c": 1} and counter.plain_linears == {}
    for o, r in zip(out[1:], ref[1:]):
        assert o.shape == r.shape
        assert rel_err(o, r) < 0.1


@pytest.mark.parametrize("op", ["mul", "div"])
def test_constant_multipliers_survive_exactly(op):
    """A scalar on the path (h * 0.25 or h / 4) rides along as the cast's alpha: the rewritten model computes
    exactly 0.25 times the rewrite of the same model without it, in its MX linear, in a consumer that reads
    the exact norm, and in every gradient (a power of two commutes with rounding)."""

    class Scaled(nn.Module):
        def __init__(self, op: str | None):
            super().__init__()
            self.norm, self.proj = nn.RMSNorm(D), nn.Linear(D, 32, bias=False)
            self.op = op

        def forward(self, x):
            h = self.norm(x)
            h = h * 0.25 if self.op == "mul" else h / 4 if self.op == "div" else h
            return self.proj(h) + h.sum(-1, keepdim=True)  # an MX linear and a consumer of the exact value

    torch.manual_seed(0)
    plain, scaled = Scaled(None), Scaled(op)
    with torch.no_grad():
        plain.norm.weight.copy_(1 + 0.3 * torch.randn(D))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, D, requires_grad=True)
    opt_plain = optimize(plain, (x,), include_head=True, progress=False)
    opt_scaled = optimize(scaled, (x,), include_head=True, progress=False)
    counter = MXCallCounter(opt_scaled)
    out_plain, out_scaled = opt_plain(x), opt_scaled(x)
    torch.testing.assert_close(out_scaled, out_plain * 0.25, rtol=0, atol=0)
    assert counter.linears == {"proj": 1}
    g = torch.randn(out_plain.shape, generator=torch.Generator().manual_seed(1))
    grads_plain = torch.autograd.grad(out_plain, [x, *plain.parameters()], g)
    grads_scaled = torch.autograd.grad(out_scaled, [x, *scaled.parameters()], g)
    for ours, theirs in zip(grads_scaled, grads_plain):
        torch.testing.assert_close(ours, theirs * 0.25, rtol=0, atol=0)


def test_a_linear_called_with_other_inputs_stays_nn_linear_for_them():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.RMSNorm(D), nn.Linear(D, D)

        def forward(self, x):
            return self.proj(self.norm(x)) + self.proj(x)

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(2, 5, D)
    opt = optimize(model, (x,), include_head=True, progress=False)
    counter = MXCallCounter(opt)
    out = opt(x)
    assert counter.linears == {"proj": 1} and counter.plain_linears == {"proj": 1}
    assert rel_err(out, model(x)) < 0.1
