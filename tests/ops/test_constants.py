"""MXNorm's correction constants c'(p, B) against MXNORM.md and the script that generated them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mxrewrite.errors import ConfigError
from mxrewrite.ops.mxnorm_constants import (
    GAUSSIAN_CORRECTION,
    gaussian_correction,
    mxnorm_output_bound,
    rmsnorm_output_bound,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mxnorm_constants.py"

# MXNORM.md, "Correction constants": B -> (c'(1, B), c'(2, B))
PAPER_TABLE = {16: (0.4814, 0.4688), 32: (0.4261, 0.4185), 64: (0.3852, 0.3803), 128: (0.3536, 0.3503)}
CASES = [(p, b) for b in PAPER_TABLE for p in (1, 2)]


def load_script():
    spec = importlib.util.spec_from_file_location("mxnorm_constants_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.mark.parametrize("p,block", CASES)
def test_table_matches_mxnorm_md_to_3_decimals(p, block):
    assert abs(gaussian_correction(p, block) - PAPER_TABLE[block][p - 1]) < 5e-4


def test_table_covers_exactly_the_documented_cases():
    assert set(GAUSSIAN_CORRECTION) == set(CASES)
    for (p, block), c in GAUSSIAN_CORRECTION.items():
        # larger blocks have larger maxima, so smaller constants; p=2 weights large maxima more
        assert 0 < c < 1
        if block > 16:
            assert c < gaussian_correction(p, block // 2)
        assert gaussian_correction(2, block) < gaussian_correction(1, block)


@pytest.mark.parametrize("p,block", CASES)
def test_integration_agrees_with_table(script, p, block):
    assert abs(script.integrate(p, block) - gaussian_correction(p, block)) < 1e-4


@pytest.mark.parametrize("p,block", CASES)
def test_monte_carlo_agrees_with_table(script, p, block):
    c, stderr = script.monte_carlo(p, block, samples=100_000, seed=7)
    assert 0 < stderr < 1e-3
    assert abs(c - gaussian_correction(p, block)) < 5 * stderr


def test_bad_arguments():
    with pytest.raises(ConfigError, match="p must be one of"):
        gaussian_correction(3, 32)
    with pytest.raises(ConfigError, match="block size one of"):
        gaussian_correction(2, 24)


def test_output_bounds():
    """|x| / r <= K**(1/p) / c for MXNorm (one nonzero block is the worst case), sqrt(D) for RMSNorm."""
    c = gaussian_correction(2, 32)
    assert mxnorm_output_bound(2, 16, c) == pytest.approx(4 / c)
    assert mxnorm_output_bound(1, 16, c) == pytest.approx(16 / c)
    assert rmsnorm_output_bound(4096) == 64.0
