"""CPU smoke test of benchmarks/train_quality.py: every arm trains at the toy size and its loss goes down.

Runs eagerly in float32 on the CPU (no compile), a few steps per arm; the GPU
run of the same script is what benchmarks/results_train_quality.md reports.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import train_quality as tq  # noqa: E402
import train_quality_report as tq_report  # noqa: E402
from train_quality_data import (  # noqa: E402
    WindowSampler,
    build_corpus,
    corpus_files,
    fixed_batches,
    is_heldout,
)
from train_quality_model import PRESETS, Decoder  # noqa: E402

TOY = tq.TrainSettings(preset="toy", steps=12, batch_size=4, seq_len=64, device="cpu", compile=False,
                       main_lr=1e-2, warmup_frac=0.1, eval_every=6, eval_batches=2, final_eval_batches=2,
                       log_every=4)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tokens(corpus):
    return {"train": corpus.train, "heldout": corpus.heldout}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_corpus_is_sorted_split_by_path_hash_and_hashed(tmp_path):
    for rel in ("b/zeta.py", "a.py", "test/skipped.py", "encodings/cp1252.py", "pkg/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\nx = 1\n")
    (tmp_path / "notes.txt").write_text("not python")
    assert [rel for rel, _ in corpus_files(tmp_path)] == ["a.py", "b/zeta.py", "pkg/__init__.py"]
    first, second = build_corpus(tmp_path), build_corpus(tmp_path)
    assert first.sha256 == second.sha256
    n_heldout = sum(is_heldout(rel) for rel in ("a.py", "b/zeta.py", "pkg/__init__.py"))
    assert (first.train_files, first.heldout_files) == (3 - n_heldout, n_heldout)
    text = bytes(first.train.tolist()) + bytes(first.heldout.tolist())
    assert b"# file: a.py\n# a.py\nx = 1\n" in text and b"skipped" not in text and b"cp1252" not in text
    (tmp_path / "a.py").write_text("changed")
    assert build_corpus(tmp_path).sha256 != first.sha256


def test_empty_corpus_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .py files"):
        build_corpus(tmp_path)


def test_stdlib_corpus_has_both_splits(corpus):
    assert corpus.train.numel() > 1_000_000 and corpus.heldout.numel() > 10_000
    assert corpus.heldout_files > 0 and len(corpus.sha256) == 64
    assert 0.01 < corpus.heldout.numel() / corpus.train.numel() < 0.2


def test_data_order_depends_only_on_the_seed(tokens):
    def batches(seed):
        sampler = WindowSampler(tokens["train"], 3, 16, seed)
        return [sampler.next_batch() for _ in range(3)]

    same = zip(batches(5), batches(5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in same)
    assert not torch.equal(batches(5)[0][0], batches(6)[0][0])
    inputs, targets = batches(5)[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    evals = fixed_batches(tokens["heldout"], 2, 3, 16)
    assert [x.shape for x, _ in evals] == [(3, 16), (3, 16)]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [tq.lr_factor(step, 100, 0.1, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1)


def test_plan_runs_every_arm_then_seeds_then_lr_slice():
    plan = tq.plan_runs(list(tq.ARMS), [0, 1], [2e-3, 1e-3, 4e-3], [tq.BASELINE, "mxfp8-mxnorm-p2"],
                        [tq.BASELINE, "mxfp8-mxnorm-p2"])
    ids = [spec.run_id for spec in plan]
    assert len(ids) == len(set(ids)) == 12
    assert ids[:len(tq.ARMS)] == [f"{arm}-s0-lr0.002" for arm in tq.ARMS]
    assert "mxfp8-mxnorm-p2-s1-lr0.002" in ids and "mxfp8-rmsnorm-s0-lr0.004" in ids


def test_toy_model_is_built_the_ordinary_way():
    model = Decoder(PRESETS["toy"])
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * PRESETS["toy"].n_layers + 1
    logits = model(torch.randint(0, 256, (2, 10)))
    assert logits.shape == (2, 10, 256)


@pytest.mark.parametrize("arm", list(tq.ARMS))
def test_every_arm_trains_and_its_loss_goes_down(arm, corpus, tokens):
    record = tq.train_run(tq.RunSpec(arm, 0, TOY.main_lr), TOY, corpus, tokens)
    assert record["status"] == "ok"
    assert record["steps_done"] == TOY.steps
    initial, final = record["initial"], record["final"]
    assert initial["train_loss"] == pytest.approx(math.log(256), abs=0.3)  # near uniform at init
    assert final["train_loss"] < initial["train_loss"] - 0.5
    assert final["heldout_loss"] < initial["heldout_loss"] - 0.5
    expected_sites = 0 if arm == "bf16" else 2 * PRESETS["toy"].n_layers
    assert record["report"]["sites_rewritten"] == expected_sites


def test_same_seed_gives_the_same_run(corpus, tokens):
    settings = replace(TOY, steps=3, eval_batches=1, final_eval_batches=1)
    first = tq.train_run(tq.RunSpec("bf16", 3, 1e-2), settings, corpus, tokens)
    second = tq.train_run(tq.RunSpec("bf16", 3, 1e-2), settings, corpus, tokens)
    assert first["curves"]["train_loss"] == second["curves"]["train_loss"]


def test_cli_writes_runs_and_report(tmp_path):
    out = tmp_path / "out"
    argv = ["--preset", "toy", "--device", "cpu", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
            "--arms", "bf16", "--seeds", "0,1", "--seed-arms", "bf16", "--lrs", "1e-2,2e-2", "--lr-arms", "bf16",
            "--eval-every", "2", "--eval-batches", "1", "--final-eval-batches", "1", "--log-every", "2",
            "--out", str(out), "--md", str(tmp_path / "results.md")]
    results = tq.main(argv)
    assert [r["run_id"] for r in results] == ["bf16-s0-lr0.01", "bf16-s1-lr0.01", "bf16-s0-lr0.02"]
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == [r["run_id"] for r in results]
    record = json.loads(lines[0])
    assert record["corpus"]["sha256"] and record["env"]["torch"] == torch.__version__
    md = (tmp_path / "results.md").read_text()
    assert "| bf16, no rewrite (ceiling) | 0,1 |" in md and "lr 0.02" in md


def test_cli_deadline_skips_runs_that_would_not_fit(tmp_path):
    argv = ["--preset", "toy", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--arms", "bf16", "--seeds", "0,1", "--seed-arms", "bf16", "--lrs", "1e-2", "--eval-batches", "1",
            "--final-eval-batches", "1", "--out", str(tmp_path), "--deadline-s", "0"]
    assert [r["run_id"] for r in tq.main(argv)] == ["bf16-s0-lr0.01"]  # the first run always starts


def test_report_aggregates_seeds_and_flags_failures(tmp_path):
    def run(arm, seed, lr, heldout, status="ok"):
        return {"run_id": f"{arm}-s{seed}-lr{lr:g}", "arm": arm, "label": arm, "seed": seed, "lr": lr,
                "status": status, "steps_done": 10, "settings": {"main_lr": 1e-3},
                "initial": {"heldout_loss": 5.5}, "final": {"train_loss": heldout - 0.1, "heldout_loss": heldout},
                "timing": {"step_ms": 2.0, "first_eval_incl_compile_s": 1.0, "tokens_per_s": 100.0},
                "curves": {"train_loss": [5.0, 4.0, 3.0], "eval_steps": [0, 10], "heldout_loss": [5.5, heldout]}}

    runs = [run(tq.BASELINE, 0, 1e-3, 2.0), run(tq.BASELINE, 1, 1e-3, 2.2), run("mxfp8-mxnorm-p2", 0, 1e-3, 2.3),
            run("mxfp8-mxnorm-p2", 1, 1e-3, float("nan"), status="diverged"), run(tq.BASELINE, 0, 2e-3, 1.9)]
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    rows = {row["arm"]: row for row in tq_report.summary_rows(tq_report.load_runs([path]))}
    assert rows[tq.BASELINE]["heldout"] == pytest.approx((2.1, math.sqrt(0.02)))
    assert rows["mxfp8-mxnorm-p2"]["seeds"] == [0]
    assert rows["mxfp8-mxnorm-p2"]["delta"] == pytest.approx(0.2)
    assert rows["mxfp8-mxnorm-p2"]["other"] == {"mxfp8-mxnorm-p2-s1-lr0.001": "diverged"}
    paired = tq_report.paired_deltas(runs)
    assert [(row["arm"], row["lr"], row["seeds"]) for row in paired] == [("mxfp8-mxnorm-p2", 1e-3, [0])]
    assert paired[0]["deltas"] == [pytest.approx(0.3)]  # seed 1 diverged: no pair
    md = tq_report.markdown_tables(runs)
    assert "| 2.1000 ± 0.1414 |" in md and "lr 0.002" in md and "| +0.3000 |" in md
    pytest.importorskip("matplotlib")
    assert tq_report.plot_curves(runs, tmp_path / "loss.png") and (tmp_path / "loss.png").stat().st_size > 0
