"""Matching, continued: which module a norm is, norms applied to norms, and rearranged formulas.

* a match's ``module`` is the innermost module whose forward is exactly the norm, per call:
  a norm module called at two places gives two matches named after it; a norm written inline
  in a bigger forward has none;
* ``n2(n1(x))``: two matches that do not overlap, the second reading the first's output;
* the gain before the division, constants folded differently, every root, casts anywhere: the
  same RMSNorm with the same eps; a wrong constant is rejected by the numerical check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mxrewrite.passes.capture import capture
from mxrewrite.passes.match import find_rms_norms
from tests.passes.test_match import D, FusedRMSNorm, GemmaStyle, LlamaStyle, T5Style

torch.set_num_threads(1)

EPS = 1e-5


def matches_of(model: nn.Module, *inputs: torch.Tensor):
    matches, rejected = find_rms_norms(capture(model, inputs))
    assert rejected == [], [r.reason for r in rejected]
    return matches


# ---------------------------------------------------------------------------
# task: which module computes the norm

class Olmo2Style(nn.Module):
    """Casts after its gain: ``(w * h).to(input_dtype)``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * h).to(x.dtype)


STYLES = {"nn.RMSNorm": lambda: nn.RMSNorm(D, eps=1e-6), "llama": LlamaStyle, "gemma": GemmaStyle,
          "olmo2": Olmo2Style}


class Twice(nn.Module):
    """One norm module applied before the layers and again before the head."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.layer = nn.Linear(D, D)
        self.head = nn.Linear(D, 16)

    def forward(self, x):
        h = x + self.layer(self.norm(x))
        return self.head(self.norm(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style", list(STYLES))
def test_each_call_of_a_shared_norm_module_is_named_by_the_module(style, dtype):
    torch.manual_seed(0)
    first, second = matches_of(Twice(STYLES[style]()).to(dtype), torch.randn(2, 3, D, dtype=dtype))
    assert first.module == second.module == first.name == second.name == "norm"
    assert first.input.op == "placeholder" and second.input.op != "placeholder"
    assert not set(first.nodes) & set(second.nodes)


class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = LlamaStyle()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(self.norm(x))
        return x


def test_a_norm_module_called_in_a_loop_gives_one_named_match_per_call():
    matches = matches_of(Loop(), torch.randn(2, 3, D))
    assert [m.module for m in matches] == ["norm"] * 3


class Forwarding(nn.Module):
    """A module whose forward only calls its child norm."""

    def __init__(self, child: nn.Module):
        super().__init__()
        self.inner = child

    def forward(self, x):
        return self.inner(x)


class GainAroundNorm(nn.Module):
    """The gain is the wrapper's: the child norm has none, so only the wrapper computes the whole norm."""

    def __init__(self):
        super().__init__()
        self.inner = nn.RMSNorm(D, elementwise_affine=False)
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return self.weight * self.inner(x)


class Host(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.norm(x))


@pytest.mark.parametrize("child", ["nn.RMSNorm", "llama"])
def test_a_forwarding_module_names_its_child(child):
    (m,) = matches_of(Host(Forwarding(STYLES[child]())), torch.randn(2, 3, D))
    assert m.module == m.name == "norm.inner"
    assert m.gamma.target == "norm.inner.weight"


def test_a_gain_applied_by_the_wrapper_makes_the_wrapper_the_norm():
    (m,) = matches_of(Host(GainAroundNorm()), torch.randn(2, 3, D))
    assert m.module == "norm" and m.gamma.target == "norm.weight"


class CastByTheCaller(nn.Module):
    """The block casts the norm module's output: the cast is the block's, not part of the norm module."""

    def __init__(self):
        super().__init__()
        self.norm = LlamaStyle()
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.norm(x.float()).to(torch.bfloat16).float())


def test_a_cast_the_caller_applies_stays_outside_the_norm_module():
    (m,) = matches_of(CastByTheCaller(), torch.randn(2, 3, D))
    assert m.module == "norm"
    assert torch.ops.aten.to.dtype in {u.target for u in m.output.users}


class InlineBlock(nn.Module):
    """The norm is written in the block's forward, which also computes the residual and a linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.proj(self.weight * h.to(x.dtype))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = InlineBlock()

    def forward(self, x):
        return self.block(x)


def test_a_norm_written_inline_has_no_module():
    (m,) = matches_of(Blocks(), torch.randn(2, 3, D))
    assert m.module is None and m.name == m.output.name
    assert m.gamma.target == "block.weight"


# ---------------------------------------------------------------------------
# task: a norm applied to another norm's output

class Chain(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.n1, self.n2 = first, second
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.n2(self.n1(x)))


CHAIN_STYLES = {**STYLES, "t5": T5Style, "fused": FusedRMSNorm}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("second", ["nn.RMSNorm", "llama", "t5"])   # no upcast, an upcast, a partial upcast
@pytest.mark.parametrize("first", list(CHAIN_STYLES))
def test_a_norm_of_a_norm_gives_two_matches(first, second, dtype):
    torch.manual_seed(0)
    model = Chain(CHAIN_STYLES[first](), CHAIN_STYLES[second]()).to(dtype)
    n1, n2 = matches_of(model, torch.randn(2, 3, D, dtype=dtype))
    assert (n1.module, n2.module) == ("n1", "n2")
    assert n2.input is n1.output
    assert not set(n1.nodes) & set(n2.nodes)
    assert n1.gamma.target == "n1.weight" and n2.gamma.target == "n2.weight"


class InlineChain(nn.Module):
    """Two Llama-style norms in one forward; the second upcasts the first's output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        for _ in range(2):
            h = x.float()
            x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_inline_norms_in_a_row_do_not_overlap(dtype):
    n1, n2 = matches_of(InlineChain().to(dtype), torch.randn(2, 3, D, dtype=dtype))
    assert n1.module is None and n2.module is None
    assert not set(n1.nodes) & set(n2.nodes)
    assert n2.input is n1.output or n2.input in n1.output.users


# ---------------------------------------------------------------------------
# task: rearranged formulas

def _ms(x):
    return x.pow(2).mean(-1, keepdim=True)


FORMS = {
    # name: (norm of x with gain w, eps in the root?, gain offset or None)
    "gain_first_rsqrt": (lambda x, w: (w * x) * torch.rsqrt(_ms(x) + EPS), True, 0.0),
    "gain_first_div_sqrt": (lambda x, w: (x * w) / torch.sqrt(_ms(x) + EPS), True, 0.0),
    "one_plus_gain_first": (lambda x, w: ((1 + w) * x) * torch.rsqrt(_ms(x) + EPS), True, 1.0),
    "gain_on_rho": (lambda x, w: x * (torch.rsqrt(_ms(x) + EPS) * w), True, 0.0),
    "norm_times_inv_sqrt_d": (lambda x, w: x / (x.norm(dim=-1, keepdim=True) * (1 / math.sqrt(D)) + EPS), False,
                              None),
    "sqrt_d_over_norm": (lambda x, w: x * (math.sqrt(D) / (x.norm(dim=-1, keepdim=True) + EPS * math.sqrt(D))),
                         False, None),
    "sum_times_inv_d": (lambda x, w: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) * (1 / D) + EPS), True, None),
    "sum_div_d": (lambda x, w: w * (x * torch.rsqrt(x.square().sum(-1, keepdim=True) / D + EPS)), True, 0.0),
    "eps_added_to_the_sum": (lambda x, w: x * torch.rsqrt((x.pow(2).sum(-1, keepdim=True) + EPS * D) / D), True,
                             None),
    "pow_half": (lambda x, w: x / (_ms(x) + EPS).pow(0.5), True, None),
    "starstar_half": (lambda x, w: x / (_ms(x) + EPS) ** 0.5, True, None),
    "one_over_sqrt": (lambda x, w: x * (1 / torch.sqrt(_ms(x) + EPS)), True, None),
    "reciprocal_sqrt": (lambda x, w: x * torch.reciprocal(torch.sqrt(_ms(x) + EPS)), True, None),
    "pow_neg_half": (lambda x, w: x * (_ms(x) + EPS).pow(-0.5), True, None),
    "casts_everywhere": (lambda x, w: ((w.float() * x.float()) * torch.rsqrt(
        _ms(x.float()).double().add(EPS)).float()).to(x.dtype), True, 0.0),
    "gain_first_then_upcast": (lambda x, w: (x * w).float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                         + EPS), True, 0.0),
}


class Form(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x):
        return self.fn(x, self.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_rearranged_formulas_are_the_same_rms_norm(form, dtype):
    fn, in_root, offset = FORMS[form]
    torch.manual_seed(0)
    (m,) = matches_of(Host(Form(fn)).to(dtype), torch.randn(2, 3, D, dtype=dtype))
    assert m.module == "norm" and m.input.op == "placeholder"
    assert math.isclose(m.eps, EPS, rel_tol=1e-9) and m.eps_in_root == in_root
    if offset is None:
        assert m.gamma is None
    else:
        assert m.gamma.target == "norm.weight" and m.gamma_offset == offset


WRONG = {
    # name: (a norm-like function of x and a gain w, expected reason)
    "l2_with_eps": (lambda x, w: x / (x.norm(dim=-1, keepdim=True) + EPS), "L2 normalisation"),
    "half_the_mean": (lambda x, w: x * torch.rsqrt(0.5 * _ms(x) + EPS), "numerical check failed"),
    "sum_over_d_minus_1": (lambda x, w: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / (D - 1) + EPS),
                           "numerical check failed"),
    "gain_first_over_d_minus_1": (lambda x, w: (w * x) * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / (D - 1) + EPS),
                                  "numerical check failed"),
    "root_of_the_wrong_constant": (lambda x, w: x / (x.norm(dim=-1, keepdim=True) * (1 / math.sqrt(D - 1)) + EPS),
                                   "numerical check failed"),
    "ninety_nine_percent_of_the_mean": (lambda x, w: x * torch.rsqrt(0.99 * _ms(x) + EPS), "numerical check failed"),
    "two_gains": (lambda x, w: (w * x) * (torch.rsqrt(_ms(x) + EPS) * w), "applies two gains"),
    "negated": (lambda x, w: x * (-1 / torch.sqrt(_ms(x) + EPS)), "multiplies the statistic by -1"),
    "gain_of_the_data": (lambda x, w: x * torch.rsqrt(_ms(x) + EPS) * (w * x.detach().abs().mean()),
                         "gain depends on another activation"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", list(WRONG))
def test_wrong_constants_are_rejected_numerically_in_any_precision(form, dtype):
    """A constant factor within bfloat16's per-row tolerance (D/(D-1), 0.99) is still caught."""
    fn, reason = WRONG[form]
    torch.manual_seed(0)
    matches, rejected = find_rms_norms(capture(Host(Form(fn)).to(dtype), (torch.randn(2, 3, D, dtype=dtype),)))
    assert matches == []
    assert len(rejected) == 1 and reason in rejected[0].reason, [r.reason for r in rejected]

