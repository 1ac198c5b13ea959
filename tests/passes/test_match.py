"""Matching: every spelling of RMSNorm is found once with the right parameters; nothing else is."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mxrewrite.passes.capture import capture
from mxrewrite.passes.match import NormMatch, find_rms_norms
from tests import zoo

torch.set_num_threads(1)

D = 64
EPS = 1e-5
SHAPES = {2: (6, D), 3: (2, 3, D), 4: (2, 3, 2, D)}


# ---------------------------------------------------------------------------
# spellings: (normalise x without gain, eps inside the root?)

def _mean_sq(x):
    return x.pow(2).mean(-1, keepdim=True)


SPELLINGS = {
    "mul_self_mean_sqrt_div": (lambda x, e: x / torch.sqrt((x * x).mean(-1, keepdim=True) + e), True),
    "pow_mean_pow_neg_half": (lambda x, e: x * (x.pow(2).mean(-1, keepdim=True) + e) ** -0.5, True),
    "square_sum_over_d_rsqrt": (lambda x, e: x * torch.rsqrt(x.square().sum(-1, keepdim=True) / x.shape[-1] + e),
                                True),
    "keepdim_false_unsqueeze": (lambda x, e: x * torch.rsqrt(x.pow(2).mean(-1) + e).unsqueeze(-1), True),
    "one_over_sqrt_none_index": (lambda x, e: x * (1 / torch.sqrt(x.pow(2).mean(-1) + e))[..., None], True),
    "norm_squared_over_d_in_root": (
        lambda x, e: x / torch.sqrt(x.norm(dim=-1, keepdim=True) ** 2 / x.shape[-1] + e), True),
    "norm_over_sqrt_d_plus_eps": (lambda x, e: x / (x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1]) + e), False),
    "vector_norm_times_rsqrt_d_plus_eps": (
        lambda x, e: x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + e), False),
    "sqrt_mean_plus_eps": (lambda x, e: x / (_mean_sq(x).sqrt() + e), False),
    "upcast_rsqrt_downcast": (
        lambda x, e: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + e)).to(x.dtype), True),
    "functional_rms_norm": (lambda x, e: F.rms_norm(x, (x.shape[-1],), eps=e), True),
}


class SpelledNorm(nn.Module):
    """One RMSNorm spelling with eps from a literal, a float attribute or a buffer, and a gain mode."""

    def __init__(self, spelling: str, eps_source: str, gain: str):
        super().__init__()
        self.normalise, _ = SPELLINGS[spelling]
        self.eps_source, self.gain = eps_source, gain
        self.eps = EPS
        self.register_buffer("eps_buffer", torch.tensor(EPS))
        if gain != "none":
            self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        eps = {"literal": 1e-5, "attribute": self.eps, "buffer": self.eps_buffer}[self.eps_source]
        y = self.normalise(x, eps)
        if self.gain == "weight":
            return self.weight * y
        if self.gain == "one_plus_weight":
            return y * (1 + self.weight)
        return y


class Host(nn.Module):
    """norm -> linear, so the norm's output has the consumer it has in a transformer."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.norm(x))


def match_one(model: nn.Module, x: torch.Tensor) -> tuple[NormMatch, fx.GraphModule]:
    gm = capture(model, (x,))
    matches, rejected = find_rms_norms(gm)
    assert rejected == []
    assert len(matches) == 1, [m.name for m in matches]
    return matches[0], gm


def linear_input(gm: fx.GraphModule) -> fx.Node:
    (linear,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    return linear.args[0]


def expected_eps(eps_source: str) -> float:
    return float(torch.tensor(EPS)) if eps_source == "buffer" else EPS


GAIN_OFFSET = {"none": None, "weight": 0.0, "one_plus_weight": 1.0}


@pytest.mark.parametrize("gain", list(GAIN_OFFSET))
@pytest.mark.parametrize("eps_source", ["literal", "attribute", "buffer"])
@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_is_found_once_with_its_parameters(spelling, ndim, eps_source, gain):
    if spelling == "functional_rms_norm" and eps_source == "buffer":
        pytest.skip("F.rms_norm takes eps as a float")
    torch.manual_seed(0)
    model = Host(SpelledNorm(spelling, eps_source, gain))
    m, gm = match_one(model, torch.randn(SHAPES[ndim]))

    assert m.name == m.module == "norm"
    assert m.input.op == "placeholder"
    assert m.output is linear_input(gm)
    assert m.output in m.nodes and m.input not in m.nodes
    assert math.isclose(m.eps, expected_eps(eps_source), rel_tol=1e-9)
    assert m.eps_in_root == SPELLINGS[spelling][1]
    assert m.hidden_size == D
    if gain == "none":
        assert m.gamma is None and m.gamma_offset == 0.0
    else:
        assert m.gamma.op == "get_attr" and m.gamma.target == "norm.weight"
        assert m.gamma_offset == GAIN_OFFSET[gain]
    assert m.spelling


# ---------------------------------------------------------------------------
# library and transformers-style RMSNorm modules, fp32 and bf16

class LlamaStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.randn(D) * 0.1)

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5Style(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class FusedRMSNorm(nn.Module):
    """aten._fused_rms_norm, the op torch's own RMSNorm lowers to on some backends: (output, rstd)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.ops.aten._fused_rms_norm(x, [D], self.weight, 1e-6)[0]


class InPlaceStatistic(nn.Module):
    """``v.add_(eps).rsqrt_()``: export keeps the in-place ops."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        v.add_(1e-6).rsqrt_()
        return self.weight * x.float().mul(v).to(x.dtype)


MODULES = {
    # name: (factory, eps, gain offset or None for no gain, spelling)
    "nn.RMSNorm": (lambda: nn.RMSNorm(D, eps=1e-6), 1e-6, 0.0, "aten.rms_norm"),
    "nn.RMSNorm_no_affine": (lambda: nn.RMSNorm(D, eps=1e-6, elementwise_affine=False), 1e-6, None, "aten.rms_norm"),
    "nn.RMSNorm_default_eps": (lambda: nn.RMSNorm(D), torch.finfo(torch.float32).eps, 0.0, "aten.rms_norm"),
    "llama": (LlamaStyle, 1e-6, 0.0, "pow-mean-rsqrt-mul"),
    "gemma": (GemmaStyle, 1e-6, 1.0, "pow-mean-rsqrt-mul"),
    "t5": (T5Style, 1e-6, 0.0, "pow-mean-rsqrt-mul"),
    "fused_rms_norm": (FusedRMSNorm, 1e-6, 0.0, "aten._fused_rms_norm"),
    "in_place_statistic": (InPlaceStatistic, 1e-6, 0.0, "pow-mean-rsqrt-mul"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("name", list(MODULES))
def test_norm_modules_are_found(name, ndim, dtype):
    factory, eps, offset, spelling = MODULES[name]
    torch.manual_seed(0)
    model = Host(factory()).to(dtype)
    x = torch.randn(SHAPES[ndim], dtype=dtype)
    m, gm = match_one(model, x)
    assert m.name == m.module == "norm" and m.spelling == spelling
    assert m.input.op == "placeholder" and m.output is linear_input(gm)
    assert math.isclose(m.eps, eps, rel_tol=1e-9) and m.eps_in_root
    if offset is None:
        assert m.gamma is None
    else:
        assert m.gamma.target == "norm.weight" and m.gamma_offset == offset


# ---------------------------------------------------------------------------
# more placements

class ScaledAfterNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.norm(x) * 0.5)


def test_a_scalar_multiplier_after_the_norm_is_left_to_the_planner():
    m, gm = match_one(ScaledAfterNorm(), torch.randn(2, 3, D))
    (user,) = m.output.users
    assert user.target is torch.ops.aten.mul.Tensor and 0.5 in user.args


class SharedNorm(nn.Module):
    """One norm module applied twice: two norms, each exactly one call of the module."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x):
        h = self.a(self.norm(x))
        return self.b(self.norm(h))


def test_a_shared_norm_module_gives_one_match_per_call():
    gm = capture(SharedNorm(), (torch.randn(2, 3, D),))
    matches, rejected = find_rms_norms(gm)
    assert len(matches) == 2 and not rejected
    assert [m.name for m in matches] == [m.module for m in matches] == ["norm", "norm"]
    assert matches[0].output is not matches[1].output
    assert {m.gamma.target for m in matches} == {"norm.weight"}


class ReusedRsqrt(nn.Module):
    """The inverse RMS is also used elsewhere: still an RMSNorm."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        rho = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.proj(x * rho), rho


def test_an_intermediate_used_elsewhere_does_not_prevent_the_match():
    m, gm = match_one(ReusedRsqrt(), torch.randn(2, 3, D))
    assert m.output is linear_input(gm) and m.eps == 1e-6


def test_eps_inside_and_outside_the_root_are_told_apart_even_when_large():
    inside = Host(SpelledNorm("pow_mean_pow_neg_half", "literal", "none"))
    outside = Host(SpelledNorm("sqrt_mean_plus_eps", "literal", "none"))
    assert match_one(inside, torch.randn(2, 3, D))[0].eps_in_root
    assert not match_one(outside, torch.randn(2, 3, D))[0].eps_in_root


# ---------------------------------------------------------------------------
# negatives: rejected with a reason, or not a candidate at all

class Fn(nn.Module):
    """A norm-like function of x with an optional parameter, between an input and a linear."""

    def __init__(self, fn, with_param: bool = False):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(D)) if with_param else None
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(self.fn(self, x))


def _layer_norm_decomposed(s, x):
    h = x.float()
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    return ((h - mean) * torch.rsqrt(variance + 1e-5) * s.weight).to(x.dtype)


def _centered_once(s, x):
    c = x - x.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)


class LearnableEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(1e-5))
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        return self.proj(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class InPlaceOnInput(nn.Module):
    """Normalising x in place overwrites a value the residual still reads: not rewritable."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 16)

    def forward(self, x):
        h = x.float()
        h.mul_(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.proj(h), x


NEGATIVES = {
    # name: (module factory, input shape, expected reason substring)
    "nn.LayerNorm": (lambda: Host(nn.LayerNorm(D)), (2, 3, D), "mean-subtracting"),
    "nn.LayerNorm_no_bias": (lambda: Host(nn.LayerNorm(D, bias=False)), (2, 3, D), "mean-subtracting"),
    "layer_norm_decomposed": (lambda: Fn(_layer_norm_decomposed, True), (2, 3, D), "mean-subtracting"),
    "centered_once": (lambda: Fn(_centered_once), (2, 3, D), "mean-subtracting"),
    "var_based": (lambda: Fn(lambda s, x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, keepdim=True, unbiased=False) + 1e-5)), (2, 3, D), "mean-subtracting"),
    "F.normalize": (lambda: Fn(lambda s, x: F.normalize(x, dim=-1)), (2, 3, D), "L2 normalisation"),
    "l2_with_eps": (lambda: Fn(lambda s, x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-5)), (2, 3, D),
                    "L2 normalisation"),
    "l2_norm_div": (lambda: Fn(lambda s, x: x / (x.norm(dim=-1, keepdim=True) + 1e-6)), (2, 3, D),
                    "L2 normalisation"),
    "reduce_dim_1": (lambda: Fn(lambda s, x: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)), (2, 3, D),
                     "reduces over dim 1, not the last dim"),
    "reduce_dims_1_2": (lambda: Fn(lambda s, x: x * torch.rsqrt(x.pow(2).mean((1, 2), keepdim=True) + 1e-5)),
                        (2, 3, D), "reduces over dims (1, 2)"),
    "rms_norm_two_dims": (lambda: Fn(lambda s, x: F.rms_norm(x, (3, D), eps=1e-5)), (2, 3, D), "last 2 dims"),
    "twice_rms": (lambda: Fn(lambda s, x: x * (2 * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))), (2, 3, D),
                  "numerical check failed"),
    "mean_times_two": (lambda: Fn(lambda s, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) * 2 + 1e-5)),
                       (2, 3, D), "numerical check failed"),
    "clamped_rms": (lambda: Fn(lambda s, x: x / _mean_sq(x).sqrt().clamp_min(1e-5)), (2, 3, D), "clamps"),
    "divides_by_mean_square": (lambda: Fn(lambda s, x: x / (_mean_sq(x) + 1e-5)), (2, 3, D), "scales rows"),
    "eps_outside_the_rho": (lambda: Fn(lambda s, x: x * (torch.rsqrt(_mean_sq(x)) + 1e-5)), (2, 3, D),
                            "neither inside nor outside the root"),
    "learnable_eps": (LearnableEps, (2, 3, D), "trainable parameter"),
    "in_place_on_input": (InPlaceOnInput, (2, 3, D), "in place"),
}


@pytest.mark.parametrize("name", list(NEGATIVES))
def test_what_is_not_rms_norm_is_rejected_with_a_reason(name):
    factory, shape, reason = NEGATIVES[name]
    torch.manual_seed(0)
    gm = capture(factory(), (torch.randn(shape),))
    matches, rejected = find_rms_norms(gm)
    assert matches == []
    assert len(rejected) == 1, [r.reason for r in rejected]
    assert reason in rejected[0].reason


class AdaptiveRMSNorm(nn.Module):
    """A gain computed from a conditioning input (adaLN-style): never an RMSNorm's gain."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(8, D)

    def forward(self, x, cond):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y * (1 + self.scale(cond)[:, None, :])


class AdaptiveHost(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(D, 16)

    def forward(self, x, cond):
        return self.proj(self.norm(x, cond))


class FunctionalActivationGain(nn.Module):
    def forward(self, x, cond):
        return F.rms_norm(x, (D,), cond.mean(0), 1e-6)


@pytest.mark.parametrize("norm", [AdaptiveRMSNorm, FunctionalActivationGain])
def test_a_gain_that_depends_on_another_activation_is_rejected(norm):
    gm = capture(AdaptiveHost(norm()), (torch.randn(2, 3, D), torch.randn(2, 8) if norm is AdaptiveRMSNorm
                                         else torch.randn(4, D)))
    matches, rejected = find_rms_norms(gm)
    assert matches == []
    assert [r.reason for r in rejected] == ["gain depends on another activation"]


class OtherTensorByRms(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 16)

    def forward(self, x, y):
        return self.proj(y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 16)

    def forward(self, x, y):
        return self.proj(x.pow(2).mean(-1, keepdim=True) * y + x.abs().pow(3).mean(-1, keepdim=True))


@pytest.mark.parametrize("model", [OtherTensorByRms, NoNorm])
def test_statistics_not_normalising_their_own_tensor_are_ignored(model):
    gm = capture(model(), (torch.randn(2, 3, D), torch.randn(2, 3, D)))
    assert find_rms_norms(gm) == ([], [])


# ---------------------------------------------------------------------------
# the zoo: exact sets, right parameters, and a substitution that keeps the model's outputs

def _reference_rms_norm(x, gamma, eps, eps_in_root, offset, dtype):
    xf = x.float()
    ms = xf.pow(2).mean(-1, keepdim=True)
    y = xf * (torch.rsqrt(ms + eps) if eps_in_root else 1 / (ms.sqrt() + eps))
    if gamma is not None:
        y = y * (gamma.float() + offset)
    return y.to(dtype)


def substitute_reference(gm: fx.GraphModule, m: NormMatch) -> None:
    """Replace the matched norm by the reference formula with the extracted parameters; erase its nodes."""
    with gm.graph.inserting_after(m.output):
        new = gm.graph.call_function(_reference_rms_norm, (m.input, m.gamma, m.eps, m.eps_in_root, m.gamma_offset,
                                                           m.output.meta["val"].dtype))
    m.output.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    for node in reversed(m.nodes):
        if not node.users:
            gm.graph.erase_node(node)
    assert all(n not in gm.graph.nodes for n in m.nodes if n is not m.input), "nodes outlive their norm"


ZOO_DTYPES = [(name, torch.float32) for name in zoo.BUILDERS] + [
    (name, torch.bfloat16) for name in ("llama", "qwen3", "gemma", "olmo2", "torchtitan_llama", "unit_scaling")]


@pytest.mark.parametrize("name,dtype", ZOO_DTYPES, ids=[f"{n}-{str(d)[6:]}" for n, d in ZOO_DTYPES])
def test_zoo_models_match_exactly_their_rms_norms(name, dtype):
    if name in zoo.OPTIONAL_PACKAGES:
        pytest.importorskip(zoo.OPTIONAL_PACKAGES[name])
    z = zoo.build(name, dtype=dtype)
    gm = capture(z.model, z.args, z.kwargs)
    matches, rejected = find_rms_norms(gm)

    assert {m.name for m in matches} == z.rms_norms
    assert all(m.module == m.name for m in matches)   # every zoo norm is a module of its own
    assert len(matches) == len(z.rms_norms)
    assert {r.name for r in rejected} == set(z.other_norms)
    assert all("mean-subtracting" in r.reason for r in rejected)
    for m in matches:
        assert math.isclose(m.eps, z.eps, rel_tol=1e-9) and m.eps_in_root
        assert m.gamma_offset == z.gamma_offset
        if m.gamma is not None:
            assert m.gamma.op == "get_attr" and m.gamma.target == f"{m.name}.weight"
        assert m.hidden_size == m.input.meta["val"].shape[-1]

    with torch.no_grad():
        expected = gm(*z.args, **z.kwargs)
        for m in matches:
            substitute_reference(gm, m)
        gm.graph.lint()
        gm.recompile()
        got = gm(*z.args, **z.kwargs)
    get = (lambda o: o.logits) if hasattr(expected, "logits") else (lambda o: o)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(get(got), get(expected), **tol)
