"""Property: on random models built from blocks, exactly the true RMSNorm -> Linear sites are rewritten.

Each block normalises the residual stream with one of several RMSNorm spellings or a decoy
(LayerNorm, L2 normalisation, a norm over the wrong dim, a data-dependent gain), feeds 1-3
linears (directly, through a view, or through a constant scale) and optionally adds the
normalised value to the residual as an extra, non-linear consumer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxrewrite.api import get_report, optimize

D = 128
EPS = 1e-6


class Norm(nn.Module):
    """One way of writing a norm; ``true_rms`` says whether it is RMSNorm."""

    TRUE = ("nn.RMSNorm", "F.rms_norm", "hf_llama", "sqrt_div", "pow_neg_half", "gemma", "norm_sqrt_d")
    DECOYS = ("layer_norm", "l2_normalize", "wrong_dim", "data_gain")

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.gate = nn.Linear(D, D)  # only the data-dependent-gain decoy uses it
        self.rms = nn.RMSNorm(D, eps=EPS)
        self.ln = nn.LayerNorm(D)

    @property
    def true_rms(self) -> bool:
        return self.spelling in self.TRUE

    def forward(self, x):
        s = self.spelling
        if s == "nn.RMSNorm":
            return self.rms(x)
        if s == "F.rms_norm":
            return F.rms_norm(x, (D,), self.weight, EPS)
        if s == "hf_llama":
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
            return self.weight * h.to(x.dtype)
        if s == "sqrt_div":
            return x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + EPS) * self.weight
        if s == "pow_neg_half":
            return x * (x.pow(2).mean(-1, keepdim=True) + EPS) ** -0.5
        if s == "gemma":
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
            return (h * (1.0 + self.weight.float())).type_as(x)
        if s == "norm_sqrt_d":
            return x / (x.norm(dim=-1, keepdim=True) / D**0.5 + EPS) * self.weight
        if s == "layer_norm":
            return self.ln(x)
        if s == "l2_normalize":
            return F.normalize(x, dim=-1) * self.weight
        if s == "wrong_dim":
            return x * torch.rsqrt(x.pow(2).mean(-2, keepdim=True) + EPS)
        if s == "data_gain":
            return F.rms_norm(x, (D,), None, EPS) * torch.sigmoid(self.gate(x))
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


block_strategy = st.tuples(
    st.sampled_from(Norm.TRUE + Norm.DECOYS),
    st.lists(st.sampled_from(["direct", "view", "scaled"]), min_size=1, max_size=3),
    st.booleans(),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block_strategy, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_exactly_the_true_sites_are_rewritten(blocks, seed):
    torch.manual_seed(seed)
    model = Stack([Block(*b) for b in blocks]).eval()
    x = torch.randn(2, 8, D)
    opt = optimize(model, (x,), progress=False)
    report = get_report(opt)

    def norm_name(i, spelling):  # nn.RMSNorm is a module of its own inside the wrapper
        return f"blocks.{i}.norm" + (".rms" if spelling == "nn.RMSNorm" else "")

    expected = {norm_name(i, b[0]): len(b[1]) for i, b in enumerate(blocks) if b[0] in Norm.TRUE}
    rewritten = {s.norm: len(s.consumers) for s in report.rewritten}
    assert rewritten == expected

    graph = opt.graph_module.graph
    assert sum(n.target is torch.ops.mxrewrite.mx_linear.default for n in graph.nodes) == sum(expected.values())
    out, ref = opt(x), model(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
