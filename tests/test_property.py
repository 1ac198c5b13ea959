"""Property: on random models built from blocks, exactly the true RMSNorm -> Linear sites are rewritten.

Each block normalises the residual stream with a norm module, feeds 1-3 linears (directly,
through a view, or through a constant scale) and optionally adds the normalised value to the
residual as an extra, non-linear consumer. The norm is either an RMSNorm spelled from parts
drawn independently (the mean of squares, the root and where eps sits, where the gain is
applied, where casts are) or a decoy:

* structural decoys, turned down before any number is computed: LayerNorm, a norm over the
  wrong dim, gains that depend on the data (through a gate, or through a detached mean of x
  that looks like a constant);
* numerical decoys, which have every part of an RMSNorm but compute something else, so only
  the numerical check can reject them: L2 normalisation (with a clamp or with eps, no 1/sqrt(D)),
  a mean of squares times a constant other than 1, a sum of squares divided by D - 1.

Every model holds at least one numerical decoy, so every example runs the numerical check to
a rejection (and every true site to a confirmation).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxrewrite.api import get_report, optimize
from mxrewrite.modules import MXLinear

D = 128
EPS = 1e-6

# the parts of a true RMSNorm: mean(h**2) without eps; the normaliser from it, applied by mul or div
MEANS = {
    "mean": lambda h: h.pow(2).mean(-1, keepdim=True),
    "sum_times_inv_d": lambda h: (h * h).sum(-1, keepdim=True) * (1 / D),
    "sum_div_d": lambda h: h.square().sum(-1, keepdim=True) / D,
    "norm_squared": lambda h: h.norm(dim=-1, keepdim=True) ** 2 / D,
}
INVERSE_ROOTS = {  # multiply by these
    "rsqrt": lambda ms: torch.rsqrt(ms + EPS),
    "pow_neg_half": lambda ms: (ms + EPS).pow(-0.5),
    "one_over_sqrt": lambda ms: 1 / torch.sqrt(ms + EPS),
    "one_over_rms_plus_eps": lambda ms: 1 / (ms.sqrt() + EPS),
}
ROOTS = {  # divide by these
    "sqrt": lambda ms: torch.sqrt(ms + EPS),
    "pow_half": lambda ms: (ms + EPS).pow(0.5),
    "starstar_half": lambda ms: (ms + EPS) ** 0.5,
    "rms_plus_eps": lambda ms: ms.sqrt() + EPS,
    "norm_times_inv_sqrt_d_plus_eps": None,   # reads h itself: x.norm() * (1/sqrt(D)) + eps
}
GAINS = ("none", "after", "before", "one_plus_after", "on_rho")
CASTS = ("none", "float64", "float64_statistic")

STRUCTURAL_DECOYS = ("layer_norm", "wrong_dim", "data_gain", "detached_gain")
NUMERICAL_DECOYS = ("l2_normalize", "l2_eps", "half_mean", "sum_over_d_minus_1")
NUMERICAL_REASONS = ("numerical check failed", "L2 normalisation")


def _spelled_rms_norm(x: torch.Tensor, w: torch.Tensor, mean: str, root: str, gain: str, cast: str) -> torch.Tensor:
    """RMSNorm of x over the last dim with eps=EPS, spelled from the drawn parts."""
    h = x.double() if cast == "float64" else x
    stat_h = h.double() if cast == "float64_statistic" else h
    g = w.to(h.dtype)
    if gain == "before" or (gain == "on_rho" and root in ROOTS):
        h = g * h
    if root == "norm_times_inv_sqrt_d_plus_eps":
        y = h / (stat_h.norm(dim=-1, keepdim=True) * (1 / math.sqrt(D)) + EPS).to(h.dtype)
    elif root in ROOTS:
        y = h / ROOTS[root](MEANS[mean](stat_h)).to(h.dtype)
    else:
        rho = INVERSE_ROOTS[root](MEANS[mean](stat_h)).to(h.dtype)
        y = h * (rho * g if gain == "on_rho" else rho)
    if gain == "after":
        y = g * y
    elif gain == "one_plus_after":
        y = y * (1 + g)
    return y.to(x.dtype)


class Norm(nn.Module):
    """One way of writing a norm; ``spelling`` is a decoy's name or ``"rms:mean:root:gain:cast"``."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.gate = nn.Linear(D, D)  # only the data-dependent-gain decoy uses it
        self.rms = nn.RMSNorm(D, eps=EPS)
        self.ln = nn.LayerNorm(D)

    @property
    def true_rms(self) -> bool:
        return self.spelling == "nn.RMSNorm" or self.spelling.startswith("rms:")

    def forward(self, x):
        s, w = self.spelling, self.weight
        if s.startswith("rms:"):
            return _spelled_rms_norm(x, w, *s.split(":")[1:])
        if s == "nn.RMSNorm":
            return self.rms(x)
        if s == "layer_norm":
            return self.ln(x)
        if s == "wrong_dim":
            return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + EPS)
        if s == "data_gain":
            return F.rms_norm(x, (D,), None, EPS) * torch.sigmoid(self.gate(x))
        if s == "detached_gain":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (w * x.detach().abs().mean())
        if s == "l2_normalize":
            return F.normalize(x, dim=-1) * w
        if s == "l2_eps":
            return x / (x.norm(dim=-1, keepdim=True) + EPS) * w
        if s == "half_mean":
            return x * torch.rsqrt(0.5 * x.pow(2).mean(-1, keepdim=True) + EPS) * w
        if s == "sum_over_d_minus_1":
            return w * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / (D - 1) + EPS)
        raise AssertionError(s)


class Block(nn.Module):
    def __init__(self, spelling: str, routes: list[str], extra_consumer: bool):
        super().__init__()
        self.norm = Norm(spelling)
        self.linears = nn.ModuleList(nn.Linear(D, D) for _ in routes)
        self.routes, self.extra_consumer = routes, extra_consumer

    def forward(self, x):
        h = self.norm(x)
        out = x
        for route, linear in zip(self.routes, self.linears):
            if route == "direct":
                out = out + linear(h)
            elif route == "view":
                out = out + linear(h.reshape(-1, D)).reshape(x.shape)
            else:  # "scaled"
                out = out + linear(h * 0.5)
        return out + h if self.extra_consumer else out


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _true_spelling() -> st.SearchStrategy[str]:
    roots = st.sampled_from(list(INVERSE_ROOTS) + list(ROOTS))
    parts = st.tuples(st.sampled_from(list(MEANS)), roots, st.sampled_from(GAINS), st.sampled_from(CASTS))
    return st.one_of(st.just("nn.RMSNorm"), parts.map(lambda p: "rms:" + ":".join(p)))


def _block(spellings: st.SearchStrategy[str]) -> st.SearchStrategy[tuple]:
    routes = st.lists(st.sampled_from(["direct", "view", "scaled"]), min_size=1, max_size=3)
    return st.tuples(spellings, routes, st.booleans())


any_block = _block(st.one_of(_true_spelling(), st.sampled_from(STRUCTURAL_DECOYS + NUMERICAL_DECOYS)))


@st.composite
def stacks(draw) -> list[tuple]:
    """1-3 blocks of any kind, and one numerical decoy somewhere among them."""
    blocks = draw(st.lists(any_block, min_size=1, max_size=3))
    position = draw(st.integers(0, len(blocks)))
    return blocks[:position] + [draw(_block(st.sampled_from(NUMERICAL_DECOYS)))] + blocks[position:]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=stacks(), seed=st.integers(0, 2**16))
def test_exactly_the_true_sites_are_rewritten(blocks, seed):
    torch.manual_seed(seed)
    model = Stack([Block(*b) for b in blocks]).eval()
    x = torch.randn(2, 8, D)
    opt = optimize(model, (x,), progress=False)
    report = get_report(opt)

    def norm_name(i, spelling):  # nn.RMSNorm is a module of its own inside the wrapper
        return f"blocks.{i}.norm" + (".rms" if spelling == "nn.RMSNorm" else "")

    expected = {norm_name(i, b[0]): len(b[1]) for i, b in enumerate(blocks) if model.blocks[i].norm.true_rms}
    rewritten = {s.norm: len(s.consumers) for s in report.rewritten}
    assert rewritten == expected
    assert sum(isinstance(m, MXLinear) for m in opt.modules()) == sum(expected.values())

    # the numerical check ran to a rejection: every kind of numerical decoy in the model is reported as such
    # (blocks of one structure are analysed once, so a kind is reported at least once, not once per block)
    spelling_of = {f"blocks.{i}.norm": b[0] for i, b in enumerate(blocks)}
    numerical = {spelling_of[r.name] for r in report.rejected if r.reason.startswith(NUMERICAL_REASONS)}
    assert numerical == {b[0] for b in blocks if b[0] in NUMERICAL_DECOYS}
    assert not any(model.blocks[int(r.name.split(".")[1])].norm.true_rms for r in report.rejected)

    out, ref = opt(x), model(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
