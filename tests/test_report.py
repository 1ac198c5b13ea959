"""The report: rows per site, skipped sites with reasons, the traffic model, and its three renderings."""

from __future__ import annotations

import json

import pytest
import torch

from mxrewrite.api import get_report, optimize
from mxrewrite.report import _relative_to_parent
from tests.passes.test_plan import D, FanOut, Head


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return get_report(optimize(Head(), (torch.randint(0, 50, (2, 7)),), progress=False))


def test_sites_and_reasons(report):
    (site,) = report.rewritten
    assert (site.norm, site.consumers, site.format, site.hidden_size) == ("block_norm", ("up",), "mxfp8", D)
    assert site.rescale == pytest.approx(0.418492)
    (skipped,) = report.skipped
    assert skipped.norm == "final_norm" and "output head (lm_head)" in skipped.reason


def test_traffic_model_numbers(report):
    # float32 model, D = 64, one consumer: RMSNorm reads and writes 64 * 4 bytes, the linear's own cast
    # reads 64 * 4 and writes 64 + 2 bytes; the fused cast reads 64 * 4, writes 64 + 2 and rho (4).
    sv = report.rewritten[0].savings
    assert sv.bytes_per_token_before == 64 * 4 * 2 + 64 * 4 + 66
    assert sv.bytes_per_token_after == 64 * 4 + 66 + 4
    assert (sv.reduction_elems_before, sv.reduction_elems_after) == (64, 2)
    totals = report.totals()
    assert totals["sites_rewritten"] == 1 and totals["sites_skipped"] == 1
    assert totals["bytes_saved_fraction"] == pytest.approx(1 - 326 / 834)


def test_kept_consumers_count_on_both_sides():
    torch.manual_seed(0)
    report = get_report(optimize(FanOut(), (torch.randn(2, 3, D),), format="nvfp4", progress=False))
    (site,) = report.rewritten
    assert site.kept_consumers and "exact RMSNorm kept for" in site.reason
    sv = site.savings
    exact_norm = 64 * 4 * 2
    assert sv.bytes_per_token_after == 64 * 4 + (32 + 4) + 4 + exact_norm
    assert sv.reduction_elems_after == 64 // 16


def test_renderings(report):
    text = str(report)
    assert "Rewritten sites (1)" in text and "Skipped RMSNorms (1)" in text and "block_norm" in text
    md = report.to_markdown()
    assert md.startswith("## mxrewrite report") and "| norm " in md
    data = json.loads(report.to_json())
    assert data["sites"][0]["norm"] == "block_norm" and data["totals"]["sites_rewritten"] == 1
    assert data["sites"][0]["savings"]["bytes_per_token_after"] == 326.0


def test_consumer_names_are_shown_next_to_the_norm():
    assert _relative_to_parent("model.layers.0.self_attn.q_proj", "model.layers.0.input_layernorm") == \
        "self_attn.q_proj"
    assert _relative_to_parent("lm_head", "model.norm") == "lm_head"
    assert _relative_to_parent("up", "block_norm") == "up"


def test_the_title_names_the_gradient_cast():
    x = torch.randn(2, 8, D)
    for grad_cast in ("mx", "e4m3", "hp"):
        report = get_report(optimize(FanOut(), (x,), grad_cast=grad_cast, progress=False))
        assert report.grad_cast == grad_cast and json.loads(report.to_json())["grad_cast"] == grad_cast
        assert f"grad_cast={grad_cast}" in str(report).splitlines()[0]
