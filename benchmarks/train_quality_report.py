"""Tables and plots for the training-quality benchmark, rebuilt from its jsonl records.

    python benchmarks/train_quality_report.py benchmarks/train_quality_runs     # the width sweep (issue 15)
    python benchmarks/train_quality_report.py out/a/runs.jsonl out/b/runs.jsonl \\
        --md benchmarks/results_train_quality_tables.md --plot benchmarks/train_quality_loss.png   # issue 5

Arguments are jsonl files or directories of them. Records of the width sweep
(those with a width tag) make the sweep report (train_quality_sweep_report.py:
``REPORT.md`` and PNGs next to the first directory given, or at ``--md`` /
``--png-dir``); records of a one-model run (``--preset``) make issue 5's tables
and loss-curve plot, below. Spread over seeds is the sample standard deviation
(n - 1); with one seed it is shown as "-". A later record with the same run id
replaces an earlier one, so a re-run can be appended to the same list. Plotting
needs matplotlib and is skipped with a message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_quality_sweep_report import save_figure, write_sweep_report  # noqa: E402

ARM_ORDER = ("mxfp8-rmsnorm", "mxfp8-mxnorm-p2", "mxfp8-mxnorm-p2-cal", "mxfp8-mxnorm-p2-recal", "mxfp8-mxnorm-p1",
             "nvfp4-rmsnorm", "nvfp4-mxnorm-p2", "bf16", "fp8-rmsnorm", "fp8-mxnorm", "fp8-rmsnorm-e4m3")
BASELINE = "mxfp8-rmsnorm"


def jsonl_files(paths: list[str | Path]) -> list[Path]:
    """The files among ``paths``, a directory standing for its ``*.jsonl``."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return files


def read_all(paths: list[str | Path]) -> list[dict]:
    """Every record of every file, in order."""
    return [json.loads(line) for file in jsonl_files(paths) for line in file.read_text().splitlines()
            if line.strip()]


def load_runs(paths: list[str | Path]) -> list[dict]:
    """One record per run id, the last one read winning."""
    by_id: dict[str, dict] = {}
    for record in read_all(paths):
        by_id[record["run_id"]] = record
    return list(by_id.values())


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _fmt(mean: float, sd: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if not math.isnan(sd) else "")


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def _ordered(arms) -> list[str]:
    return sorted(arms, key=lambda a: (_arm_rank(a), a))


def main_lr(runs: list[dict]) -> float:
    """The learning rate most runs were planned around (their ``settings.main_lr``)."""
    return Counter(run["settings"]["main_lr"] for run in runs).most_common(1)[0][0]


def summary_rows(runs: list[dict]) -> list[dict]:
    """Per arm at the main learning rate: mean and spread of the final losses over finished seeds."""
    lr = main_lr(runs)
    by_arm = defaultdict(list)
    for run in runs:
        if run["lr"] == lr:
            by_arm[run["arm"]].append(run)
    base = [r["final"]["heldout_loss"] for r in by_arm.get(BASELINE, []) if r["status"] == "ok"]
    base_mean = statistics.fmean(base) if base else math.nan
    rows = []
    for arm in _ordered(by_arm):
        arm_runs = sorted(by_arm[arm], key=lambda r: r["seed"])
        done = [r for r in arm_runs if r["status"] == "ok"]
        train = mean_sd([r["final"]["train_loss"] for r in done])
        heldout = mean_sd([r["final"]["heldout_loss"] for r in done])
        step_ms = [r["timing"]["step_ms"] for r in done]
        rows.append({
            "arm": arm, "label": arm_runs[0]["label"], "seeds": [r["seed"] for r in done],
            "train": train, "heldout": heldout, "delta": heldout[0] - base_mean,
            "step_ms": statistics.median(step_ms) if step_ms else math.nan,
            "other": {r["run_id"]: r["status"] for r in arm_runs if r["status"] != "ok"},
        })
    return rows


def lr_slice(runs: list[dict]) -> tuple[list[float], dict[str, dict[float, dict]]]:
    """Final losses of the first seed, by arm and learning rate, for the arms run at more than one lr."""
    first_seed = min(r["seed"] for r in runs)
    table: dict[str, dict[float, dict]] = defaultdict(dict)
    for run in runs:
        if run["seed"] == first_seed:
            table[run["arm"]][run["lr"]] = run
    table = {arm: by_lr for arm, by_lr in table.items() if len(by_lr) > 1}
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    return lrs, {arm: table[arm] for arm in _ordered(table)}


def paired_deltas(runs: list[dict]) -> list[dict]:
    """Held-out loss of each arm minus the baseline's, paired by seed and learning rate (same data order).

    Pairing removes what a seed does to both arms alike; the spread of the paired
    differences over seeds is the noise on the comparison itself.
    """
    ok = {(r["arm"], r["seed"], r["lr"]): r for r in runs if r["status"] == "ok"}
    groups: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for (arm, seed, lr), run in ok.items():
        base = ok.get((BASELINE, seed, lr))
        if arm != BASELINE and base is not None:
            groups[(arm, lr)][seed] = run["final"]["heldout_loss"] - base["final"]["heldout_loss"]
    rows = []
    for (arm, lr), by_seed in sorted(groups.items(), key=lambda kv: (_arm_rank(kv[0][0]), kv[0][1])):
        deltas = [by_seed[seed] for seed in sorted(by_seed)]
        rows.append({"arm": arm, "lr": lr, "seeds": sorted(by_seed), "deltas": deltas, "mean_sd": mean_sd(deltas)})
    return rows


def _cell(run: dict | None) -> str:
    if run is None:
        return "-"
    if run["status"] != "ok":
        return run["status"]
    return f"{run['final']['train_loss']:.4f} / {run['final']['heldout_loss']:.4f}"


def markdown_tables(runs: list[dict]) -> str:
    lines = [f"Main learning rate {main_lr(runs):g}; losses are nats per byte; ± is the sample standard "
             "deviation over seeds; Δ is the held-out loss minus the baseline's mean.", "",
             "| arm | seeds | final train loss | final held-out loss | Δ held-out vs baseline | ms/step | not ok |",
             "|---|---|---|---|---|---|---|"]
    for row in summary_rows(runs):
        delta = "-" if math.isnan(row["delta"]) else f"{row['delta']:+.4f}"
        other = ", ".join(f"{k}: {v}" for k, v in row["other"].items()) or ""
        lines.append(f"| {row['label']} | {','.join(map(str, row['seeds'])) or '-'} | {_fmt(*row['train'])} | "
                     f"{_fmt(*row['heldout'])} | {delta} | {row['step_ms']:.1f} | {other} |")
    lrs, table = lr_slice(runs)
    if table:
        lines += ["", "Learning-rate slice (first seed), final train / held-out loss:", "",
                  "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for arm, by_lr in table.items():
            label = next(iter(by_lr.values()))["label"]
            lines.append(f"| {label} | " + " | ".join(_cell(by_lr.get(lr)) for lr in lrs) + " |")
    paired = paired_deltas(runs)
    if paired:
        labels = {r["arm"]: r["label"] for r in runs}
        lines += ["", "Held-out loss minus the baseline's, paired by seed and learning rate (same initialisation "
                  "and data order):", "",
                  "| arm | lr | seeds | Δ held-out per seed | mean ± sd |", "|---|---|---|---|---|"]
        for row in paired:
            per_seed = ", ".join(f"{d:+.4f}" for d in row["deltas"])
            mean, sd = row["mean_sd"]
            spread = f"{mean:+.4f}" + (f" ± {sd:.4f}" if not math.isnan(sd) else "")
            lines.append(f"| {labels[row['arm']]} | {row['lr']:g} | {','.join(map(str, row['seeds']))} | "
                         f"{per_seed} | {spread} |")
    lines += ["", "Every run:", "",
              "| run | status | steps | final train | final held-out | initial held-out | compile+first eval s "
              "| ms/step | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (_arm_rank(r["arm"]), r["seed"], r["lr"])):
        if run["status"] == "error":
            lines.append(f"| {run['run_id']} | error: {run['error'][:80]} | | | | | | | |")
            continue
        timing = run["timing"]
        lines.append(f"| {run['run_id']} | {run['status']} | {run['steps_done']} | "
                     f"{run['final']['train_loss']:.4f} | {run['final']['heldout_loss']:.4f} | "
                     f"{run['initial']['heldout_loss']:.4f} | {timing['first_eval_incl_compile_s']:.1f} | "
                     f"{timing['step_ms']:.1f} | {timing['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: list[dict], path: str | Path) -> bool:
    """Train loss (smoothed), held-out loss (late part, zoomed) and the lr slice; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    ok = [r for r in runs if r["status"] in ("ok", "truncated", "diverged") and "curves" in r]
    lr = main_lr(runs) if runs else None
    main = [r for r in ok if r["lr"] == lr]
    colors = {arm: f"C{i}" for i, arm in enumerate(ARM_ORDER)}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    first_seed = min((r["seed"] for r in main), default=0)
    steps = max((r["steps_done"] for r in main), default=1)
    late_train, late_heldout = [], []
    for run in sorted(main, key=lambda r: (_arm_rank(r["arm"]), r["seed"])):
        style = "-" if run["seed"] == first_seed else "--"
        label = f"{run['label']} s{run['seed']}"
        train = _smooth(run["curves"]["train_loss"], max(1, steps // 40))
        axes[0].plot(range(1, len(train) + 1), train, style, color=colors.get(run["arm"]), lw=1.2, label=label)
        late_train += [v for i, v in enumerate(train) if i >= 0.1 * steps and math.isfinite(v)]
        points = list(zip(run["curves"]["eval_steps"], run["curves"]["heldout_loss"]))
        axes[1].plot(*zip(*points), style + "o", color=colors.get(run["arm"]), ms=3, lw=1.2, label=label)
        late_heldout += [v for step, v in points if step >= 0.3 * steps and math.isfinite(v)]
    if late_train:
        axes[0].set_ylim(min(late_train) - 0.02, max(late_train) + 0.02)
    if late_heldout:
        low, high = min(late_heldout), max(late_heldout)
        axes[1].set_ylim(low - 0.1 * (high - low) - 0.005, high + 0.1 * (high - low) + 0.005)
        axes[1].set_xlim(0.28 * steps, 1.02 * steps)
    axes[0].set(title=f"train loss (moving mean), lr {lr:g}", xlabel="step", ylabel="nats / byte")
    axes[1].set(title="held-out loss (last 70% of training)", xlabel="step", ylabel="nats / byte")
    lrs, table = lr_slice(runs)
    for arm, by_lr in table.items():
        xs = [x for x in lrs if x in by_lr and by_lr[x]["status"] == "ok"]
        axes[2].plot(xs, [by_lr[x]["final"]["heldout_loss"] for x in xs], "o-", color=colors.get(arm),
                     label=f"{next(iter(by_lr.values()))['label']} s{first_seed}")
        others = [r for r in ok if r["arm"] == arm and r["seed"] != first_seed and r["status"] == "ok"]
        if others:
            axes[2].plot([r["lr"] for r in others], [r["final"]["heldout_loss"] for r in others], "x",
                         color=colors.get(arm), ms=8, label=f"{next(iter(by_lr.values()))['label']}, other seeds")
    axes[2].set(title="learning-rate slice: final held-out loss", xlabel="peak learning rate",
                ylabel="nats / byte", xscale="log")
    return save_figure(fig, path)


def write_outputs(runs: list[dict], md_path: str | Path | None = None, plot_path: str | Path | None = None) -> str:
    text = markdown_tables(runs)
    if md_path:
        Path(md_path).write_text(text)
    if plot_path:
        plot_curves(runs, plot_path)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tables and plots from train_quality jsonl records")
    parser.add_argument("results", nargs="*", default=None,
                        help="jsonl files or directories (default: benchmarks/train_quality_runs)")
    parser.add_argument("--md", default=None, help="markdown output (sweep default: REPORT.md in the directory)")
    parser.add_argument("--plot", default=None, help="one-model mode: the loss-curve PNG")
    parser.add_argument("--png-dir", default=None, help="sweep: directory for the PNGs (default: next to --md)")
    args = parser.parse_args(argv)
    paths = args.results or [str(Path(__file__).resolve().parent / "train_quality_runs")]
    records = read_all(paths)
    if not records:
        print(f"no records in {', '.join(map(str, paths))}: nothing to report")
        return
    if any(r.get("tag") for r in records):
        folder = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
        md = Path(args.md) if args.md else folder / "REPORT.md"
        print(write_sweep_report(records, md_path=md, png_dir=args.png_dir or md.parent))
        print(f"wrote {md}")
        return
    print(write_outputs(load_runs(paths), args.md, args.plot))


if __name__ == "__main__":
    main()
