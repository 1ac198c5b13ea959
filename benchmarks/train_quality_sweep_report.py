"""The width sweep's report (issue 15), rebuilt from every record in benchmarks/train_quality_runs/.

    python benchmarks/train_quality_report.py benchmarks/train_quality_runs

writes ``REPORT.md`` and three PNGs next to the records (or where ``--md`` /
``--png-dir`` say):

* held-out loss per width, arm and learning rate: mean ± sample sd over seeds;
* the paired gap to the baseline (MXFP8 with the exact RMSNorm), seed by seed
  (same initialisation and data order), against K, with its 95% t-interval, and
  a verdict: *within noise* where the interval includes 0, *worse* / *better*
  where it does not; one seed is compared with twice the baseline's seed sd;
* the estimator: r / RMS per site (verify) at initialisation and at the end, and
  the Gaussian p = 2 estimate's row-to-row spread on each arm's own activations,
  against K (theory: the spread shrinks like 1 / sqrt(K));
* the calibrated constants, and whether re-calibrating during training helped;
* issue 13's check at the 25M model: the FP8 recipe against bf16;
* ``gap_vs_k.png``, ``loss_curves.png``, ``ratio_vs_k.png`` (needs matplotlib; skipped
  with a message without it).

Records are deduplicated by run id: a finished record (ok, diverged) wins over an
unfinished one, a later one over an earlier one of the same kind.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

BASELINE = "mxfp8-rmsnorm"
REFERENCE_13 = "bf16"
ARM_ORDER = ("mxfp8-rmsnorm", "mxfp8-mxnorm-p2", "mxfp8-mxnorm-p2-cal", "mxfp8-mxnorm-p2-recal", "mxfp8-mxnorm-p1",
             "nvfp4-rmsnorm", "nvfp4-mxnorm-p2", "bf16", "fp8-rmsnorm", "fp8-mxnorm", "fp8-rmsnorm-e4m3")
MXNORM_ARMS = ("mxfp8-mxnorm-p2", "mxfp8-mxnorm-p2-cal", "mxfp8-mxnorm-p2-recal", "mxfp8-mxnorm-p1",
               "nvfp4-mxnorm-p2", "fp8-mxnorm")
GAUSSIAN_P2 = {"mxfp8": 0.418492, "nvfp4": 0.468849, "fp8": 0.418492}
FINAL = ("ok", "diverged")


def _table(rows: list[list], headers: list[str]) -> str:
    """A GitHub markdown table, cells as written (no number re-formatting)."""
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------------------
# loading

def dedupe(records: list[dict]) -> list[dict]:
    """One record per run id: finished beats unfinished, later beats earlier (by ``env.date``, then order)."""
    best: dict[str, tuple] = {}
    for order, record in enumerate(records):
        key = (record.get("status") in FINAL, record.get("env", {}).get("date", ""), order)
        if record["run_id"] not in best or key > best[record["run_id"]][0]:
            best[record["run_id"]] = (key, record)
    return [record for _, record in best.values()]


def repeats(records: list[dict]) -> dict[str, list[float]]:
    """Held-out losses of the finished sweep runs recorded more than once (same run id: same seed, data order
    and settings), in the order recorded. They differ only by the GPU's nondeterminism (atomics, autotuned
    kernels), which training amplifies and the same-seed pairing does not remove."""
    losses: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.get("tag") and record.get("status") == "ok":
            losses[record["run_id"]].append(record["final"]["heldout_loss"])
    return {run_id: values for run_id, values in losses.items() if len(values) > 1}


def repeat_sd(repeated: dict[str, list[float]]) -> float:
    """One run's sd from repeats alone: the pooled within-run sample variance of the repeated runs."""
    deviations = [(v - statistics.fmean(values)) ** 2 for values in repeated.values() for v in values]
    dof = sum(len(values) - 1 for values in repeated.values())
    return math.sqrt(sum(deviations) / dof) if dof else math.nan


def sweep_records(records: list[dict]) -> list[dict]:
    """The width sweep's records (those with a width tag), one per run; a run finished ok more than once
    counts with the mean of its held-out losses (``repeats``)."""
    repeated = repeats(records)
    runs = []
    for run in dedupe(records):
        if run.get("tag") and run["run_id"] in repeated and run.get("status") == "ok":
            losses = repeated[run["run_id"]]
            run = {**run, "final": {**run["final"], "heldout_loss": statistics.fmean(losses)}, "repeats": len(losses)}
        if run.get("tag"):
            runs.append(run)
    return runs


def width_of(tag: str) -> int:
    return int(tag[1:].split("L")[0])


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("status") == "ok"]


def tags_of(runs: list[dict]) -> list[str]:
    return sorted({r["tag"] for r in runs}, key=width_of)


def main_lr(runs: list[dict]) -> float:
    values = [r["settings"]["main_lr"] for r in runs if "settings" in r]
    return statistics.mode(values) if values else math.nan


# ---------------------------------------------------------------------------
# statistics

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` >= 1 degrees of freedom (the next tabulated df below)."""
    return 1.96 if df > 30 else T975[max(k for k in T975 if k <= df)]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample sd and half-width of the 95% t-interval of the mean (``nan`` where undefined)."""
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    sd = statistics.stdev(values)
    return mean, sd, t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))


@dataclass
class Gap:
    """Paired held-out gap of one arm to a reference arm at one width and learning rate."""

    arm: str
    ref: str
    tag: str
    k: int | None
    lr: float
    seeds: list[int]
    deltas: list[float]
    mean: float
    sd: float
    ci: float
    ref_sd: float  # the reference arm's seed sd at this width and lr: the noise of one run
    not_ok: dict  # run id -> status, of this arm's runs without a pair

    @property
    def verdict(self) -> str:
        n = len(self.deltas)
        if n == 0:
            return "no pair"
        if n >= 2:
            low, high = self.mean - self.ci, self.mean + self.ci
            if low <= 0 <= high:
                return "within noise (95% CI includes 0)"
            return "worse (95% CI above 0)" if low > 0 else "better (95% CI below 0)"
        if math.isnan(self.ref_sd):
            return "one seed: unresolved"
        if abs(self.mean) <= 2 * self.ref_sd:
            return "one seed: within 2 sd of the reference's seeds"
        return f"one seed: {'above' if self.mean > 0 else 'below'} 2 sd of the reference's seeds"

    @property
    def within_noise(self) -> bool | None:
        """True / False as the verdict says; None where it cannot say (no pair, one seed without a noise level)."""
        if not self.deltas or (len(self.deltas) == 1 and math.isnan(self.ref_sd)):
            return None
        return "within" in self.verdict


# (arm, reference): MXNorm against the exact norm in the same format, and what a format costs
MXNORM_PAIRS = (("mxfp8-mxnorm-p2", BASELINE), ("mxfp8-mxnorm-p2-cal", BASELINE), ("mxfp8-mxnorm-p2-recal", BASELINE),
                ("mxfp8-mxnorm-p1", BASELINE), ("nvfp4-mxnorm-p2", "nvfp4-rmsnorm"))
FORMAT_PAIRS = (("nvfp4-rmsnorm", BASELINE),)
RECAL_PAIRS = (("mxfp8-mxnorm-p2-recal", "mxfp8-mxnorm-p2-cal"),)
ISSUE13_PAIRS = (("fp8-rmsnorm", REFERENCE_13), ("fp8-mxnorm", REFERENCE_13), ("fp8-rmsnorm-e4m3", REFERENCE_13),
                 (BASELINE, REFERENCE_13), ("fp8-mxnorm", "fp8-rmsnorm"), ("fp8-rmsnorm-e4m3", "fp8-rmsnorm"))


def paired_gaps(runs: list[dict], pairs: tuple[tuple[str, str], ...]) -> list[Gap]:
    """For each (arm, reference) pair, at every width and lr where both ran: the arm's held-out loss minus
    the reference's, seed by seed."""
    by_key = {(r["tag"], r["arm"], r["lr"], r["seed"]): r for r in runs}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for arm, ref in pairs:
        for r in runs:
            if r["arm"] == arm:
                groups[(arm, ref, r["tag"], r["lr"])].append(r)
    gaps = []
    for (arm, ref, tag, lr), members in groups.items():
        refs = [by_key[k] for k in by_key if k[0] == tag and k[1] == ref and k[2] == lr]
        if not refs:
            continue
        ref_losses = [r["final"]["heldout_loss"] for r in _ok(refs)]
        seeds, deltas, not_ok = [], [], {}
        for run in sorted(members, key=lambda r: r["seed"]):
            base = by_key.get((tag, ref, lr, run["seed"]))
            if run["status"] == "ok" and base is not None and base["status"] == "ok":
                seeds.append(run["seed"])
                deltas.append(run["final"]["heldout_loss"] - base["final"]["heldout_loss"])
            elif run["status"] != "ok":
                not_ok[run["run_id"]] = run["status"]
        mean, sd, ci = mean_ci(deltas)
        gaps.append(Gap(arm, ref, tag, members[0].get("k"), lr, seeds, deltas, mean, sd, ci,
                        mean_ci(ref_losses)[1], not_ok))
    order = {pair: i for i, pair in enumerate(pairs)}
    return sorted(gaps, key=lambda g: (order[(g.arm, g.ref)], g.lr, width_of(g.tag)))


def heldout_rows(runs: list[dict]) -> list[list]:
    """Per width, arm and lr: seeds, mean ± sd of the final held-out loss, and the runs not ok."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(width_of(r["tag"]), r["tag"], _arm_rank(r["arm"]), r["arm"], r["lr"])].append(r)
    rows = []
    for (_, tag, _, arm, lr), members in sorted(groups.items()):
        ok = _ok(members)
        mean, sd, _ = mean_ci([r["final"]["heldout_loss"] for r in ok])
        step_ms = [r["timing"]["step_ms"] for r in ok]
        bad = ", ".join(f"s{r['seed']}: {r['status']}" for r in members if r["status"] != "ok")
        rows.append([tag, members[0].get("k") or "-", arm, f"{lr:g}", ",".join(str(r["seed"]) for r in ok) or "-",
                     _pm(mean, sd), f"{statistics.median(step_ms):.1f}" if step_ms else "-", bad])
    return rows


def repeat_rows(repeated: dict[str, list[float]], gaps: list[Gap]) -> list[list]:
    """Per width: how many runs were repeated, one run's sd from them, and the baseline's sd over seeds."""
    by_tag: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for run_id, values in repeated.items():
        by_tag[run_id.split("-")[0]][run_id] = values
    seed_sd = {g.tag: g.ref_sd for g in gaps if g.ref == BASELINE}
    return [[tag, len(runs), f"{repeat_sd(runs):.4f}",
             "-" if math.isnan(seed_sd.get(tag, math.nan)) else f"{seed_sd[tag]:.4f}"]
            for tag, runs in sorted(by_tag.items(), key=lambda kv: width_of(kv[0]))]


def _pm(mean: float, sd: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def _signed_ci(gap: Gap) -> str:
    if not gap.deltas:
        return "-"
    text = f"{gap.mean:+.4f}"
    if not math.isnan(gap.ci):
        text += f" [{gap.mean - gap.ci:+.4f}, {gap.mean + gap.ci:+.4f}]"
    return text


def gap_table(gaps: list[Gap]) -> list[list]:
    return [[g.arm, g.ref, f"{g.lr:g}", g.tag, g.k or "-", ",".join(map(str, g.seeds)) or "-",
             ", ".join(f"{d:+.4f}" for d in g.deltas) or "-", _signed_ci(g),
             "-" if math.isnan(g.ref_sd) else f"{g.ref_sd:.4f}", g.verdict,
             ", ".join(f"{k}: {v}" for k, v in g.not_ok.items())] for g in gaps]


GAP_HEADERS = ["arm", "reference", "lr", "width", "K", "seeds", "Δ per seed", "mean Δ [95% CI]", "ref seed sd",
               "verdict", "unpaired"]


# ---------------------------------------------------------------------------
# the estimator

def _site_values(stats: dict, source: str, field: str) -> list[float]:
    if source == "verify":
        sites = stats.get("verify", {}).get("sites", [])
    else:
        sites = stats.get("probe", [])
    return [s[field] for s in sites if s.get(field) is not None and math.isfinite(s[field])]


def estimator_rows(runs: list[dict]) -> list[dict]:
    """Per MXNorm arm and width: r / RMS of the estimate in use (mean over sites and seeds; the sites' range),
    its row-to-row sd, at initialisation and at the end."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in _ok(runs):
        if r["arm"] in MXNORM_ARMS and r.get("estimator") and r["lr"] == r["settings"]["main_lr"]:
            groups[(r["arm"], r["tag"])].append(r)
    rows = []
    for (arm, tag), members in sorted(groups.items(), key=lambda kv: (_arm_rank(kv[0][0]), width_of(kv[0][1]))):
        row = {"arm": arm, "tag": tag, "k": members[0].get("k"), "seeds": len(members)}
        for when, index in (("init", 0), ("end", -1)):
            means = [v for r in members for v in _site_values(r["estimator"][index], "verify", "ratio_mean")]
            sds = [v for r in members for v in _site_values(r["estimator"][index], "verify", "ratio_std")]
            row[when] = (statistics.fmean(means) if means else math.nan, min(means, default=math.nan),
                         max(means, default=math.nan), statistics.fmean(sds) if sds else math.nan)
        rows.append(row)
    return rows


def probe_rows(runs: list[dict], arm: str = BASELINE) -> list[dict]:
    """On ``arm``'s own activations at the end: the Gaussian p = 2 estimate's r / RMS for blocks of 32 and 16
    (mean over sites and seeds) and its row-to-row sd, against the K each block size gives."""
    rows = []
    for tag in tags_of(runs):
        members = [r for r in _ok(runs) if r["arm"] == arm and r["tag"] == tag and r.get("estimator")]
        if not members:
            continue
        width = width_of(tag)
        for block in (32, 16):
            means = [v for r in members for v in _site_values(r["estimator"][-1], "probe", f"b{block}_mean")]
            sds = [v for r in members for v in _site_values(r["estimator"][-1], "probe", f"b{block}_sd")]
            if means:
                rows.append({"tag": tag, "block": block, "k": width // block, "mean": statistics.fmean(means),
                             "sd": statistics.fmean(sds), "sites_min": min(means), "sites_max": max(means)})
    return rows


def calibration_rows(runs: list[dict]) -> list[list]:
    """The calibrated arms' constants (mean [min, max] over sites and seeds) at each calibration step."""
    groups: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    fractions: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in _ok(runs):
        if not r["arm"].endswith(("-cal", "-recal")):
            continue
        for entry in r.get("calibration", {}).get("constants", []):
            groups[(r["arm"], r["tag"])][entry["step"]] += list(entry["sites"].values())
            fractions[(r["arm"], r["tag"])][entry["step"]] = entry["step"] / max(1, r["steps_planned"])
    rows = []
    for (arm, tag), by_step in sorted(groups.items(), key=lambda kv: (_arm_rank(kv[0][0]), width_of(kv[0][1]))):
        cells = [f"step {step} ({fractions[(arm, tag)][step]:.0%}): {statistics.fmean(v):.4f} "
                 f"[{min(v):.4f}, {max(v):.4f}]" for step, v in sorted(by_step.items())]
        rows.append([arm, tag, GAUSSIAN_P2["mxfp8"], "; ".join(cells)])
    return rows


# ---------------------------------------------------------------------------
# consistency

def provenance(runs: list[dict]) -> list[str]:
    """Where the records come from, and warnings where pairs would mix corpora, designs or devices."""
    lines = []
    corpora = {r.get("corpus", {}).get("sha256") for r in runs if r.get("corpus")}
    devices = sorted({r.get("env", {}).get("device_name", "?") for r in runs})
    dates = sorted(r["env"]["date"] for r in runs if r.get("env", {}).get("date"))
    versions = sorted({f"torch {r['env'].get('torch')}, triton {r['env'].get('triton')}, "
                       f"matmul {r['env'].get('matmul_backend')}" for r in runs if r.get("env")})
    sources = sorted({f"{r['env'].get('git_commit') or '-'} / {r['env'].get('source_digest', '-')}"
                      for r in runs if r.get("env")})
    lines.append(f"{len(runs)} runs; devices: {', '.join(devices)}; dates {dates[0] if dates else '-'} .. "
                 f"{dates[-1] if dates else '-'}")
    lines.append(f"software: {'; '.join(versions) or '-'}; code (git commit / source digest): {', '.join(sources)}")
    if len(corpora) > 1:
        lines.append(f"WARNING: {len(corpora)} different corpora (Python versions' stdlibs); pairs may mix them")
    steps = defaultdict(set)
    for r in runs:
        steps[r["tag"]].add(r.get("steps_planned"))
    for tag, values in steps.items():
        if len(values) > 1:
            lines.append(f"WARNING: {tag} has runs of {sorted(values)} steps")
    if len(devices) > 1:
        lines.append("WARNING: runs from more than one kind of device: their ms/step do not compare")
    shared = sum(r.get("env", {}).get("gpu_shared_by_lanes", 1) > 1 for r in runs)
    if shared:
        lines.append(f"{shared} runs shared the GPU with other runs (`--lanes`): their ms/step are those of a "
                     "shared GPU")
    return lines


def design_rows(runs: list[dict]) -> list[list]:
    rows = []
    for tag in tags_of(runs):
        r = next(r for r in runs if r["tag"] == tag and "settings" in r)
        model, settings = r["settings"]["model"], r["settings"]
        n_params = next((x["n_params"] for x in runs if x["tag"] == tag and "n_params" in x), None)
        rows.append([tag, model["dim"], model["dim"] // 32, model["dim"] // 16, model["n_layers"],
                     f"{n_params / 1e6:.1f}M" if n_params else "-", settings["steps"],
                     f"{settings['steps'] * settings['batch_size'] * settings['seq_len'] / 1e6:.1f}M",
                     f"{settings['steps'] * settings['batch_size'] * settings['seq_len'] / n_params:.3f}"
                     if n_params else "-", settings.get("compile_scope", "-") if settings["compile"] else "eager"])
    return rows


# ---------------------------------------------------------------------------
# text

def conclusions(gaps: list[Gap], lr: float) -> list[str]:
    """Plain sentences: at which K each arm's gap is within noise, and where not."""
    lines = []
    by_arm: dict[tuple, list[Gap]] = defaultdict(list)
    for g in gaps:
        by_arm[(g.arm, g.lr)].append(g)
    for (arm, arm_lr), group in sorted(by_arm.items(), key=lambda kv: (kv[0][1] != lr, _arm_rank(kv[0][0]),
                                                                       kv[0][1])):
        within = [g for g in group if g.within_noise]
        outside = [g for g in group if g.within_noise is False]
        unresolved = [g for g in group if g.within_noise is None]

        def ks(items: list[Gap]) -> str:
            return ", ".join(f"K={g.k} ({g.mean:+.4f}" + ("" if math.isnan(g.ci) else f" ± {g.ci:.4f}")
                             + f", n={len(g.deltas)})" for g in items)

        parts = []
        if within:
            parts.append(f"within noise at {ks(within)}")
        if outside:
            parts.append(f"outside noise at {ks(outside)}")
        if unresolved:
            parts.append(f"unresolved at {ks(unresolved)}")
        lines.append(f"- **{arm}** vs {group[0].ref}, lr {arm_lr:g}: " + "; ".join(parts) + ".")
    return lines


def sweep_markdown(records: list[dict], png_names: dict[str, str] | None = None) -> str:
    runs = sweep_records(records)
    if not runs:
        return "No width-sweep records yet.\n"
    lr = main_lr(runs)
    finished = [r for r in runs if r.get("status") in FINAL]
    gaps = paired_gaps(finished, MXNORM_PAIRS)
    lines = ["# Training quality vs width: MXNorm's gap to the exact RMSNorm (issue 15)", "",
             "Rebuilt by `python benchmarks/train_quality_report.py benchmarks/train_quality_runs` from every "
             "record there. Losses are held-out nats per byte (the mean over 32 fixed held-out batches at the end "
             "of training); Δ is an arm's held-out loss minus the baseline's (MXFP8 with the exact RMSNorm) in the "
             "same seed, i.e. the same initialisation and data order (NVFP4 MXNorm is compared with NVFP4 "
             "RMSNorm); the 95% interval is Student's t over seeds. "
             "K is the number of blocks per row MXNorm averages in the arm's format (D / 32 in MXFP8 and FP8, "
             "D / 16 in NVFP4).", ""]
    lines += [f"- {line}" for line in provenance(runs)] + [""]
    lines += ["## Conclusions (generated from the intervals below)", ""] + conclusions(gaps, lr) + [""]
    lines += ["Caveat of the design: along the sweep depth x width is fixed, so the narrower models have more "
              "MXNorm sites (2 per layer) and fewer steps (the same tokens per parameter); both would make the gap "
              "look larger at small K. The NVFP4 arms double K at the same width, depth and steps, and the "
              "estimator's r / RMS below does not depend on depth: those are the comparisons without that "
              "confound.", ""]
    lines += ["## Model sizes", "",
              _table(design_rows(runs), ["width", "D", "K mxfp8", "K nvfp4", "layers", "params", "steps",
                                           "tokens", "tokens/param", "compile"]), ""]
    lines += ["## Held-out loss per arm", "",
              _table(heldout_rows(runs), ["width", "K", "arm", "lr", "seeds", "held-out (mean ± sd)", "ms/step",
                                          "not ok"]), ""]
    lines += ["## Paired gap: MXNorm against the exact RMSNorm in the same format", "",
              _table(gap_table(gaps), GAP_HEADERS), ""]
    formats = paired_gaps(finished, FORMAT_PAIRS)
    if formats:
        lines += ["What the format itself costs (exact RMSNorm in both):", "",
                  _table(gap_table(formats), GAP_HEADERS), ""]
    if png_names and png_names.get("gap"):
        lines += [f"![gap vs K]({png_names['gap']})", ""]
    recal = paired_gaps(finished, RECAL_PAIRS)
    if recal:
        lines += ["## Does re-calibrating during training help?", "",
                  "The re-calibrated arm minus the arm calibrated once at initialisation (same seed):", "",
                  _table(gap_table(recal), GAP_HEADERS), ""]
    repeated = repeats(records)
    if repeated:
        lines += ["## The same run twice", "",
                  "Runs recorded more than once (same seed, data order and settings) differ by the GPU's "
                  "run-to-run nondeterminism (atomics, autotuned kernels), which training amplifies and the "
                  "same-seed pairing does not remove; the tables above take the mean of a run's records. "
                  "Per width, one run's sd from the repeats alone against the baseline's sd over seeds:", "",
                  _table(repeat_rows(repeated, gaps), ["width", "repeated runs", "sd of one run (repeats)",
                                                       "baseline sd over seeds"]), "",
                  _table([[run_id, ", ".join(f"{v:.4f}" for v in values), f"{max(values) - min(values):.4f}"]
                          for run_id, values in sorted(repeated.items(), key=lambda kv: (width_of(kv[0]), kv[0]))],
                         ["run", "held-out per record", "range"]), ""]
    calibration = calibration_rows(runs)
    if calibration:
        lines += ["## Calibrated constants", "",
                  "Per site RMS / M_p measured by `optimize`'s calibration (mean [min, max] over the sites and "
                  "seeds), at initialisation and at each re-calibration, against the Gaussian c'(2, 32):", "",
                  _table(calibration, ["arm", "width", "Gaussian c'", "constants"]), ""]
    estimator = estimator_rows(runs)
    if estimator:
        table = [[row["arm"], row["tag"], row["k"], row["seeds"]]
                 + [f"{row[w][0]:.4f} [{row[w][1]:.4f}, {row[w][2]:.4f}]" if not math.isnan(row[w][0]) else "-"
                    for w in ("init", "end")]
                 + [f"{row[w][3]:.4f}" if not math.isnan(row[w][3]) else "-" for w in ("init", "end")]
                 for row in estimator]
        lines += ["## The estimator during training", "",
                  "r / RMS of the estimate each MXNorm arm used (its constant included), from `mxrewrite.verify` "
                  f"on {runs[0]['settings'].get('stats_rows', 4)} held-out sequences (main lr): mean over the "
                  "sites and seeds [the sites' range], and the row-to-row sd:", "",
                  _table(table, ["arm", "width", "K", "seeds", "r/RMS at init", "r/RMS at end", "row sd init",
                                 "row sd end"]), ""]
    probes = probe_rows(runs)
    if probes:
        table = [[p["tag"], p["block"], p["k"], f"{p['mean']:.4f} [{p['sites_min']:.4f}, {p['sites_max']:.4f}]",
                  f"{p['sd']:.4f}", f"{p['sd'] * math.sqrt(p['k']):.3f}"] for p in probes]
        lines += ["What MXNorm p = 2 with the Gaussian constant would read on the baseline's own activations at "
                  "the end of training (a bias a calibrated constant removes; a row spread no constant removes; "
                  "sd x sqrt(K) is constant if the spread falls like 1 / sqrt(K)):", "",
                  _table(table, ["width", "block", "K", "r/RMS mean [sites]", "row sd", "sd x sqrt(K)"]), ""]
    if png_names and png_names.get("ratio"):
        lines += [f"![r / RMS vs K]({png_names['ratio']})", ""]
    issue13 = paired_gaps(finished, ISSUE13_PAIRS)
    unavailable = [r for r in runs if r.get("status") == "unavailable"]
    if issue13 or unavailable:
        lines += ["## Issue 13: the FP8 recipe against bf16 (25M model)", "",
                  "Held-out loss minus bf16's (no rewrite), same seed; last, FP8 MXNorm and FP8 with e4m3 gradients "
                  "minus FP8 RMSNorm:", "",
                  _table(gap_table(issue13), GAP_HEADERS) if issue13 else "no pairs yet", ""]
        for r in unavailable:
            lines.append(f"- {r['run_id']}: unavailable: {r.get('error', '')}")
        lines.append("")
    if png_names and png_names.get("curves"):
        lines += ["## Loss curves", "", f"![held-out loss curves]({png_names['curves']})", ""]
    lines += ["## Every run", "", _table(every_run_rows(runs), ["run", "status", "steps", "held-out", "ms/step",
                                                                "compile + first eval s", "total s", "device",
                                                                "date"]), ""]
    return "\n".join(lines)


def every_run_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in sorted(runs, key=lambda r: (width_of(r["tag"]), _arm_rank(r["arm"]), r["lr"], r["seed"])):
        timing, final = r.get("timing", {}), r.get("final", {})
        status = r["status"] if r["status"] not in ("error", "unavailable") else f"{r['status']}: {r['error'][:60]}"
        rows.append([r["run_id"], status, r.get("steps_done", "-"),
                     f"{final['heldout_loss']:.4f}" if "heldout_loss" in final else "-",
                     f"{timing['step_ms']:.1f}" if "step_ms" in timing else "-",
                     f"{timing['first_eval_incl_compile_s']:.1f}" if timing else "-",
                     f"{timing['total_s']:.0f}" if timing else "-",
                     r.get("env", {}).get("device_name", "-"), r.get("env", {}).get("date", "-")])
    return rows


# ---------------------------------------------------------------------------
# plots

def save_figure(fig, path: str | Path, legend_fontsize: int = 7) -> bool:
    """Grid and (where something is labelled) a legend on every panel, then write ``path`` and close."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return None
    return plt


COLORS = {arm: f"C{i}" for i, arm in enumerate(ARM_ORDER)}


def plot_gaps(gaps: list[Gap], path: str | Path) -> bool:
    """Paired gap vs K, one panel per learning rate, 95% intervals as error bars (none for one seed).
    Arms are shifted a little along K so that their bars do not hide each other."""
    plt = _pyplot()
    if plt is None or not gaps:
        return False
    lrs = sorted({g.lr for g in gaps})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6.5 * len(lrs), 4.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        pairs = list(dict.fromkeys((g.arm, g.ref) for g in gaps if g.lr == lr))
        for i, (arm, ref) in enumerate(pairs):
            points = sorted((g for g in gaps if g.lr == lr and (g.arm, g.ref) == (arm, ref) and g.deltas),
                            key=lambda g: g.k)
            if not points:
                continue
            shift = 2 ** (0.06 * (i - (len(pairs) - 1) / 2))
            ax.errorbar([g.k * shift for g in points], [g.mean for g in points],
                        yerr=[0 if math.isnan(g.ci) else g.ci for g in points], marker="o", capsize=4,
                        color=COLORS.get(arm), label=f"{arm} - {ref}",
                        linestyle="--" if arm.startswith("nvfp4") else "-")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"MXNorm's held-out gap to the exact norm, lr {lr:g}",
               xlabel="K (blocks per row in the arm's format)", ylabel="Δ nats / byte (paired by seed, 95% CI)")
    return save_figure(fig, path)


def gap_curve(runs: list[dict], arm: str, ref: str, tag: str, lr: float) -> tuple[list[int], list[float], int]:
    """Held-out curve of ``arm`` minus ``ref``'s, averaged over the seeds both finished (steps, values, n)."""
    by = {(r["arm"], r["seed"]): r for r in runs if r["tag"] == tag and r["lr"] == lr and r["status"] == "ok"}
    diffs, steps = [], None
    for (name, seed), run in sorted(by.items()):
        base = by.get((ref, seed))
        if name != arm or base is None or base["curves"]["eval_steps"] != run["curves"]["eval_steps"]:
            continue
        steps = run["curves"]["eval_steps"]
        diffs.append([a - b for a, b in zip(run["curves"]["heldout_loss"], base["curves"]["heldout_loss"])])
    if not diffs:
        return [], [], 0
    return steps, [statistics.fmean(v) for v in zip(*diffs)], len(diffs)


def plot_curves(runs: list[dict], path: str | Path) -> bool:
    """Per width at the main lr: top, the held-out curves of seed 0; bottom, each MXNorm arm's held-out curve
    minus its exact-norm reference's, averaged over the paired seeds."""
    plt = _pyplot()
    runs = [r for r in runs if r.get("status") in FINAL and "curves" in r]
    if plt is None or not runs:
        return False
    lr, tags = main_lr(runs), tags_of(runs)
    fig, axes = plt.subplots(2, len(tags), figsize=(5 * len(tags), 8), squeeze=False)
    for col, tag in enumerate(tags):
        here = [r for r in runs if r["tag"] == tag and r["lr"] == lr]
        first_seed = min((r["seed"] for r in here), default=0)
        late = []
        for run in sorted((r for r in here if r["seed"] == first_seed), key=lambda r: _arm_rank(r["arm"])):
            steps, values = run["curves"]["eval_steps"], run["curves"]["heldout_loss"]
            axes[0][col].plot(steps, values, "o-", ms=3, color=COLORS.get(run["arm"]), label=run["arm"])
            late += [v for step, v in zip(steps, values) if step >= 0.3 * steps[-1] and math.isfinite(v)]
        if late:
            low, high = min(late), max(late)
            axes[0][col].set_ylim(low - 0.1 * (high - low) - 0.005, high + 0.1 * (high - low) + 0.005)
            axes[0][col].set_xlim(0.28 * max(r["steps_done"] for r in here), None)
        axes[0][col].set(title=f"{tag}, lr {lr:g}, seed {first_seed}: held-out loss", xlabel="step",
                         ylabel="nats / byte")
        for arm, ref in MXNORM_PAIRS + FORMAT_PAIRS:
            steps, values, n = gap_curve(runs, arm, ref, tag, lr)
            if n:
                axes[1][col].plot(steps, values, "o-", ms=3, color=COLORS.get(arm), label=f"{arm} - {ref} (n={n})")
        axes[1][col].axhline(0, color="black", lw=0.8)
        axes[1][col].set(title=f"{tag}: paired gap during training", xlabel="step", ylabel="Δ nats / byte")
    return save_figure(fig, path, legend_fontsize=6)


def plot_ratio(estimator: list[dict], probes: list[dict], path: str | Path) -> bool:
    """Left: r / RMS in use at the end vs K (sites' range as bars); right: the estimate's row sd vs K."""
    plt = _pyplot()
    if plt is None or not (estimator or probes):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm in dict.fromkeys(row["arm"] for row in estimator):
        rows = sorted((r for r in estimator if r["arm"] == arm and not math.isnan(r["end"][0])),
                      key=lambda r: r["k"])
        if rows:
            axes[0].errorbar([r["k"] for r in rows], [r["end"][0] for r in rows],
                             yerr=[[r["end"][0] - r["end"][1] for r in rows],
                                   [r["end"][2] - r["end"][0] for r in rows]],
                             marker="o", capsize=4, color=COLORS.get(arm), label=arm)
    axes[0].axhline(1, color="black", lw=0.8)
    axes[0].set(title="r / RMS of the estimate in use, end of training", xlabel="K", ylabel="r / RMS")
    for block, marker in ((32, "o"), (16, "s")):
        rows = sorted((p for p in probes if p["block"] == block), key=lambda p: p["k"])
        if rows:
            axes[1].plot([p["k"] for p in rows], [p["sd"] for p in rows], marker + "-",
                         label=f"Gaussian p=2 estimate, B={block}, on the baseline's activations")
    if probes:
        ks = sorted({p["k"] for p in probes})
        anchor = next(p for p in probes if p["k"] == ks[0])
        axes[1].plot(ks, [anchor["sd"] * math.sqrt(ks[0] / k) for k in ks], "k:", label="1 / sqrt(K)")
    axes[1].set(title="row-to-row sd of r / RMS", xlabel="K", ylabel="sd")
    for ax in axes:
        ax.set_xscale("log", base=2)
    return save_figure(fig, path)


PNG_NAMES = {"gap": "gap_vs_k.png", "curves": "loss_curves.png", "ratio": "ratio_vs_k.png"}


def write_sweep_report(records: list[dict], md_path: str | Path | None = None,
                       png_dir: str | Path | None = None) -> str:
    """The markdown report (returned, and written to ``md_path``) and the PNGs in ``png_dir``."""
    runs = sweep_records(records)
    finished = [r for r in runs if r.get("status") in FINAL]
    written = {}
    if png_dir is not None and runs:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        gaps = paired_gaps(finished, MXNORM_PAIRS)
        makers = {"gap": lambda p: plot_gaps(gaps, p), "curves": lambda p: plot_curves(runs, p),
                  "ratio": lambda p: plot_ratio(estimator_rows(runs), probe_rows(runs), p)}
        for key, make in makers.items():
            if make(png_dir / PNG_NAMES[key]):
                written[key] = (png_dir / PNG_NAMES[key]).name if md_path is None else \
                    _relative(png_dir / PNG_NAMES[key], Path(md_path).parent)
    text = sweep_markdown(records, written)
    if md_path is not None:
        Path(md_path).write_text(text)
    return text


def _relative(path: Path, start: Path) -> str:
    try:
        return path.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
