"""Planning: which consumers of each norm become MX linears, which keep the exact norm, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mxrewrite.config import RewriteConfig
from mxrewrite.passes.capture import capture
from mxrewrite.passes.match import find_rms_norms
from mxrewrite.passes.plan import plan

D = 64


def plan_of(model: nn.Module, x: torch.Tensor, **config):
    gm = capture(model, (x,))
    matches, rejected = find_rms_norms(gm)
    return plan(gm, matches, rejected, RewriteConfig(**config))


def site_named(p, name):
    (site,) = [s for s in p.sites if s.match.name == name]
    return site


class FanOut(nn.Module):
    """q, k, v through views and a transpose, a scalar multiplier, a residual and an attention-like matmul."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, 32, bias=False), nn.Linear(D, 32, bias=False)
        self.w_raw = nn.Parameter(torch.randn(D, 16) / 8)  # used as x @ w_raw
        self.out = nn.Linear(D + 32 + 32 + 16, 8)

    def forward(self, x):
        h = self.norm(x)
        q = self.q(h.reshape(-1, D)).reshape(*x.shape[:-1], D)
        k = self.k(h * 0.5)
        v = self.v(h.transpose(0, 1)).transpose(0, 1)
        m = h @ self.w_raw
        scores = (h @ h.transpose(-1, -2)).mean()  # activation x activation: not a linear
        return self.out(torch.cat([q + h, k, v, m], -1)) + scores


def test_fan_out_is_one_site_with_every_linear():
    p = plan_of(FanOut(), torch.randn(3, 5, D))
    site = site_named(p, "norm")
    assert site.status == "rewritten"
    assert sorted(lin.name for lin in site.linears) == ["k", "q", "v", "w_raw"]
    alphas = {lin.name: lin.alpha for lin in site.linears}
    assert alphas == {"q": 1.0, "k": 0.5, "v": 1.0, "w_raw": 1.0}
    assert {lin.name: lin.weight_transposed for lin in site.linears}["w_raw"] is True
    kept = {k.reason for k in site.kept}
    assert kept == {"not a linear layer", "weight is not a parameter"}  # the residual add; h @ h^T
    assert "exact RMSNorm kept for" in site.reason


class Head(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.block_norm, self.up = nn.RMSNorm(d), nn.Linear(d, d)
        self.final_norm, self.lm_head = nn.RMSNorm(d), nn.Linear(d, 50)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.up(self.block_norm(h))
        return self.lm_head(self.final_norm(h))


def test_output_head_is_skipped_unless_included():
    ids = torch.randint(0, 50, (2, 7))
    p = plan_of(Head(), ids)
    assert site_named(p, "block_norm").status == "rewritten"
    head = site_named(p, "final_norm")
    assert head.status == "skipped" and "output head" in head.reason and "lm_head" in head.reason
    p = plan_of(Head(), ids, include_head=True)
    assert site_named(p, "final_norm").status == "rewritten"


def test_hidden_size_not_divisible_by_block_is_skipped():
    ids = torch.randint(0, 50, (2, 7))
    p = plan_of(Head(d=48), ids, include_head=True)  # 48 = 3 * 16: NVFP4 yes, MXFP8 no
    assert all(s.status == "skipped" and "not divisible by the mxfp8 block size 32" in s.reason for s in p.sites)
    p = plan_of(Head(d=48), ids, include_head=True, format="nvfp4")
    assert all(s.status == "rewritten" for s in p.sites)


class Router(nn.Module):
    """A MoE-style router (top-k over its logits) and an expert gated by it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.router = nn.Linear(D, 4, bias=False)
        self.expert = nn.Linear(D, D)

    def forward(self, x):
        h = self.norm(x)
        weights, idx = torch.topk(self.router(h).softmax(-1), 2)
        return self.expert(h) * weights.sum(-1, keepdim=True) + idx.float().sum()


def test_moe_router_stays_high_precision():
    site = site_named(plan_of(Router(), torch.randn(2, 6, D)), "norm")
    assert [lin.name for lin in site.linears] == ["expert"]
    assert [(k.name, k.reason) for k in site.kept] == [
        ("router", "MoE router (its output selects experts through top-k)")]


class Float32Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.gate = nn.Linear(D, 8).to(torch.bfloat16)
        self.score = nn.Linear(D, 4)  # float32 parameters in a bfloat16 model: only the input is upcast
        self.proj = nn.Linear(D, D).to(torch.bfloat16)

    def forward(self, x):
        h = self.norm(x)
        scores = F.linear(h.float(), self.gate.weight.float())  # deliberately in fp32
        return self.proj(h).float().sum(-1) + scores.sum(-1) + self.score(h.float()).sum(-1)


def test_explicit_float32_linear_is_kept():
    model = Float32Linear()
    model.norm.to(torch.bfloat16)
    site = site_named(plan_of(model, torch.randn(2, 4, D, dtype=torch.bfloat16)), "norm")
    assert [lin.name for lin in site.linears] == ["proj"]
    assert sorted((k.name, k.reason) for k in site.kept) == [
        (name, "computed in float32 on purpose (explicit upcast before it)") for name in ("gate", "score")]


class OnlyResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x) + self.norm(x)  # post-norm style: the norm feeds no linear


def test_norm_without_linear_consumer_is_skipped_with_reason():
    site = site_named(plan_of(OnlyResidual(), torch.randn(2, 4, D)), "norm")
    assert site.status == "skipped"
    assert site.reason.startswith("no linear consumer to fuse with") and "add" in site.reason


class Float64Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D).double()
        self.proj = nn.Linear(D, D).double()

    def forward(self, x):
        return self.proj(self.norm(x))


def test_unsupported_dtype_is_skipped():
    site = site_named(plan_of(Float64Model(), torch.randn(2, 4, D, dtype=torch.float64)), "norm")
    assert site.status == "skipped" and "unsupported dtype torch.float64" in site.reason


def test_rescale_constant_follows_config():
    x = torch.randn(2, 4, D)
    assert site_named(plan_of(OnlyResidual(), x), "norm").correction == 1.0  # skipped site
    fan = FanOut()
    assert site_named(plan_of(fan, x), "norm").correction == pytest.approx(0.418492)
    assert site_named(plan_of(fan, x, format="nvfp4", p=1), "norm").correction == pytest.approx(0.481458)
    assert site_named(plan_of(fan, x, rescale="none"), "norm").correction == 1.0
    assert site_named(plan_of(fan, x, norm="rmsnorm"), "norm").correction == 1.0
