"""RewriteConfig: defaults, validation with actionable errors, derived values."""

import pytest

from mxrewrite.config import RewriteConfig
from mxrewrite.errors import ConfigError


def test_defaults_match_the_design():
    cfg = RewriteConfig()
    assert (cfg.format, cfg.norm, cfg.p, cfg.scale_mode, cfg.rescale, cfg.include_head) == \
        ("mxfp8", "mxnorm", 2, "rceil", "gaussian", False)
    assert cfg.block_size == 32 and RewriteConfig(format="nvfp4").block_size == 16


@pytest.mark.parametrize("field,value", [("format", "mxfp4"), ("norm", "layernorm"), ("p", 3),
                                         ("scale_mode", "even"), ("rescale", "learned"), ("grad_cast", "fp8")])
def test_bad_values_name_the_field_and_the_choices(field, value):
    with pytest.raises(ConfigError, match=rf"RewriteConfig.{field}=.*use one of"):
        RewriteConfig(**{field: value})


def test_include_head_must_be_bool():
    with pytest.raises(ConfigError, match="include_head"):
        RewriteConfig(include_head="yes")


def test_default_correction():
    assert RewriteConfig().default_correction() == pytest.approx(0.418492)
    assert RewriteConfig(format="nvfp4", p=1).default_correction() == pytest.approx(0.481458)
    assert RewriteConfig(rescale="none").default_correction() == 1.0
    assert RewriteConfig(norm="rmsnorm").default_correction() == 1.0


def test_replace_rejects_unknown_fields():
    assert RewriteConfig().replace(p=1).p == 1
    with pytest.raises(ConfigError, match="unknown RewriteConfig option"):
        RewriteConfig().replace(blocksize=16)
