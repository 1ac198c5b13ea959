"""The public API: optimize / get_report on small models (zoo models are in test_models.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from mxrewrite.api import get_report, optimize
from mxrewrite.config import RewriteConfig
from mxrewrite.errors import ConfigError, MXRewriteError
from tests.passes.test_plan import D, Head
from tests.reference_model import GAUSSIAN_C, SiteSpec, reference_model
from tests.test_reference import check_gradients


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def head_model():
    torch.manual_seed(0)
    return Head(), torch.randint(0, 50, (2, 7))


def test_parameters_are_shared_under_the_same_names(head_model):
    model, ids = head_model
    opt = optimize(model, (ids,))
    assert type(opt) is type(model) and opt is not model
    ours, theirs = dict(opt.named_parameters()), dict(model.named_parameters())
    assert list(ours) == list(theirs) and all(ours[n] is theirs[n] for n in ours)
    assert list(opt.state_dict()) == list(model.state_dict())
    # a state_dict loads both ways, and the rewritten modules see the loaded values
    donor = Head()
    opt.load_state_dict(donor.state_dict())
    torch.testing.assert_close(model.up.weight, donor.up.weight)
    model.load_state_dict(opt.state_dict())
    assert rel_err(opt(ids), donor(ids)) < 0.1


def test_original_model_is_not_modified(head_model):
    model, ids = head_model
    before = copy.deepcopy(model.state_dict())
    expected = model(ids)
    optimize(model, (ids,), format="nvfp4")
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_lazy_capture_on_first_call(head_model):
    model, ids = head_model
    opt = optimize(model)
    with pytest.raises(MXRewriteError, match="call it once"):
        get_report(opt)
    out = opt(ids)
    assert rel_err(out, model(ids)) < 0.1
    assert len(get_report(opt).rewritten) == 1


def test_optimizing_twice_changes_nothing(head_model):
    model, ids = head_model
    opt = optimize(model, (ids,))
    assert optimize(opt, (ids,)) is opt


def test_config_overrides_and_errors(head_model):
    model, ids = head_model
    opt = optimize(model, (ids,), config=RewriteConfig(format="nvfp4"), p=1)
    assert opt.mx_config == RewriteConfig(format="nvfp4", p=1)
    with pytest.raises(ConfigError, match="format='fp16'"):
        optimize(model, (ids,), format="fp16")
    with pytest.raises(ConfigError, match="unknown RewriteConfig option"):
        optimize(model, (ids,), formats="nvfp4")
    with pytest.raises(ConfigError, match="nn.Module"):
        optimize(lambda x: x, (ids,))
    with pytest.raises(ConfigError, match="example inputs"):
        optimize(model, 3)


def test_keyword_inputs_and_dynamic_token_counts(head_model):
    model, ids = head_model
    opt = optimize(model, {"ids": ids})
    other = torch.randint(0, 50, (5, 11))
    assert rel_err(opt(ids=other), model(ids=other)) < 0.1


def test_training_step_matches_the_float64_reference():
    """Both norms rewritten (include_head=True, random gains): a training step's gradients are those of the
    float64 straight-through reference (``tests/reference_model.py``, ``test_reference.py``'s tolerances), and
    SGD over the optimized model's parameters moves the user's parameters by exactly ``-lr * grad``."""
    torch.manual_seed(0)
    model, ids = Head(), torch.randint(0, 50, (4, 16))
    with torch.no_grad():
        for norm in (model.block_norm, model.final_norm):
            norm.weight.copy_(1 + 0.3 * torch.randn(D))
    opt = optimize(model, (ids,), include_head=True, progress=False)
    spec = SiteSpec("mxfp8", "mxnorm", 2, "rceil", torch.finfo(torch.float32).eps, True, GAUSSIAN_C[(2, 32)], 0.0,
                    "mx")
    sites = {s.norm: (tuple(s.consumers), spec) for s in get_report(opt).rewritten}
    assert sites == {"block_norm": (("up",), spec), "final_norm": (("lm_head",), spec)}
    ref, ref_params, ties = reference_model(model, sites)
    targets = torch.randint(0, 50, ids.shape, generator=torch.Generator().manual_seed(1))

    def gradients(module, params):
        torch.nn.functional.cross_entropy(module(ids).flatten(0, 1), targets.flatten()).backward()
        return {n: p.grad.detach().double().clone() for n, p in params.items()}

    params = dict(model.named_parameters())
    check_gradients(gradients(opt, params), gradients(ref, ref_params), ties.count)
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(opt.parameters(), lr=0.1).step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n].add(p.grad, alpha=-0.1), rtol=0, atol=0)


def test_calibrated_rescale_measures_each_site(head_model):
    model, ids = head_model
    calib = [(torch.randint(0, 50, (4, 16)),) for _ in range(2)]
    opt = optimize(model, (ids,), rescale="calibrated", include_head=True, calibration_data=calib)
    rescales = {s.norm: s.rescale for s in get_report(opt).rewritten}
    assert set(rescales) == {"block_norm", "final_norm"}
    # embedding rows are Gaussian: the measured constant lands near c'(2, 32) = 0.4185, but not on it
    for value in rescales.values():
        assert 0.35 < value < 0.5 and value != pytest.approx(0.418492, abs=1e-6)


def test_compiled_fullgraph_matches_eager(head_model):
    model, ids = head_model
    opt = optimize(model, (ids,))
    compiled = torch.compile(opt, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), opt(ids))
    compiled(ids).sum().backward()
    assert model.up.weight.grad is not None


def test_compile_before_capture_is_a_clear_error(head_model):
    model, ids = head_model
    compiled = torch.compile(optimize(model), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="before mxrewrite found its sites"):
        compiled(ids)


def test_train_and_eval_switch_freely():
    """The model's own forward runs, so dropout follows the mode as in the original."""
    from tests import zoo

    z = zoo.build("nanogpt", dropout=0.5)
    opt = optimize(z.model.train(), z.args, progress=False)
    assert opt.training
    with torch.no_grad():
        assert not torch.equal(opt(*z.args), opt(*z.args))  # dropout active
        opt.eval()
        assert not opt.training and all(not m.training for m in opt.modules())
        torch.testing.assert_close(opt(*z.args), opt(*z.args), rtol=0, atol=0)


class _NormThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(D)
        self.proj = torch.nn.Linear(D, D)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(D, 8)

    def forward(self, x):
        return self.head(self.drop(self.proj(self.norm(x))))


def test_an_estimate_far_from_the_rms_is_reported(caplog):
    """Outlier channels (a pretrained model's massive activations) make MXNorm's Gaussian-constant estimate
    read the RMS several times too high: optimize says where and what to do; Gaussian rows pass silently, and
    the measuring forward leaves the modules' modes and the random stream as they were."""
    caplog.set_level("WARNING", logger="mxrewrite")
    model = _NormThenLinear().train()
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    assert len(get_report(optimize(model, (x,), progress=False)).rewritten) == 1
    assert "estimate reads the RMS" not in caplog.text
    assert torch.equal(torch.random.get_rng_state(), state) and model.training and model.drop.training

    outliers = x.clone()
    outliers[..., :: D // 4] *= 30.0
    optimize(model, (outliers,), progress=False)
    assert "estimate reads the RMS at" in caplog.text and "(norm)" in caplog.text and "norm='rmsnorm'" in caplog.text
    caplog.clear()
    for quiet in (dict(norm="rmsnorm"), dict(rescale="calibrated")):
        optimize(model, (outliers,), progress=False, **quiet)
        assert "estimate reads the RMS" not in caplog.text
