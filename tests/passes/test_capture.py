"""Capture: every zoo model exports with dynamic batch/sequence, shares its parameters, and is left untouched."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mxrewrite.errors import CaptureError
from mxrewrite.passes.capture import capture, capture_info
from tests import zoo

torch.set_num_threads(1)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def zoo_model(name: str, **kwargs) -> zoo.ZooModel:
    package = zoo.OPTIONAL_PACKAGES.get(name)
    if package:
        pytest.importorskip(package)
    return zoo.build(name, **kwargs)


@pytest.mark.parametrize("name", list(zoo.BUILDERS))
def test_zoo_model_captures_with_dynamic_batch_and_sequence(name):
    z = zoo_model(name)
    model = z.model
    before = copy.deepcopy(model.state_dict())
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)

    gm = capture(model, z.args, z.kwargs)
    info = capture_info(gm)

    # runs at another batch size and (where the model allows it) another sequence length
    seq = 11 if zoo.seq_dim_is_dynamic(name) else zoo.SEQ
    tokens = zoo.example_tokens(batch=3, seq=seq, seed=1)
    with torch.no_grad():
        expected, got = logits(model(tokens)), logits(gm(tokens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert info.dynamic_dims["args[0]"] == ((0, 1) if zoo.seq_dim_is_dynamic(name) else (0,))
    if not zoo.seq_dim_is_dynamic(name):
        assert info.specialized_dims["args[0]"] == (1,)

    # the same parameter objects under the same names, ties included
    model_params = dict(model.named_parameters(remove_duplicate=False))
    graph_params = dict(gm.named_parameters(remove_duplicate=False))
    assert model_params.keys() == graph_params.keys()
    assert all(graph_params[k] is p for k, p in model_params.items())
    model_buffers = dict(model.named_buffers())
    assert all(gm.get_buffer(k) is b for k, b in model_buffers.items())
    # state dicts load both ways
    assert gm.state_dict().keys() == model.state_dict().keys()
    gm.load_state_dict(model.state_dict())
    model.load_state_dict(gm.state_dict())

    # the original is unchanged
    assert not model.training
    if use_cache is not None:
        assert model.config.use_cache == use_cache
        assert info.cache_disabled == use_cache
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_the_original_parameters():
    z = zoo_model("llama")
    gm = capture(z.model, z.args)
    reference = copy.deepcopy(z.model)
    tokens = zoo.example_tokens(batch=3, seq=5, seed=2)

    logits(gm(tokens)).square().mean().backward()
    logits(reference(tokens)).square().mean().backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in z.model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, reference_grads[name].grad, rtol=1e-5, atol=1e-7)


def test_an_optimizer_step_on_the_capture_trains_the_model():
    """SGD over the capture's parameters moves the model's own by exactly ``-lr`` times the gradient the
    model itself computes (nanogpt: a tied head and embedding)."""
    z = zoo_model("nanogpt")
    gm = capture(z.model, z.args)
    reference = copy.deepcopy(z.model)
    logits(reference(z.args[0])).square().mean().backward()
    reference_grads = {k: p.grad for k, p in reference.named_parameters()}
    before = {k: p.detach().clone() for k, p in z.model.named_parameters()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    logits(gm(z.args[0])).square().mean().backward()
    opt.step()
    for k, p in z.model.named_parameters():
        torch.testing.assert_close(p.grad, reference_grads[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), before[k].add(p.grad, alpha=-0.1), rtol=0, atol=0)


def test_keyword_inputs_are_captured_dynamic_too():
    z = zoo_model("llama")
    mask = torch.ones(zoo.BATCH, zoo.SEQ, dtype=torch.long)
    gm = capture(z.model, z.args, {"attention_mask": mask})
    assert capture_info(gm).dynamic_dims["kwargs['attention_mask']"] == (0, 1)

    tokens = zoo.example_tokens(batch=3, seq=6, seed=3)
    padded = torch.ones(3, 6, dtype=torch.long)
    padded[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(logits(gm(tokens, attention_mask=padded)),
                                   logits(z.model(tokens, attention_mask=padded)), rtol=1e-5, atol=1e-5)


def test_a_returned_cache_requested_explicitly_gets_advice():
    z = zoo_model("llama")
    with pytest.raises(CaptureError, match="use_cache=False"):
        capture(z.model, z.args, {"use_cache": True})
    assert z.model.config.use_cache


def test_batch_of_one_logs_how_to_avoid_specialisation(caplog):
    z = zoo_model("nanogpt")
    with caplog.at_level(logging.DEBUG, logger="mxrewrite.passes.capture"):
        gm = capture(z.model, (zoo.example_tokens(batch=1),))
    assert "size 1 in dim 0 (batch)" in caplog.text and "batch size >= 2" in caplog.text
    assert capture_info(gm).dynamic_dims["args[0]"] == (1,)


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return x


def test_uncapturable_model_raises_a_short_useful_capture_error():
    model = DataDependentBranch()
    with pytest.raises(CaptureError) as err:
        capture(model, (torch.randn(4, 16),))
    message = str(err.value)
    assert "data-dependent" in message
    assert "test_capture.py" in message and "if x.sum() > 0" in message    # where it happened
    assert "torch.where" in message                                         # what to try
    assert "Traceback" not in message and len(message.splitlines()) == 1 and len(message) < 800
    assert isinstance(err.value.__cause__, Exception)


def test_not_a_module_is_a_capture_error():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2, 2),))


class WithDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.proj(F.rms_norm(x, (16,))))


def test_train_mode_keeps_dropout_and_refuses_a_silent_switch_to_eval():
    model = WithDropout(0.5).train()
    gm = capture(model, (torch.randn(4, 16),))
    info = capture_info(gm)
    assert info.training and info.mode_dependent and gm.training
    assert any("dropout" in str(n.target) for n in gm.graph.nodes)
    x = torch.ones(64, 16)
    assert not torch.equal(gm(x), gm(x))                     # dropout is active
    with pytest.raises(CaptureError, match="capture it again"):
        gm.eval()
    gm.train()                                               # same mode: fine
    assert model.training


def test_eval_mode_capture_is_deterministic():
    model = WithDropout(0.5).eval()
    gm = capture(model, (torch.randn(4, 16),))
    assert not capture_info(gm).training and not gm.training
    x = torch.randn(8, 16)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(CaptureError, match="model.train"):
        gm.train()


def test_a_deep_copy_keeps_the_mode_guard_and_the_info():
    gm = capture(WithDropout(0.5).train(), (torch.randn(4, 16),))
    clone = copy.deepcopy(gm)
    assert capture_info(clone) == capture_info(gm)
    assert all(p is not q for p, q in zip(clone.parameters(), gm.parameters()))
    with pytest.raises(CaptureError):
        clone.eval()


def test_mode_independent_graph_switches_freely():
    model = WithDropout(0.0).train()
    gm = capture(model, (torch.randn(4, 16),))
    assert not capture_info(gm).mode_dependent
    gm.eval()
    assert not gm.training
    gm.train()
    assert gm.training


def test_custom_autograd_functions_are_reported(caplog):
    pytest.importorskip("unit_scaling")
    z = zoo.build("unit_scaling")
    with caplog.at_level(logging.DEBUG, logger="mxrewrite.passes.capture"):
        gm = capture(z.model, z.args)
    assert capture_info(gm).custom_autograd_functions == ("unit_scaling.scale._ScaledGrad",)
    assert "drops their custom backward" in caplog.text
    assert "fixes dim(s) (1,)" in caplog.text                # unit_scaling's attention scale uses log(seq_len)


def test_capture_info_of_a_foreign_module_is_an_error():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(CaptureError, match="not produced by"):
        capture_info(gm)
