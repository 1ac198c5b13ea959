"""CPU smoke test of benchmarks/train_quality.py and its width sweep (issue 15).

Runs eagerly in float32 on the CPU (no compile), a few steps per toy run; the
GPU runs of the same script are what benchmarks/results_train_quality.md and
benchmarks/train_quality_runs/ report. The sweep test goes the whole way: plan,
runs, jsonl records, a second call that skips them, and the report rebuilt from
the records (tables and, with matplotlib, the PNGs).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import train_quality as tq  # noqa: E402
import train_quality_report as tq_report  # noqa: E402
import train_quality_sweep as sweep  # noqa: E402
import train_quality_sweep_report as sweep_report  # noqa: E402
from train_quality_data import (  # noqa: E402
    WindowSampler,
    build_corpus,
    corpus_files,
    fixed_batches,
    is_heldout,
)
from train_quality_model import (  # noqa: E402
    PRESETS,
    Decoder,
    count_parameters,
    parameter_count,
    train_flops_per_token,
    width_config,
)

TOY = tq.TrainSettings(model=PRESETS["toy"], steps=8, batch_size=4, seq_len=64, device="cpu", compile=False,
                       main_lr=1e-2, warmup_frac=0.1, eval_every=4, eval_batches=1, final_eval_batches=2,
                       log_every=4, stats_rows=2)
SMOKE_FLAGS = ["--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
               "--final-eval-batches", "1", "--log-every", "2"]


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


# ---------------------------------------------------------------------------
# data and model

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


def test_toy_model_is_built_the_ordinary_way():
    model = Decoder(PRESETS["toy"])
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * PRESETS["toy"].n_layers + 1
    logits = model(torch.randint(0, 256, (2, 10)))
    assert logits.shape == (2, 10, 256)


def test_width_family_contains_the_25m_model_and_counts_without_building():
    assert width_config(512, 8) == PRESETS["small"]
    for d_model, n_layers in ((64, 2), (256, 16), (1024, 4)):
        cfg = width_config(d_model, n_layers)
        assert cfg.head_dim == 64 and cfg.ffn_dim % 256 == 0
        assert parameter_count(cfg) == count_parameters(Decoder(cfg))
    small = width_config(512, 8)
    assert 6 * parameter_count(small) < train_flops_per_token(small, 512) < 8 * parameter_count(small)


# ---------------------------------------------------------------------------
# the sweep's plan

def test_sweep_sizes_blocks_and_steps():
    widths = sweep.parse_widths("256,512,1024,2048")
    assert [(w.d_model, w.n_layers, w.k_blocks("mxfp8"), w.k_blocks("nvfp4")) for w in widths] == [
        (256, 16, 8, 16), (512, 8, 16, 32), (1024, 4, 32, 64), (2048, 2, 64, 128)]
    steps = sweep.plan_steps(widths, None, sweep.TOKENS_PER_PARAM, 32, 512)
    assert [steps[w] for w in widths] == [225, 450, 844, 1688]  # the same tokens per parameter; 512 = issue 5
    ratios = [steps[w] * 32 * 512 / parameter_count(w.model) for w in widths]
    assert max(ratios) - min(ratios) < 0.001
    assert sweep.WidthSpec.parse("512:4") == sweep.WidthSpec(512, 4)


def test_sweep_plan_arms_seeds_and_order():
    widths = sweep.parse_widths("256,512,1024,2048")
    runs = sweep.plan_sweep(widths)
    ids = [run.run_id for run in runs]
    assert len(ids) == len(set(ids)) == 98
    count = {}
    for run in runs:
        count[(run.arm, run.width.d_model)] = count.get((run.arm, run.width.d_model), 0) + 1
    for d_model in (256, 512, 1024, 2048):  # 3 seeds x 2 lrs for the baseline and p = 2 at every width
        assert count[("mxfp8-rmsnorm", d_model)] == count[("mxfp8-mxnorm-p2", d_model)] == 6
        assert count[("mxfp8-mxnorm-p2-cal", d_model)] == 4 and count[("mxfp8-mxnorm-p2-recal", d_model)] == 1
    assert {d for (arm, d) in count if arm in ("mxfp8-mxnorm-p1", "nvfp4-mxnorm-p2")} == {256, 512}
    assert {d for (arm, d) in count if arm in ("bf16", "fp8-rmsnorm", "fp8-mxnorm", "fp8-rmsnorm-e4m3")} == {512}
    assert ids[:3] == ["w256L16-mxfp8-rmsnorm-s0-lr0.001", "w256L16-mxfp8-mxnorm-p2-s0-lr0.001",
                       "w256L16-mxfp8-mxnorm-p2-cal-s0-lr0.001"]
    assert [run.tier for run in runs] == sorted(run.tier for run in runs)
    by_width = sweep.plan_sweep(widths[:2], order="width")
    assert {run.width for run in by_width[:20]} == {widths[0]}
    assert all(run.arm == "bf16" for run in sweep.plan_sweep(widths, arms={"bf16"}))


def test_slices_respect_the_deadline_and_measured_times_replace_estimates():
    widths = sweep.parse_widths("256,2048")
    runs = sweep.plan_sweep(widths, arms={"mxfp8-rmsnorm"})
    steps = sweep.plan_steps(widths, None, sweep.TOKENS_PER_PARAM, 32, 512)
    estimator = sweep.Estimator()
    calls = sweep.simulate_calls(runs, steps, estimator, deadline_s=300)
    assert sum(len(call.taken) for call in calls) == len(runs)
    for call in calls:
        assert call.seconds <= 300 or len(call.taken) == 1
    two_lanes = sweep.simulate_calls(runs, steps, estimator, deadline_s=300, lanes=2)
    assert sorted(run.run_id for call in two_lanes for run, _ in call.taken) == sorted(r.run_id for r in runs)
    assert len(two_lanes) < len(calls) and all(len(call.lanes) <= 2 for call in two_lanes)
    for call in two_lanes:
        assert all(len(lane) == 1 or call.startup_s + sum(c.total_s for _, c in lane) <= 300 for lane in call.lanes)
    record = {"status": "ok", "tag": "w2048L2", "arm": "mxfp8-rmsnorm",
              "timing": {"step_ms": 10.0, "first_eval_incl_compile_s": 5.0, "first_step_s": 1.01, "train_s": 16.9,
                         "total_s": 30.0}}
    measured = sweep.Estimator.from_records([record])
    cost = measured.run_cost(runs[-1], steps[widths[1]], cached=False)
    assert cost.measured and cost.train_s == pytest.approx(16.88)
    assert cost.compile_s == pytest.approx(6.0) and cost.other_s == pytest.approx(7.1)  # backward compile: step 1


def test_lanes_take_runs_in_priority_order_onto_the_least_loaded_lane():
    assert sweep.assign_lanes([10, 1, 1, 1, 5], 2) == [0, 1, 1, 1, 1]
    assert sweep.assign_lanes([3, 3, 3], 1) == [0, 0, 0]


def test_finished_records_are_skipped_and_a_changed_design_refuses(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"run_id": "x", "status": "ok", "steps_planned": 10}, {"run_id": "y", "status": "truncated"},
        {"run_id": "z", "status": "error"}, {"run_id": "u", "status": "unavailable"}]) + "\n")
    records = sweep.read_records([tmp_path, tmp_path / "missing"])
    assert set(sweep.finished(records)) == {"x", "z"}
    assert set(sweep.finished(records, retry_errors=True)) == {"x"}
    run = sweep.SweepRun(sweep.WidthSpec(64, 2), "bf16", 0, 1e-3, 0)
    sweep.check_same_design(run, 10, records[0])
    with pytest.raises(SystemExit, match="changed design"):
        sweep.check_same_design(run, 11, records[0])


def test_plan_prints_without_running(capsys, tmp_path):
    # (--out is also read for records: an empty folder, so the repository's records do not count)
    assert tq.main(["--plan", "--records", "/nonexistent", "--out", str(tmp_path)]) == []
    text = capsys.readouterr().out
    assert "98 runs planned, 0 done" in text and "| 2048 |        64 |       128 |" in text
    assert "--widths 256,512,1024,2048 --deadline-s 470 --records benchmarks/train_quality_runs" in text


# ---------------------------------------------------------------------------
# training

@pytest.mark.parametrize("arm", list(tq.ARMS))
def test_every_arm_trains_and_records_its_estimator(arm, corpus, tokens):
    record = tq.train_run(tq.RunSpec(arm, 0, TOY.main_lr, "toy"), TOY, corpus, tokens)
    assert record["status"] == "ok" and record["steps_done"] == TOY.steps
    initial, final = record["initial"], record["final"]
    assert initial["train_loss"] == pytest.approx(math.log(256), abs=0.3)  # near uniform at init
    assert final["train_loss"] < initial["train_loss"] - 0.3
    assert final["heldout_loss"] < initial["heldout_loss"] - 0.3
    expected_sites = 0 if arm == "bf16" else 2 * PRESETS["toy"].n_layers
    assert record["report"]["sites_rewritten"] == expected_sites
    stats = record["estimator"]
    assert [s["step"] for s in stats] == [0, 4, 8] and len(stats[0]["probe"]) == 2 * PRESETS["toy"].n_layers
    assert all(0.5 < site["b32_mean"] < 2 for site in stats[-1]["probe"])
    if arm != "bf16":
        sites = stats[-1]["verify"]["sites"]
        assert len(sites) == expected_sites and all(0.5 < s["ratio_mean"] < 2 for s in sites)
        constants = record["calibration"]["constants"]
        assert constants[0]["step"] == 0 and len(constants[0]["sites"]) == expected_sites
    if arm.endswith("-recal"):  # re-calibrated at a third and two thirds of training, with other batches
        assert [c["step"] for c in record["calibration"]["constants"]] == [0, 3, 5]
        assert record["timing"]["recalibration_s"] > 0


def test_calibrated_constants_are_measured_and_recalibration_keeps_training_the_same_tensors(corpus, tokens):
    settings = replace(TOY, steps=4, recalibrate_every=2, stats_rows=0)
    record = tq.train_run(tq.RunSpec("mxfp8-mxnorm-p2-recal", 1, 1e-2), settings, corpus, tokens)
    constants = record["calibration"]["constants"]
    assert [c["step"] for c in constants] == [0, 2]
    gaussian = 0.418492
    assert all(value != pytest.approx(gaussian, abs=1e-6) for c in constants for value in c["sites"].values())
    assert constants[0]["sites"] != constants[1]["sites"]
    assert record["status"] == "ok" and record["final"]["train_loss"] < record["initial"]["train_loss"]


def test_same_seed_gives_the_same_run(corpus, tokens):
    settings = replace(TOY, steps=3, eval_batches=1, final_eval_batches=1, stats_rows=0)
    first = tq.train_run(tq.RunSpec("bf16", 3, 1e-2), settings, corpus, tokens)
    second = tq.train_run(tq.RunSpec("bf16", 3, 1e-2), settings, corpus, tokens)
    assert first["curves"]["train_loss"] == second["curves"]["train_loss"]


def test_a_missing_mxrewrite_option_makes_the_arm_unavailable_not_a_crash(monkeypatch, tmp_path):
    import mxrewrite
    from mxrewrite.errors import ConfigError

    real = mxrewrite.RewriteConfig

    def without_fp8(**fields):
        if fields.get("format") == "fp8":
            raise ConfigError("RewriteConfig.format='fp8' is not supported")
        return real(**fields)

    monkeypatch.setattr(mxrewrite, "RewriteConfig", without_fp8)
    argv = ["--widths", "64:1", "--steps", "2", "--arms", "fp8-rmsnorm,bf16", "--seeds", "0", "--lrs", "1e-3",
            "--out", str(tmp_path), "--records", str(tmp_path), "--stats-rows", "0", *SMOKE_FLAGS]
    results = {r["arm"]: r for r in tq.main(argv)}
    assert results["fp8-rmsnorm"]["status"] == "unavailable"
    assert "format='fp8'" in results["fp8-rmsnorm"]["error"] and results["bf16"]["status"] == "ok"
    assert [r["arm"] for r in tq.main(argv)] == ["fp8-rmsnorm"]  # retried by the next call, bf16 skipped


def test_sweep_writes_records_skips_them_and_rebuilds_the_report(tmp_path):
    records = tmp_path / "runs"
    argv = ["--widths", "64:1,128:1", "--steps", "4", "--seeds", "0,1", "--lrs", "1e-3", "--eval-points", "2",
            "--arms", "mxfp8-rmsnorm,mxfp8-mxnorm-p2,nvfp4-rmsnorm,nvfp4-mxnorm-p2", "--out", str(records),
            "--records", str(records), *SMOKE_FLAGS]
    results = tq.main(argv + ["--runs", "w64L1-mxfp8-rmsnorm-s0-lr0.001,w64L1-mxfp8-mxnorm-p2-s0-lr0.001,"
                              "w64L1-mxfp8-rmsnorm-s1-lr0.001,w64L1-mxfp8-mxnorm-p2-s1-lr0.001,"
                              "w128L1-mxfp8-rmsnorm-s0-lr0.001,w128L1-mxfp8-mxnorm-p2-s0-lr0.001"])
    assert len(results) == 6 and all(r["status"] == "ok" for r in results)
    first = json.loads(next(records.glob("*.jsonl")).read_text().splitlines()[0])
    assert first["run_id"] == "w64L1-mxfp8-rmsnorm-s0-lr0.001" and first["k"] == 2 and first["width"] == 64
    assert first["env"]["torch"] == torch.__version__ and first["env"]["source_digest"]
    assert first["corpus"]["sha256"] and first["curves"]["eval_steps"] == [0, 2, 4]
    rest = tq.main(argv + ["--runs", "w64L1-mxfp8-rmsnorm-s0-lr0.001,w64L1-nvfp4-rmsnorm-s0-lr0.001"])
    assert [r["run_id"] for r in rest] == ["w64L1-nvfp4-rmsnorm-s0-lr0.001"]  # the recorded one is skipped

    first["final"]["heldout_loss"] += 0.5  # the same run recorded again (another machine's nondeterminism)
    (records / "repeat.jsonl").write_text(json.dumps(first) + "\n")
    tq_report.main([str(records)])
    md = (records / "REPORT.md").read_text()
    flat = " ".join(md.split())  # table cells without their padding
    assert "## The same run twice" in md and "| w64L1 | 1 | 0.3536 |" in flat
    assert "## Paired gap: MXNorm against the exact RMSNorm in the same format" in md
    assert "| mxfp8-mxnorm-p2 | mxfp8-rmsnorm | 0.001 | w64L1 | 2 | 0,1 |" in flat
    assert "**mxfp8-mxnorm-p2** vs mxfp8-rmsnorm, lr 0.001:" in md and "w64L1-nvfp4-rmsnorm-s0" in md
    assert "## The estimator during training" in md
    pytest.importorskip("matplotlib")
    for name in sweep_report.PNG_NAMES.values():
        assert (records / name).stat().st_size > 0 and f"]({name})" in md


def test_lanes_run_their_shares_in_processes_of_their_own(tmp_path):
    records = tmp_path / "runs"
    run_ids = ["w64L1-mxfp8-rmsnorm-s0-lr0.001", "w64L1-mxfp8-mxnorm-p2-s0-lr0.001", "w64L1-bf16-s0-lr0.001"]
    argv = ["--widths", "64:1", "--steps", "2", "--seeds", "0", "--lrs", "1e-3", "--eval-points", "1",
            "--stats-rows", "0", "--arms", "mxfp8-rmsnorm,mxfp8-mxnorm-p2,bf16", "--runs", ",".join(run_ids),
            "--lanes", "2", "--out", str(records), "--records", str(records), *SMOKE_FLAGS]
    results = tq.main(argv)
    assert sorted(r["run_id"] for r in results) == sorted(run_ids) and all(r["status"] == "ok" for r in results)
    files = sorted(records.glob("*.jsonl"))
    assert [f.name.split("-")[-1] for f in files] == ["lane0of2.jsonl", "lane1of2.jsonl"]
    assert len({f.name.rsplit("-", 1)[0] for f in files}) == 1  # one time stamp for the call's files
    assert {r["env"]["gpu_shared_by_lanes"] for r in results} == {2}
    assert sorted(records.glob("lane-*.log")) and tq.main(argv) == []  # all recorded: nothing runs again


def test_gap_verdicts_follow_the_interval():
    def run(arm, seed, loss, status="ok"):
        return {"run_id": f"w64L1-{arm}-s{seed}", "tag": "w64L1", "arm": arm, "seed": seed, "lr": 1e-3, "k": 2,
                "status": status, "final": {"heldout_loss": loss}}

    base = [run("mxfp8-rmsnorm", s, v) for s, v in enumerate((1.00, 1.02, 0.98))]
    worse = [run("mxfp8-mxnorm-p2", s, v + 0.05 + 0.001 * s) for s, v in enumerate((1.00, 1.02, 0.98))]
    noisy = [run("mxfp8-mxnorm-p1", s, v) for s, v in enumerate((1.03, 0.99, 0.99))]
    single = [run("mxfp8-mxnorm-p2-cal", 0, 1.01), run("mxfp8-mxnorm-p2-cal", 1, math.nan, "diverged")]
    gaps = {g.arm: g for g in sweep_report.paired_gaps(base + worse + noisy + single, sweep_report.MXNORM_PAIRS)}
    assert gaps["mxfp8-mxnorm-p2"].verdict.startswith("worse") and gaps["mxfp8-mxnorm-p2"].within_noise is False
    assert gaps["mxfp8-mxnorm-p2"].mean == pytest.approx(0.051)
    assert gaps["mxfp8-mxnorm-p1"].verdict.startswith("within noise")
    assert gaps["mxfp8-mxnorm-p2-cal"].verdict == "one seed: within 2 sd of the reference's seeds"
    assert gaps["mxfp8-mxnorm-p2-cal"].not_ok == {"w64L1-mxfp8-mxnorm-p2-cal-s1": "diverged"}
    mean, sd, half = sweep_report.mean_ci([1.0, 2.0, 3.0])
    assert (mean, sd, half) == pytest.approx((2.0, 1.0, 4.303 / math.sqrt(3)))



def test_a_run_recorded_twice_counts_with_its_mean_and_its_repeat_spread_is_reported():
    def run(arm, seed, loss, date):
        return {"run_id": f"w64L1-{arm}-s{seed}-lr0.001", "tag": "w64L1", "arm": arm, "seed": seed, "lr": 1e-3,
                "k": 2, "status": "ok", "final": {"heldout_loss": loss}, "env": {"date": date}}

    records = [run("mxfp8-rmsnorm", 0, 1.00, "a"), run("mxfp8-mxnorm-p2", 0, 1.10, "a"),
               run("mxfp8-rmsnorm", 1, 1.02, "a"), run("mxfp8-mxnorm-p2", 1, 1.04, "a"),
               run("mxfp8-mxnorm-p2", 0, 1.06, "b")]
    repeated = sweep_report.repeats(records)
    assert repeated == {"w64L1-mxfp8-mxnorm-p2-s0-lr0.001": [1.10, 1.06]}
    assert sweep_report.repeat_sd(repeated) == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    runs = {r["run_id"]: r for r in sweep_report.sweep_records(records)}
    assert runs["w64L1-mxfp8-mxnorm-p2-s0-lr0.001"]["final"]["heldout_loss"] == pytest.approx(1.08)
    assert runs["w64L1-mxfp8-mxnorm-p2-s0-lr0.001"]["repeats"] == 2
    gap = sweep_report.paired_gaps(list(runs.values()), sweep_report.MXNORM_PAIRS)[0]
    assert gap.deltas == pytest.approx([0.08, 0.02])
    rows = sweep_report.repeat_rows(repeated, [gap])
    assert rows == [["w64L1", 1, f"{math.sqrt(0.0008):.4f}", f"{statistics.stdev([1.00, 1.02]):.4f}"]]

# ---------------------------------------------------------------------------
# one model (--preset), issue 5's mode

def test_preset_plan_runs_every_arm_then_seeds_then_lr_slice():
    plan = tq.plan_runs(list(tq.PRESET_ARMS), [0, 1], [2e-3, 1e-3, 4e-3], [tq.BASELINE, "mxfp8-mxnorm-p2"],
                        [tq.BASELINE, "mxfp8-mxnorm-p2"])
    ids = [spec.run_id for spec in plan]
    assert len(ids) == len(set(ids)) == 12
    assert ids[:len(tq.PRESET_ARMS)] == [f"{arm}-s0-lr0.002" for arm in tq.PRESET_ARMS]
    assert "mxfp8-mxnorm-p2-s1-lr0.002" in ids and "mxfp8-rmsnorm-s0-lr0.004" in ids


def test_preset_cli_writes_runs_and_report(tmp_path):
    out = tmp_path / "out"
    argv = ["--preset", "toy", "--steps", "4", "--arms", "bf16", "--seeds", "0,1", "--seed-arms", "bf16",
            "--lrs", "1e-2,2e-2", "--lr-arms", "bf16", "--eval-every", "2", "--stats-rows", "0", *SMOKE_FLAGS]
    results = tq.main(argv + ["--out", str(out), "--md", str(tmp_path / "results.md")])
    assert [r["run_id"] for r in results] == ["bf16-s0-lr0.01", "bf16-s1-lr0.01", "bf16-s0-lr0.02"]
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == [r["run_id"] for r in results]
    md = (tmp_path / "results.md").read_text()
    assert "| bf16, no rewrite | 0,1 |" in md and "lr 0.02" in md
    deadline = tq.main(argv + ["--deadline-s", "0", "--out", str(tmp_path / "d")])
    assert [r["run_id"] for r in deadline] == ["bf16-s0-lr0.01"]  # the first run always starts


def test_preset_report_aggregates_seeds_and_flags_failures(tmp_path):
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
