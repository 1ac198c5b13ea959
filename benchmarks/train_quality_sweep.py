"""The width sweep of issue 15: which runs, at which sizes, in which order, and what they cost.

Does MXNorm's gap to the exact RMSNorm close as the hidden size grows? MXNorm
estimates each row's RMS from its K = D / B block maxima (B = 32 in MXFP8, 16 in
NVFP4), and the estimate tightens as K grows (../shared/MXNORM.md). The sweep trains
the train_quality model family at four hidden sizes:

| D | MXFP8 K | NVFP4 K | layers | parameters | steps |
|---|---|---|---|---|---|
| 256 | 8 | 16 | 16 | 12.7M | 225 |
| 512 | 16 | 32 | 8 | 25.4M | 450 |
| 1024 | 32 | 64 | 4 | 47.7M | 844 |
| 2048 | 64 | 128 | 2 | 95.4M | 1688 |

Design (``--plan`` prints it with the time estimates):

* **Same tokens per parameter** everywhere: 0.29 (the last study's 450 steps of
  32 x 512 tokens at the 25M model, kept so that D = 512 repeats that study's
  point; issue 13's "usual steps" too).
* **Depth x width = 4096**: parameters grow like D, not D^2, so the widest run
  still fits a minute or two of an H200 at that token budget while the narrowest
  still trains 225 steps. The price, stated in the report: depth (and so the
  number of MXNorm sites, 2 per layer) and the step count change with K along
  the sweep. Two controls do not have that confound: the NVFP4 arms (K doubled at
  the same width, depth and steps) and the estimator's measured r / RMS per site,
  which does not depend on depth.
* Learning rates: 1e-3 (the best of the last study) and 2e-3 (one higher).

Arms and seeds (``DEFAULT_RULES``; tiers in priority order, run tier by tier):

0. seed 0 at lr 1e-3: the baseline (MXFP8, exact RMSNorm), MXNorm p = 2 with
   the Gaussian constant, MXNorm p = 2 with ``rescale="calibrated"``;
1. seeds 1 and 2 of the same;
2. lr 2e-3: baseline and p = 2, seeds 0-2; calibrated, seed 0;
3. calibrated and re-calibrated during training (seed 0, lr 1e-3);
4. at D = 256 and 512: MXNorm p = 1, NVFP4 with the exact RMSNorm and NVFP4
   MXNorm p = 2, seeds 0-2 (NVFP4's K at those widths equals MXFP8's at 512 and 1024);
5. at D = 512 (the 25M model), issue 13's check: bf16 (no rewrite), the FP8 recipe
   (``format="fp8", linears="all"``) with the exact RMSNorm, with MXNorm, and with the
   exact RMSNorm and e4m3 gradients (``grad_cast="e4m3"``), seeds 0-2.

Run times are estimated from the model's FLOPs with assumed H200 speeds
(``CostModel``: an MX GEMM on Hopper is emulated, so the assumed rates are far
below the H200's bf16 peak), until records exist: then each (width, arm)'s
measured times replace the estimate.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from train_quality_model import ModelConfig, parameter_count, train_flops_per_token, width_config

BATCH_SIZE = 32
SEQ_LEN = 512
ANCHOR = width_config(512, 8)  # the last study's 25M model ...
ANCHOR_STEPS = 450  # ... and its step count
TOKENS_PER_PARAM = ANCHOR_STEPS * BATCH_SIZE * SEQ_LEN / parameter_count(ANCHOR)  # 0.290
DEPTH_TIMES_WIDTH = 4096
DEFAULT_WIDTHS = (256, 512, 1024, 2048)
MAIN_LR, HIGH_LR = 1e-3, 2e-3
SEEDS = (0, 1, 2)
FINAL_STATUSES = frozenset({"ok", "diverged"})  # a record with these is a result: never re-run
RECORDS_DIR = Path(__file__).resolve().parent / "train_quality_runs"


@dataclass(frozen=True)
class WidthSpec:
    """One model size of the sweep: hidden size and depth."""

    d_model: int
    n_layers: int

    @classmethod
    def parse(cls, text: str) -> "WidthSpec":
        """``"512"`` (depth ``4096 / 512``, at least 1) or ``"512:8"`` (explicit depth)."""
        d_text, _, l_text = text.partition(":")
        d_model = int(d_text)
        n_layers = int(l_text) if l_text else max(1, DEPTH_TIMES_WIDTH // d_model)
        return cls(d_model, n_layers)

    @property
    def tag(self) -> str:
        return f"w{self.d_model}L{self.n_layers}"

    @property
    def model(self) -> ModelConfig:
        return width_config(self.d_model, self.n_layers)

    def k_blocks(self, fmt: str | None) -> int | None:
        """Blocks per row the MXNorm estimate averages: D / 32 (MXFP8, FP8's estimate), D / 16 (NVFP4)."""
        if fmt is None:
            return None
        return self.d_model // (16 if fmt == "nvfp4" else 32)


def parse_widths(text: str) -> list[WidthSpec]:
    return [WidthSpec.parse(part) for part in text.split(",") if part]


def steps_for(model: ModelConfig, tokens_per_param: float = TOKENS_PER_PARAM, batch_size: int = BATCH_SIZE,
              seq_len: int = SEQ_LEN) -> int:
    """Training steps that give ``tokens_per_param`` tokens per parameter (rounded to a step)."""
    return max(1, round(tokens_per_param * parameter_count(model) / (batch_size * seq_len)))


@dataclass(frozen=True)
class ArmRule:
    """Runs of one arm: these seeds at these learning rates, at these widths (None: every width)."""

    tier: int
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    widths: tuple[int, ...] | None = None


BASE, P2, P2_CAL, P2_RECAL = "mxfp8-rmsnorm", "mxfp8-mxnorm-p2", "mxfp8-mxnorm-p2-cal", "mxfp8-mxnorm-p2-recal"
DEFAULT_RULES = (
    ArmRule(0, (BASE, P2, P2_CAL), (0,), (MAIN_LR,)),
    ArmRule(1, (BASE, P2, P2_CAL), (1, 2), (MAIN_LR,)),
    ArmRule(2, (BASE, P2), SEEDS, (HIGH_LR,)),
    ArmRule(2, (P2_CAL,), (0,), (HIGH_LR,)),
    ArmRule(3, (P2_RECAL,), (0,), (MAIN_LR,)),
    ArmRule(4, ("mxfp8-mxnorm-p1", "nvfp4-rmsnorm", "nvfp4-mxnorm-p2"), SEEDS, (MAIN_LR,), (256, 512)),
    ArmRule(5, ("bf16", "fp8-rmsnorm", "fp8-mxnorm", "fp8-rmsnorm-e4m3"), SEEDS, (MAIN_LR,), (512,)),
)


@dataclass(frozen=True)
class SweepRun:
    """One planned run."""

    width: WidthSpec
    arm: str
    seed: int
    lr: float
    tier: int

    @property
    def run_id(self) -> str:
        return f"{self.width.tag}-{self.arm}-s{self.seed}-lr{self.lr:g}"


def plan_sweep(widths: list[WidthSpec], rules: tuple[ArmRule, ...] = DEFAULT_RULES,
               arms: set[str] | None = None, seeds: set[int] | None = None, lrs: set[float] | None = None,
               order: str = "tier") -> list[SweepRun]:
    """Every run the rules ask for at ``widths`` (optionally only these arms / seeds / lrs), in run order.

    ``order="tier"``: tier by tier, each tier over the widths in the order given (the first
    slices give a whole seed-0 curve); ``"width"``: width by width, tiers within.
    A width that is not one of the sweep's own (say ``64:2``) gets every rule's arms.
    """
    runs, seen = [], set()
    default = {w.d_model for w in widths} - set(DEFAULT_WIDTHS)
    for rule in rules:
        for width in widths:
            if rule.widths is not None and width.d_model not in rule.widths and width.d_model not in default:
                continue
            for lr in rule.lrs:
                for seed in rule.seeds:
                    for arm in rule.arms:
                        run = SweepRun(width, arm, seed, lr, rule.tier)
                        keep = ((arms is None or arm in arms) and (seeds is None or seed in seeds)
                                and (lrs is None or lr in lrs) and run.run_id not in seen)
                        if keep:
                            seen.add(run.run_id)
                            runs.append(run)
    position = {w: i for i, w in enumerate(widths)}
    key = ((lambda r: (r.tier, position[r.width])) if order == "tier" else (lambda r: (position[r.width], r.tier)))
    return sorted(runs, key=key)  # stable: seeds and arms keep the rules' order


# ---------------------------------------------------------------------------
# existing records

def record_files(paths: list[str | Path]) -> list[Path]:
    """The ``*.jsonl`` files among ``paths`` (a directory stands for the files in it)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.exists():
            files.append(path)
    return files


def read_records(paths: list[str | Path]) -> list[dict]:
    """Every record in the jsonl files under ``paths``, in file order (bad lines are reported and skipped)."""
    records = []
    for file in record_files(paths):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    print(f"warning: {file}:{number} is not JSON ({exc}); skipped")
    return records


def finished(records: list[dict], retry_errors: bool = False) -> dict[str, dict]:
    """Run id -> the record that makes the run done (a final status; ``error`` too unless ``retry_errors``)."""
    final = FINAL_STATUSES if retry_errors else FINAL_STATUSES | {"error"}
    return {r["run_id"]: r for r in records if r.get("status") in final}


def check_same_design(run: SweepRun, steps: int, record: dict) -> None:
    """A record under the same run id must come from the same model and step count."""
    planned = record.get("steps_planned")
    if planned is not None and planned != steps:
        raise SystemExit(f"{run.run_id}: a record exists with {planned} steps, this plan has {steps}; "
                         "a changed design needs its own --records/--out directory")


# ---------------------------------------------------------------------------
# cost model

ARM_FORMATS = {"bf16": None, "fp8-rmsnorm": "fp8", "fp8-mxnorm": "fp8"}


def arm_format(arm: str) -> str | None:
    """The arm's number format (None for bf16), read off its name."""
    return ARM_FORMATS[arm] if arm in ARM_FORMATS else arm.split("-")[0]


@dataclass(frozen=True)
class CostModel:
    """Assumed H200 costs (nothing here was measured on these models; measured records replace them).

    A step takes ``flops / tflops + n_layers * layer_ms + fixed_ms``: the MX GEMMs are
    emulated on Hopper (dequantised in the GEMM's prologue), and at these sizes the
    casts and small kernels cost a fixed time per layer. The sweep compiles each
    decoder block (``--compile-scope blocks``): identical blocks share one graph,
    compiled cold (forward + backward) in ``compile_cold_s`` or taken from Inductor's
    cache in ``compile_cached_s``. A calibrated arm's per-site constants are
    compiled in, so its blocks differ: each further block (and each block again
    after a re-calibration) costs ``recompile_s`` (the generated kernels themselves
    are the same, so Triton's cache serves them).
    """

    tflops: dict = field(default_factory=lambda: {"mxfp8": 250.0, "nvfp4": 200.0, "fp8": 400.0, None: 450.0})
    layer_ms: dict = field(default_factory=lambda: {"mxfp8": 1.5, "nvfp4": 2.0, "fp8": 1.0, None: 0.4})
    fixed_ms: float = 4.0
    compile_cold_s: float = 25.0
    compile_cached_s: float = 3.0
    recompile_s: float = 5.0
    eval_step_fraction: float = 1 / 3  # an evaluation batch vs a training step
    stats_s: float = 0.5  # per estimator-statistics point
    startup_s: float = 40.0  # python, torch, CUDA and Triton start, corpus, per process

    def step_ms(self, model: ModelConfig, fmt: str | None, batch_size: int = BATCH_SIZE,
                seq_len: int = SEQ_LEN) -> float:
        flops = train_flops_per_token(model, seq_len) * batch_size * seq_len
        return 1000 * flops / (self.tflops[fmt] * 1e12) + model.n_layers * self.layer_ms[fmt] + self.fixed_ms

    def compile_s_for(self, model: ModelConfig, cached: bool, calibrated: bool, recalibrations: int = 0) -> float:
        """Seconds of compiling one run: its graph(s) at the start, and again after each re-calibration."""
        if cached:
            first = self.compile_cached_s * (model.n_layers if calibrated else 1)
        else:
            first = self.compile_cold_s + (self.recompile_s * (model.n_layers - 1) if calibrated else 0.0)
        return first + recalibrations * model.n_layers * self.recompile_s


@dataclass
class RunCost:
    """Estimated seconds of one run, and whether they were measured."""

    train_s: float
    compile_s: float
    other_s: float
    measured: bool

    @property
    def total_s(self) -> float:
        return self.train_s + self.compile_s + self.other_s


def is_calibrated(arm: str) -> bool:
    return arm.endswith(("-cal", "-recal"))


def graph_key(run: SweepRun) -> tuple:
    """Runs with equal keys compile the same graph (a calibrated arm's constants depend on the seed)."""
    return (run.width, run.arm, run.seed if is_calibrated(run.arm) else None)


@dataclass
class Estimator:
    """Run-time estimates: measured medians per (width, arm) where records have them, else the cost model."""

    cost: CostModel = field(default_factory=CostModel)
    measured: dict = field(default_factory=dict)  # (tag, arm) -> {"step_ms": .., "compile_s": .., "other_s": ..}
    eval_points: int = 8
    eval_batches: int = 8
    final_eval_batches: int = 32
    recalibrations: int = 2
    batch_size: int = BATCH_SIZE
    seq_len: int = SEQ_LEN

    @classmethod
    def from_records(cls, records: list[dict], **kwargs) -> "Estimator":
        by_key = defaultdict(list)
        for r in records:
            if r.get("status") == "ok" and "timing" in r and "tag" in r:
                by_key[(r["tag"], r["arm"])].append(r["timing"])
        measured = {}
        for key, timings in by_key.items():
            timings = [t for t in timings if t.get("step_ms") == t.get("step_ms")]  # not nan
            if not timings:
                continue
            step_ms = statistics.median(t["step_ms"] for t in timings)
            # compiling: the forward at the first evaluation, the backward in the first step
            compiled = [t["first_eval_incl_compile_s"] + max(0.0, t["first_step_s"] - t["step_ms"] / 1000)
                        for t in timings]
            other = [t["total_s"] - t["train_s"] - c for t, c in zip(timings, compiled)]
            measured[key] = {"step_ms": step_ms, "compile_s": max(compiled), "cached_s": min(compiled),
                             "other_s": statistics.median(other)}
        return cls(measured=measured, **kwargs)

    def run_cost(self, run: SweepRun, steps: int, cached: bool) -> RunCost:
        model, fmt = run.width.model, arm_format(run.arm)
        recal = self.recalibrations if run.arm.endswith("-recal") else 0
        got = self.measured.get((run.width.tag, run.arm))
        if got is not None:
            compile_s = got["cached_s"] if cached else got["compile_s"]
            return RunCost(steps * got["step_ms"] / 1000, compile_s, got["other_s"], True)
        step_ms = self.cost.step_ms(model, fmt, self.batch_size, self.seq_len)
        evals = self.eval_points * self.eval_batches + 2 * self.final_eval_batches
        other = evals * step_ms * self.cost.eval_step_fraction / 1000 + (self.eval_points + 2) * self.cost.stats_s
        compile_s = self.cost.compile_s_for(model, cached, is_calibrated(run.arm), recal)
        return RunCost(steps * step_ms / 1000, compile_s, other, False)


def assign_lanes(seconds: list[float], lanes: int) -> list[int]:
    """Lane of each run when ``lanes`` processes share the GPU: in order (priority first), each run
    goes to the lane with the least estimated work so far, so the first runs start at once."""
    load, lane_of = [0.0] * lanes, []
    for s in seconds:
        lane = min(range(lanes), key=load.__getitem__)
        lane_of.append(lane)
        load[lane] += s
    return lane_of


def lane_shares(runs: list[SweepRun], steps: dict[WidthSpec, int], estimator: Estimator,
                lanes: int) -> list[list[SweepRun]]:
    """``runs`` split among ``lanes`` processes by :func:`assign_lanes` on their estimates, each in order."""
    lane_of = assign_lanes([estimator.run_cost(run, steps[run.width], cached=False).total_s for run in runs], lanes)
    return [[run for run, owner in zip(runs, lane_of) if owner == lane] for lane in range(lanes)]


@dataclass(frozen=True)
class DeviceCall:
    """The runs one device call takes: one list per lane (process), each in its running order."""

    lanes: list[list[tuple[SweepRun, RunCost]]]
    startup_s: float

    @property
    def taken(self) -> list[tuple[SweepRun, RunCost]]:
        return [item for lane in self.lanes for item in lane]

    @property
    def seconds(self) -> float:
        """Wall time: the longest lane."""
        return max(self.startup_s + sum(cost.total_s for _, cost in lane) for lane in self.lanes)


def simulate_calls(runs: list[SweepRun], steps: dict[WidthSpec, int], estimator: Estimator,
                   deadline_s: float, lanes: int = 1) -> list[DeviceCall]:
    """Pack ``runs`` into device calls the way the runner does: ``lanes`` processes each take their
    share of what is left (:func:`lane_shares`); in a lane, in order, a run starts only if its
    estimate ends before ``deadline_s`` (a lane's first run always starts); each call has a cold
    compile cache. The estimates are used as they are: run times measured while lanes shared the
    GPU include the sharing, FLOP estimates do not."""
    pending, calls = list(runs), []
    while pending:
        taken_by_lane, left = [], set()
        for share in lane_shares(pending, steps, estimator, lanes):
            elapsed, compiled, taken = estimator.cost.startup_s, set(), []
            for run in share:
                cost = estimator.run_cost(run, steps[run.width], graph_key(run) in compiled)
                if taken and elapsed + cost.total_s > deadline_s:
                    left.add(run.run_id)
                    continue
                taken.append((run, cost))
                compiled.add(graph_key(run))
                elapsed += cost.total_s
            taken_by_lane.append(taken)
        calls.append(DeviceCall([lane for lane in taken_by_lane if lane], estimator.cost.startup_s))
        pending = [run for run in pending if run.run_id in left]
    return calls


# ---------------------------------------------------------------------------
# printing the plan

def width_rows(widths: list[WidthSpec], steps: dict[WidthSpec, int], cost: CostModel,
               batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> list[list]:
    rows = []
    for w in widths:
        model = w.model
        n = parameter_count(model)
        tokens = steps[w] * batch_size * seq_len
        rows.append([w.d_model, w.k_blocks("mxfp8"), w.k_blocks("nvfp4"), model.n_layers, 2 * model.n_layers,
                     f"{model.n_heads}/{model.n_kv_heads}", model.ffn_dim, f"{n / 1e6:.1f}M", steps[w],
                     f"{tokens / 1e6:.1f}M", f"{tokens / n:.3f}",
                     f"{train_flops_per_token(model, seq_len) * tokens / 1e15:.2f}",
                     f"{cost.step_ms(model, 'mxfp8', batch_size, seq_len):.0f}",
                     f"{steps[w] * cost.step_ms(model, 'mxfp8', batch_size, seq_len) / 1000:.0f}"])
    return rows


WIDTH_HEADERS = ["D", "K mxfp8", "K nvfp4", "layers", "sites", "heads/kv", "ffn", "params", "steps", "tokens",
                 "tokens/param", "PFLOP/run", "est ms/step mxfp8", "est train s mxfp8"]


def plan_text(runs: list[SweepRun], pending: list[SweepRun], widths: list[WidthSpec], steps: dict[WidthSpec, int],
              estimator: Estimator, deadline_s: float, command: str, lanes: int = 1) -> str:
    """The plan as text: sizes, runs per arm and width, estimated GPU time and device calls."""
    lines = ["Model sizes (same tokens per parameter; depth x width = 4096 unless given as D:L):", "",
             tabulate(width_rows(widths, steps, estimator.cost, estimator.batch_size, estimator.seq_len),
                      WIDTH_HEADERS, tablefmt="github"), ""]
    counts: dict[str, dict[WidthSpec, str]] = defaultdict(dict)
    done_ids = {r.run_id for r in runs} - {r.run_id for r in pending}
    for arm in dict.fromkeys(r.arm for r in runs):
        for w in widths:
            here = [r for r in runs if r.arm == arm and r.width == w]
            if here:
                counts[arm][w] = f"{sum(r.run_id in done_ids for r in here)}/{len(here)}"
    lines += ["Runs per arm and width (done/planned):", "",
              tabulate([[arm] + [by_w.get(w, "") for w in widths] for arm, by_w in counts.items()],
                       ["arm"] + [w.tag for w in widths], tablefmt="github"), ""]
    calls = simulate_calls(pending, steps, estimator, deadline_s, lanes)
    taken = [item for call in calls for item in call.taken]
    rows = []
    for i, call in enumerate(calls, 1):
        tags = sorted({run.width.tag for run, _ in call.taken}, key=lambda t: int(t[1:].split("L")[0]))
        rows.append([i, len(call.taken), f"{call.seconds / 60:.1f}", ", ".join(tags),
                     f"{call.taken[0][0].run_id} .. {call.taken[-1][0].run_id}"])
    sharing = f", {lanes} runs at a time on the GPU" if lanes > 1 else ""
    lines += [f"{len(runs)} runs planned, {len(runs) - len(pending)} done, {len(pending)} to run: about "
              f"{sum(call.seconds for call in calls) / 60:.0f} device minutes "
              f"({sum(cost.measured for _, cost in taken)} of {len(taken)} run times measured, "
              f"the rest estimated from FLOPs with the assumed speeds of CostModel) in {len(calls)} device "
              f"call(s) of at most {deadline_s / 60:.0f} minutes' planned work{sharing}:", "",
              tabulate(rows, ["call", "runs", "est min", "widths", "first .. last run"], tablefmt="github"), "",
              "Each call is the same command (finished runs are skipped); copy the returned runs-*.jsonl into "
              "benchmarks/train_quality_runs/ before the next call (a fresh machine has no out/tq_done/):", "",
              f"    {command}"]
    return "\n".join(lines)


def device_command(widths: str, deadline_s: float, lanes: int = 1) -> str:
    """The shell line of one device call (repo root; $OUT comes back). Finished runs are skipped: those
    committed in benchmarks/train_quality_runs/ and, on a machine still warm from an earlier call, those
    kept in out/tq_done/ (ignored by git, so it stays on the machine between calls)."""
    lanes_flag = f" --lanes {lanes}" if lanes > 1 else ""
    return ("export PYTHONPATH=$PWD TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor-cache; mkdir -p out/tq_done; "
            f"python3 benchmarks/train_quality.py --widths {widths} --deadline-s {deadline_s:g}{lanes_flag} "
            "--records benchmarks/train_quality_runs --records out/tq_done --out $OUT > $OUT/log.txt 2>&1; "
            "rc=$?; cp $OUT/*.jsonl out/tq_done/ 2>/dev/null; "
            "grep -E '^(-->|skip|sweep|unavailable)' $OUT/log.txt | tail -60; exit $rc")


def plan_steps(widths: list[WidthSpec], steps_override: int | None, tokens_per_param: float, batch_size: int,
               seq_len: int) -> dict[WidthSpec, int]:
    """Steps per width: ``steps_override`` for all, or the tokens-per-parameter rule."""
    return {w: steps_override or steps_for(w.model, tokens_per_param, batch_size, seq_len) for w in widths}
