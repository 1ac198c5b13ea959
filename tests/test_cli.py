"""python -m mxrewrite report|verify|bench on a factory."""

from __future__ import annotations

import json

import pytest
import torch

from mxrewrite.api import optimize
from mxrewrite.cli import main
from mxrewrite.verify import verify
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


def test_verify_prints_what_verify_computes(capsys):
    """The command prints the result of ``verify`` on the factory's model with the options given, and exits 0
    because it passed."""
    assert main(["verify", SPEC, "--grads", "--format", "nvfp4"]) == 0
    model, inputs = tiny_head()
    expected = verify(model, optimize(model, inputs, format="nvfp4", progress=False), inputs, grads=True)
    assert expected.ok and {g.name for g in expected.grads} == {n for n, _ in model.named_parameters()}
    assert capsys.readouterr().out == f"{expected}\n"


def test_bench_prints_both_models(capsys):
    assert main(["bench", SPEC, "--iters", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"device: CPU, torch {torch.__version__}, compile=False, median of 2"
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[3:]}
    assert rows.keys() == {"original", "optimized"}
    assert all(len(ms) == 2 and min(ms) > 0 for ms in rows.values()), rows


@pytest.mark.parametrize("spec,message", [("no_colon", "must look like"), ("tests.test_cli:missing", "no attribute"),
                                          ("nowhere/file.py:f", "no such file")])
def test_bad_model_spec_is_a_clear_error(spec, message, capsys):
    assert main(["report", spec]) == 2
    assert message in capsys.readouterr().err
