"""Rewriting: one fused cast per site, one MX linear per consumer, chains replayed, the rest untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mxrewrite.config import RewriteConfig
from mxrewrite.passes.capture import capture
from mxrewrite.passes.match import find_rms_norms
from mxrewrite.passes.plan import plan
from mxrewrite.passes.rewrite import rewrite
from tests.passes.test_plan import D, FanOut, Head

aten = torch.ops.aten
NORM_CAST = torch.ops.mxrewrite.norm_cast.default
MX_LINEAR = torch.ops.mxrewrite.mx_linear.default


def rewritten(model, x, **config):
    gm = capture(model, (x,))
    matches, rejected = find_rms_norms(gm)
    return rewrite(gm, plan(gm, matches, rejected, RewriteConfig(**config)))


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("norm", ["mxnorm", "rmsnorm"])
def test_fan_out_site_becomes_one_cast_and_four_linears(norm):
    torch.manual_seed(0)
    model, x = FanOut(), torch.randn(3, 5, D)
    gm = rewritten(model, x, norm=norm)
    assert count(gm, NORM_CAST) == 1
    assert count(gm, MX_LINEAR) == 4
    assert count(gm, aten.linear.default) == 1  # only `out`, which no norm feeds
    # the exact norm stays: the residual and h @ h^T still read it
    assert count(gm, aten.rms_norm.default) == 1
    (cast,) = [n for n in gm.graph.nodes if n.target is NORM_CAST]
    linears = [n for n in gm.graph.nodes if n.target is MX_LINEAR]
    if norm == "mxnorm":  # gamma folded into every weight, none in the cast
        assert cast.args[1] is None and all(n.args[6] is not None and n.args[11] is False for n in linears)
    else:  # the exact baseline applies gamma before the cast
        assert cast.args[1] is not None and all(n.args[11] is True for n in linears)
    # other token counts: the rewrite keeps dynamic shapes; numerics stay close to the original
    x2 = torch.randn(4, 9, D)
    assert rel_err(gm(x2), model(x2)) < 0.1


def test_norm_with_only_linear_consumers_disappears():
    torch.manual_seed(0)
    model, ids = Head(), torch.randint(0, 50, (2, 7))
    gm = rewritten(model, ids, include_head=True)
    assert count(gm, aten.rms_norm.default) == 0
    assert count(gm, aten.linear.default) == 0
    assert count(gm, NORM_CAST) == 2 and count(gm, MX_LINEAR) == 2
    assert rel_err(gm(ids), model(ids)) < 0.1


def test_skipped_sites_leave_the_graph_unchanged():
    model, ids = Head(d=48), torch.randint(0, 50, (2, 7))
    gm = rewritten(model, ids)  # 48 is not divisible by 32
    assert count(gm, NORM_CAST) == 0 and count(gm, MX_LINEAR) == 0
    torch.testing.assert_close(gm(ids), model(ids))


def test_replayed_chains_reproduce_output_shapes():
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
    gm = rewritten(model, x, include_head=True)  # a, b, c are returned as they are: output heads
    assert count(gm, MX_LINEAR) == 3
    out, ref = gm(x), model(x)
    for o, r in zip(out[1:], ref[1:]):
        assert o.shape == r.shape
        assert rel_err(o, r) < 0.1


def test_constant_multipliers_survive_exactly():
    """Scalars on the path (h * 0.25) and on the weight (W * 3) become the MX linear's alpha: the
    rewritten model computes exactly 0.75 times the rewrite of the same model without them."""

    class Scaled(nn.Module):
        def __init__(self, path_scale: float, weight_scale: float):
            super().__init__()
            self.norm, self.proj = nn.RMSNorm(D), nn.Linear(D, 32, bias=False)
            self.path_scale, self.weight_scale = path_scale, weight_scale

        def forward(self, x):
            return torch.nn.functional.linear(self.norm(x) * self.path_scale, self.proj.weight * self.weight_scale)

    torch.manual_seed(0)
    plain, scaled = Scaled(1.0, 1.0), Scaled(0.25, 3.0)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, D)
    gm_plain = rewritten(plain, x, include_head=True)
    gm_scaled = rewritten(scaled, x, include_head=True)
    (lin,) = [n for n in gm_scaled.graph.nodes if n.target is MX_LINEAR]
    assert lin.args[12] == 0.75
    torch.testing.assert_close(gm_scaled(x), gm_plain(x) * 0.75, rtol=0, atol=0)
