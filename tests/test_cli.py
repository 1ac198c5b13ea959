"""python -m mxrewrite report|verify|bench on a factory."""

from __future__ import annotations

import json

import pytest
import torch

from mxrewrite.cli import main
from tests.passes.test_plan import Head


def tiny_head():
    torch.manual_seed(0)
    return Head(), (torch.randint(0, 50, (2, 16)),)


SPEC = "tests.test_cli:tiny_head"


def test_report_table_json_markdown(capsys):
    assert main(["report", SPEC, "--include-head"]) == 0
    assert "Rewritten sites (2)" in capsys.readouterr().out
    assert main(["report", SPEC, "--json", "--format", "nvfp4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "nvfp4" and data["totals"]["sites_rewritten"] == 1
    assert main(["report", SPEC, "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("## mxrewrite report")


def test_verify_exit_code(capsys):
    assert main(["verify", SPEC, "--grads"]) == 0
    out = capsys.readouterr().out
    assert "mxrewrite verify: OK" in out and "Gradients" in out


def test_bench_prints_both_models(capsys):
    assert main(["bench", SPEC, "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "optimized" in out and "forward+backward ms" in out


@pytest.mark.parametrize("spec,message", [("no_colon", "must look like"), ("tests.test_cli:missing", "no attribute"),
                                          ("nowhere/file.py:f", "no such file")])
def test_bad_model_spec_is_a_clear_error(spec, message, capsys):
    assert main(["report", spec]) == 2
    assert message in capsys.readouterr().err
