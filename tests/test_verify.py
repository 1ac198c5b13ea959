"""verify(): output metrics, per-site estimator statistics, the rmsnorm baseline, gradients, thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from mxrewrite.api import optimize
from mxrewrite.errors import MXRewriteError
from mxrewrite.verify import Thresholds, tensor_metrics, verify
from tests.passes.test_plan import Head


def test_tensor_metrics_on_known_errors():
    ref = torch.tensor([3.0, 4.0])
    m = tensor_metrics("t", ref, torch.tensor([3.0, 4.5]))
    assert m.rel_l2 == pytest.approx(0.1)
    assert m.max_abs == pytest.approx(0.5)
    assert m.sqnr_db == pytest.approx(20.0)
    assert m.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    same = tensor_metrics("z", torch.zeros(3), torch.zeros(3))
    assert (same.rel_l2, same.cosine, same.sqnr_db) == (0.0, 1.0, math.inf)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, ids = Head(), torch.randint(0, 50, (4, 32))
    return model, ids, optimize(model, (ids,), include_head=True, progress=False)


def test_verify_reports_outputs_sites_and_baseline(setup):
    model, ids, opt = setup
    result = verify(model, opt, (ids,))
    assert result.ok
    (out,) = result.outputs
    assert 0 < out.rel_l2 < 0.15 and out.cosine > 0.99
    (base,) = result.baseline_outputs  # norm="rmsnorm", same format: less error than MXNorm
    assert base.rel_l2 < out.rel_l2
    assert {s.norm for s in result.sites} == {"block_norm", "final_norm"}
    for site in result.sites:
        assert 0.6 < site.ratio_min <= site.ratio_mean <= site.ratio_max < 1.5  # D = 64: only 2 blocks per row
        assert abs(site.ratio_mean - 1) < 0.1  # Gaussian embeddings: c'(2, 32) is the right constant
        assert 0 < site.baseline_act_rel_l2 < site.act_rel_l2 < 0.2
    text = str(result)
    assert "OK" in text and "rmsnorm baseline" in text and "block_norm" in text


def test_verify_gradients_and_thresholds(setup):
    model, ids, opt = setup
    result = verify(model, opt, (ids,), grads=True, baseline=False)
    assert {g.name for g in result.grads} == {n for n, _ in model.named_parameters()}
    assert all(g.cosine > 0.95 for g in result.grads)
    assert model.up.weight.grad is None  # verify must not leave gradients behind
    strict = verify(model, opt, (ids,), thresholds=Thresholds(max_rel_l2=1e-4, min_cosine=0.999999), baseline=False)
    assert not strict.ok and "FAILED" in str(strict)


def test_verify_rejects_a_plain_module(setup):
    model, ids, _ = setup
    with pytest.raises(MXRewriteError, match="returned by mxrewrite.optimize"):
        verify(model, model, (ids,))
