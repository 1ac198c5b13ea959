"""Does MXNorm train as well as RMSNorm? Pre-train Llama-3-style models under each rewrite.

Reproduces, at small scale, the accuracy claim of the MXNorm paper
(../shared/MXNORM.md): with MXFP8 matmuls, MXNorm with p = 2 trains to within
noise of RMSNorm, and p = 1 is less stable. Decoders of the family in
train_quality_model.py are trained from scratch on the Python standard library's
source as bytes (train_quality_data.py). Every arm builds the same model from
the same seed, sees the same batches in the same order for the same number of
steps, and differs from the others only in the ``mxrewrite.RewriteConfig`` that
``mxrewrite.optimize`` applies (or in skipping optimize: bf16).

Two modes:

* **The width sweep** (issue 15; ``--widths``, ``--plan``): does the gap close as
  the hidden size, and with it the number K of block maxima MXNorm averages,
  grows? Sizes, arms, seeds and the cost estimate are in train_quality_sweep.py;
  ``--plan`` prints them without running anything. Each finished run is one line
  of a jsonl file in ``--out`` (default ``benchmarks/train_quality_runs/``); a run
  whose record already exists there or in ``--records`` is skipped, so the same
  command continues the sweep in the next call, session or width slice
  (``--widths 256,512``). ``train_quality_report.py benchmarks/train_quality_runs``
  rebuilds the report from every record.
* **One model** (``--preset small``, the 25M model of issue 5): the arms and
  learning-rate slice of the first study, as it was run (``--steps auto``).

Arms (``ARMS``): ``mxfp8-rmsnorm`` (the baseline: exact RMSNorm fused with the
MXFP8 cast), ``mxfp8-mxnorm-p2`` (Gaussian constant), ``mxfp8-mxnorm-p2-cal``
(``rescale="calibrated"``: one constant per site measured by ``optimize`` on
``--calib-batches`` training batches at initialisation), ``mxfp8-mxnorm-p2-recal``
(the same, and re-calibrated every ``--recalibrate-every`` steps by running
``optimize`` again on fresh batches with the current weights: the new model shares
the parameters and the optimizer state, and is compiled again), ``mxfp8-mxnorm-p1``,
``nvfp4-rmsnorm``, ``nvfp4-mxnorm-p2``, ``bf16`` (no rewrite), and issue 13's FP8
recipe ``fp8-rmsnorm`` / ``fp8-mxnorm``: ``optimize(model, x, format="fp8",
linears="all", norm=...)``, and ``fp8-rmsnorm-e4m3`` with e4m3 gradients
(``grad_cast="e4m3"``). An arm whose options the installed mxrewrite lacks
is recorded as ``unavailable`` with the reason (and retried by the next call);
the sweep goes on.

Every rewritten arm records, at initialisation, at every evaluation and at the
end, the estimator's r / RMS per site (from ``mxrewrite.verify``) and what the
Gaussian p = 2 estimate would read on each site's input (train_quality_stats.py),
and the rescale constants in use (at each re-calibration too).

Precision: parameters and AdamW state in float32, the forward under bf16
autocast on CUDA. The rewritten linears (wq, wk, wv, w1, w3; with
``linears="all"`` also wo, w2) run as MX (or FP8) GEMMs through mxrewrite's
default backend for the device (on Hopper the MX GEMMs are emulated in a Triton
kernel, on the exactly dequantised values); the head stays in bf16. On CUDA the
sweep compiles each decoder block (``torch.compile(fullgraph=True, dynamic=False)``
per block, regional compilation: a deep model compiles about as fast as one
block); ``--preset`` compiles the whole loss function as issue 5 did
(``--compile-scope``). On CPU everything runs in float32 eagerly (the CI smoke test).

The sweep on the H200: one device call (repo root, ``$OUT`` comes back) runs a
slice of at most ~8 minutes of runs (``--deadline-s 470``: no run starts whose
estimate ends later; one in progress is cut at 530 s, recorded ``truncated`` and
re-run later), and the same call continues the sweep until ``--plan`` shows
nothing left. ``--lanes 3`` runs three processes at once on the GPU, each its
share of the runs: the models are too small to keep a Hopper busy from one process
(12.7M parameters: 101 ms a step alone on the H200, 175 ms with three lanes on an H100),
so one call finished 12 runs with three lanes where it finished about 6 alone. The
records say so (``env.gpu_shared_by_lanes``): their times are those of a shared GPU.
After each call, and before the next, copy ``runs-*.jsonl`` from the returned files
into ``benchmarks/train_quality_runs/`` and commit it: ``out/tq_done/`` skips the runs of
earlier calls only while the same machine stays warm, and a call can land on a fresh
one (which on 2026-12-05 ran ten finished runs again; the report counts such repeats):

    export PYTHONPATH=$PWD TORCHINDUCTOR_CACHE_DIR=$PWD/out/inductor-cache; mkdir -p out/tq_done; \\
    python3 benchmarks/train_quality.py --widths 256,512,1024,2048 --deadline-s 470 --lanes 3 \\
        --records benchmarks/train_quality_runs --records out/tq_done --out $OUT > $OUT/log.txt 2>&1; \\
    rc=$?; cp $OUT/*.jsonl out/tq_done/ 2>/dev/null; \\
    grep -E '^(-->|skip|sweep|unavailable)' $OUT/log.txt | tail -60; exit $rc

(``timeout_s`` 600.) Estimated from FLOPs with assumed speeds, before any run was
measured: 95 runs (98 with the e4m3-gradient FP8 arm added since), about 105 GPU minutes, 14 such calls;
the first 7 finish tiers 0-1 (baseline, Gaussian and calibrated MXNorm p = 2 at lr 1e-3, three seeds,
every width), which answer the main question. ``--plan`` re-estimates from the
runs measured so far; ``--widths 2048`` (or any subset) splits the sweep by width.
Locally:

    python benchmarks/train_quality.py --plan                    # sizes, runs, estimated GPU time, calls
    python benchmarks/train_quality.py --widths 64:2 --steps 20 --device cpu --batch-size 4 --seq-len 64 \\
        --arms mxfp8-rmsnorm,mxfp8-mxnorm-p2 --out out/tq      # a toy run
    python benchmarks/train_quality.py --preset small --device cuda --steps auto --out out/tq   # issue 5's study
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_quality_sweep as sweep  # noqa: E402
from train_quality_data import Corpus, WindowSampler, build_corpus, fixed_batches  # noqa: E402
from train_quality_model import PRESETS, Decoder, ModelConfig, count_parameters  # noqa: E402
from train_quality_stats import estimator_stats, rescale_constants  # noqa: E402

# Settings shared by every rewritten arm (DESIGN.md's RewriteConfig); the arms override format/norm/p/...
COMMON_REWRITE = (("scale_mode", "rceil"), ("rescale", "gaussian"), ("include_head", False), ("grad_cast", "mx"))


@dataclass(frozen=True)
class Arm:
    """One configuration of the comparison: a RewriteConfig, or no rewrite at all (``rewrite=None``).

    ``calibrate``: pass training batches to optimize as ``calibration_data``;
    ``recalibrate``: run optimize's calibration again during training;
    ``requires``: options a current mxrewrite may lack (the arm is then ``unavailable``).
    """

    name: str
    label: str
    rewrite: tuple[tuple[str, object], ...] | None
    calibrate: bool = False
    recalibrate: bool = False
    requires: tuple[str, ...] = ()

    def rewrite_config(self) -> dict | None:
        return None if self.rewrite is None else dict(COMMON_REWRITE + self.rewrite)

    @property
    def fmt(self) -> str | None:
        config = self.rewrite_config()
        return None if config is None else config["format"]


MXFP8_P2 = (("format", "mxfp8"), ("norm", "mxnorm"), ("p", 2))
FP8_REQUIRES = ("format='fp8'", "linears='all'")
ARMS = {arm.name: arm for arm in (
    Arm("mxfp8-rmsnorm", "MXFP8, RMSNorm (baseline)", (("format", "mxfp8"), ("norm", "rmsnorm"))),
    Arm("mxfp8-mxnorm-p2", "MXFP8, MXNorm p=2", MXFP8_P2),
    Arm("mxfp8-mxnorm-p2-cal", "MXFP8, MXNorm p=2, calibrated", MXFP8_P2 + (("rescale", "calibrated"),),
        calibrate=True),
    Arm("mxfp8-mxnorm-p2-recal", "MXFP8, MXNorm p=2, re-calibrated", MXFP8_P2 + (("rescale", "calibrated"),),
        calibrate=True, recalibrate=True),
    Arm("mxfp8-mxnorm-p1", "MXFP8, MXNorm p=1", (("format", "mxfp8"), ("norm", "mxnorm"), ("p", 1))),
    Arm("nvfp4-rmsnorm", "NVFP4, RMSNorm", (("format", "nvfp4"), ("norm", "rmsnorm"))),
    Arm("nvfp4-mxnorm-p2", "NVFP4, MXNorm p=2", (("format", "nvfp4"), ("norm", "mxnorm"), ("p", 2))),
    Arm("bf16", "bf16, no rewrite", None),
    Arm("fp8-rmsnorm", "FP8 recipe (all linears), RMSNorm",
        (("format", "fp8"), ("norm", "rmsnorm"), ("linears", "all")), requires=FP8_REQUIRES),
    Arm("fp8-mxnorm", "FP8 recipe (all linears), MXNorm p=2",
        (("format", "fp8"), ("norm", "mxnorm"), ("p", 2), ("linears", "all")), requires=FP8_REQUIRES),
    Arm("fp8-rmsnorm-e4m3", "FP8 recipe (all linears), RMSNorm, e4m3 gradients",
        (("format", "fp8"), ("norm", "rmsnorm"), ("linears", "all"), ("grad_cast", "e4m3")),
        requires=FP8_REQUIRES + ("grad_cast='e4m3'",)),
)}
BASELINE = "mxfp8-rmsnorm"
PRESET_ARMS = ("mxfp8-rmsnorm", "mxfp8-mxnorm-p2", "mxfp8-mxnorm-p1", "nvfp4-rmsnorm", "nvfp4-mxnorm-p2", "bf16")


class ArmUnavailable(RuntimeError):
    """The installed mxrewrite lacks an option the arm needs (recorded as ``unavailable``, retried later)."""


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    lr: float
    tag: str = ""  # the width in a sweep ("w512L8"); "" for a --preset run (issue 5's run ids)

    @property
    def run_id(self) -> str:
        return f"{self.tag + '-' if self.tag else ''}{self.arm}-s{self.seed}-lr{self.lr:g}"


@dataclass(frozen=True)
class TrainSettings:
    """How every run of one model size trains (the model, the step budget, evaluation)."""

    model: ModelConfig
    steps: int
    batch_size: int
    seq_len: int
    device: str
    compile: bool
    main_lr: float
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    final_eval_batches: int = 32
    log_every: int = 10
    run_time_limit_s: float = math.inf
    calib_batches: int = 4  # training batches (own stream) for rescale="calibrated"
    recalibrate_every: int = 0  # steps between re-calibrations of a "recal" arm; 0: at 1/3 and 2/3
    stats_rows: int = 4  # held-out sequences the estimator statistics are measured on; 0: none
    compile_scope: str = "whole"  # "whole": the loss function; "blocks": each decoder block (regional)
    tag: str = ""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.startswith("cuda") else None

    @property
    def precision(self) -> str:
        return "fp32 weights, bf16 autocast" if self.autocast_dtype is not None else "fp32"

    @property
    def recalibration_steps(self) -> frozenset[int]:
        """Steps after which a "recal" arm is re-calibrated: every ``recalibrate_every`` steps before the
        last, or (0) at a third and two thirds of training."""
        if self.recalibrate_every:
            return frozenset(range(self.recalibrate_every, self.steps, self.recalibrate_every))
        return frozenset(s for s in (round(self.steps / 3), round(2 * self.steps / 3)) if 0 < s < self.steps)

    def describe(self) -> dict:
        return {**asdict(self), "precision": self.precision}


@dataclass
class Curves:
    train_loss: list[float] = field(default_factory=list)  # every step
    eval_steps: list[int] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)  # the first eval_batches held-out batches


def plan_runs(arms: list[str], seeds: list[int], lrs: list[float], seed_arms: list[str],
              lr_arms: list[str]) -> list[RunSpec]:
    """--preset mode: every arm at the first seed and main lr, then the extra seeds, then the lr slice."""
    runs = [RunSpec(arm, seeds[0], lrs[0]) for arm in arms]
    runs += [RunSpec(arm, seed, lrs[0]) for seed in seeds[1:] for arm in seed_arms if arm in arms]
    runs += [RunSpec(arm, seeds[0], lr) for lr in lrs[1:] for arm in lr_arms if arm in arms]
    return runs


def rewrite_model(model: nn.Module, example_inputs: tuple, arm: Arm, calibration_data: list | None = None,
                  quiet: bool = False) -> tuple[nn.Module, dict]:
    """The arm's model: ``mxrewrite.optimize(model)`` with its config, or ``model`` itself for bf16.

    Returns the module to train and a summary of the rewrite report. The rewrite
    must hit every block's two norms: an arm whose rewrite silently did less
    would compare nothing, so that raises. An arm with ``requires`` whose options
    this mxrewrite rejects (ConfigError, TypeError) raises :class:`ArmUnavailable`.
    """
    config = arm.rewrite_config()
    if config is None:
        return model, {"sites_rewritten": 0, "note": "no rewrite"}
    import mxrewrite
    from mxrewrite.errors import ConfigError

    try:
        optimized = mxrewrite.optimize(model, example_inputs, config=mxrewrite.RewriteConfig(**config),
                                       calibration_data=calibration_data, progress=False)
    except (ConfigError, TypeError) as exc:
        if not arm.requires:
            raise
        raise ArmUnavailable(f"{arm.name}: this mxrewrite does not take {', '.join(arm.requires)} yet "
                             f"({type(exc).__name__}: {exc}); the arm runs once the option lands") from exc
    report = mxrewrite.get_report(optimized)
    text = str(report)
    if not quiet:
        print(f"--- rewrite report ({arm.name}) ---\n{text}", flush=True)
    rewritten = [site for site in report.sites if site.status == "rewritten"]
    expected = 2 * model.cfg.n_layers
    if len(rewritten) != expected:
        raise RuntimeError(f"{arm.name}: optimize rewrote {len(rewritten)} sites, expected {expected} "
                           f"(attention_norm and ffn_norm of every block):\n{text}")
    summary = {"sites_rewritten": len(rewritten),  # (the report's text is in the log, not in the record)
               "sites_skipped": [(site.norm, site.reason) for site in report.sites if site.status != "rewritten"],
               "linears": [(row.name, row.status) for row in report.linears]}
    return optimized, summary


def lr_factor(step: int, steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_frac`` at the last step."""
    warmup = max(1, round(warmup_frac * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_shared_parameters(model: nn.Module, trained: nn.Module) -> None:
    """``trained`` must train ``model``'s own tensors (the promise optimize makes)."""
    if {id(p) for p in trained.parameters()} != {id(p) for p in model.parameters()}:
        raise RuntimeError("the optimized module does not train the original parameter tensors")


def build_optimizer(model: nn.Module, trained: nn.Module, lr: float, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over ``trained``'s parameters, which must be ``model``'s own tensors."""
    check_shared_parameters(model, trained)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "tok_embeddings" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "tok_embeddings" not in name)]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=settings.betas, fused=settings.device.startswith("cuda"))


def make_loss_fn(net: nn.Module, settings: TrainSettings):
    """The training loss of ``net``, compiled as ``settings`` says.

    ``compile_scope="whole"`` compiles the loss function (fullgraph); ``"blocks"``
    compiles each decoder block in place (``nn.Module.compile``, the regional
    compilation torchtitan uses): identical blocks share one compiled graph, so a
    deep model compiles about as fast as one block, while the embedding, the final
    norm, the head and the loss run eagerly.
    """
    dtype = settings.autocast_dtype
    device_type = torch.device(settings.device).type

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    if settings.compile and settings.compile_scope == "blocks":
        for layer in net.layers:
            layer.compile(fullgraph=True, dynamic=False)
    elif settings.compile:
        return torch.compile(loss_fn, fullgraph=True, dynamic=False)
    return loss_fn


def evaluate(loss_fn, batches, compiled: bool) -> list[float]:
    """Loss of each fixed batch. A compiled loss runs with grad enabled (the training graph, no recompile)."""
    with torch.set_grad_enabled(compiled):
        losses = [loss_fn(x, y).detach() for x, y in batches]
    return torch.stack(losses).float().cpu().tolist()


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calibration_batches(sampler: WindowSampler, n: int) -> list[tuple[torch.Tensor]]:
    """``n`` training batches as optimize's ``calibration_data`` (inputs only)."""
    return [(sampler.next_batch()[0],) for _ in range(n)]


@dataclass
class Calibration:
    """The rescale constants a run used: at initialisation and after each re-calibration."""

    batches: int = 0
    constants: list[dict] = field(default_factory=list)  # {"step", "sites": {norm: constant}, "seconds"}


class RunState:
    """The trained network of one run and how it is rebuilt when re-calibrated (shared parameters)."""

    def __init__(self, model: nn.Module, arm: Arm, settings: TrainSettings, example: tuple,
                 calib_sampler: WindowSampler):
        self.model, self.arm, self.settings, self.example = model, arm, settings, example
        self.calib_sampler = calib_sampler
        self.calibration = Calibration(batches=settings.calib_batches if arm.calibrate else 0)
        self.net, self.report = self.rewrite(step=0, quiet=False)
        self.loss_fn = make_loss_fn(self.net, settings)

    def rewrite(self, step: int, quiet: bool) -> tuple[nn.Module, dict]:
        """optimize() the model (calibrating on fresh batches for a calibrated arm); records the constants.

        As in issue 5, optimize runs outside autocast: its capture and its calibration
        forward (the original model, the exact norms, the current weights) in float32."""
        t0 = time.perf_counter()
        data = calibration_batches(self.calib_sampler, self.settings.calib_batches) if self.arm.calibrate else None
        net, report = rewrite_model(self.model, self.example, self.arm, data, quiet=quiet)
        constants = rescale_constants(net)
        if constants:
            self.calibration.constants.append({"step": step, "sites": constants,
                                               "seconds": time.perf_counter() - t0})
        return net, report

    def recalibrate(self, step: int, optimizer: torch.optim.Optimizer, warm_batch: tuple) -> float:
        """Re-run optimize's calibration with the current weights; compile the new graph (fwd + bwd)
        on ``warm_batch`` without an optimizer step. Returns the seconds it took."""
        t0 = time.perf_counter()
        net, _ = self.rewrite(step, quiet=True)
        check_shared_parameters(self.model, net)
        self.net, self.loss_fn = net, make_loss_fn(net, self.settings)
        self.loss_fn(*warm_batch).backward()
        optimizer.zero_grad(set_to_none=True)
        synchronize(self.settings.device)
        return time.perf_counter() - t0


def rounded(value, digits: int = 6):
    """``value`` with every float rounded to ``digits`` decimals (keeps the records small)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def k_blocks(cfg: ModelConfig, fmt: str | None) -> int | None:
    """Blocks per row MXNorm averages for ``fmt`` (None without a rewrite)."""
    return None if fmt is None else cfg.dim // (16 if fmt == "nvfp4" else 32)


def train_run(spec: RunSpec, settings: TrainSettings, corpus: Corpus, tokens: dict[str, torch.Tensor]) -> dict:
    """Train one run from scratch; returns its result record (never raises for a diverging run)."""
    arm, cfg = ARMS[spec.arm], settings.model
    device = settings.device
    if settings.compile:
        torch._dynamo.reset()
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = Decoder(replace(cfg, max_seq_len=max(cfg.max_seq_len, settings.seq_len))).to(device)
    sampler = WindowSampler(tokens["train"], settings.batch_size, settings.seq_len, seed=10_000 + spec.seed)
    calib_sampler = WindowSampler(tokens["train"], settings.batch_size, settings.seq_len, seed=20_000 + spec.seed)
    train_eval = fixed_batches(tokens["train"], settings.final_eval_batches, settings.batch_size, settings.seq_len)
    heldout_eval = fixed_batches(tokens["heldout"], settings.final_eval_batches, settings.batch_size,
                                 settings.seq_len)
    example = (heldout_eval[0][0],)
    stats_inputs = heldout_eval[0][0][:settings.stats_rows]

    state = RunState(model, arm, settings, example, calib_sampler)
    rewrite_s = time.perf_counter() - t_start
    optimizer = build_optimizer(model, state.net, spec.lr, settings)
    estimator: list[dict] = []
    stats_s = 0.0

    def measure(step: int) -> None:
        nonlocal stats_s
        if settings.stats_rows:
            t = time.perf_counter()
            estimator.append(estimator_stats(step, model, state.net, stats_inputs, device, settings.autocast_dtype))
            stats_s += time.perf_counter() - t

    t0 = time.perf_counter()
    initial_heldout = mean(evaluate(state.loss_fn, heldout_eval[:settings.eval_batches], settings.compile))
    initial_train = mean(evaluate(state.loss_fn, train_eval[:settings.eval_batches], settings.compile))
    synchronize(device)
    first_compile_s = time.perf_counter() - t0
    measure(0)

    curves = Curves(eval_steps=[0], heldout_loss=[initial_heldout])
    pending: list[torch.Tensor] = []
    status, steps_done, t_steady, steady_steps, first_step_s = "ok", 0, None, 0, math.nan
    recalibration_s = 0.0
    t_train = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(step, settings.steps, settings.warmup_frac, settings.min_lr_frac)
        inputs, targets = sampler.next_batch()
        loss = state.loss_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        steps_done = step + 1
        if steps_done == 1:
            synchronize(device)
            first_step_s = time.perf_counter() - t_train  # includes compiling the backward
        last = steps_done == settings.steps
        if steps_done % settings.log_every == 0 or last:
            values = torch.stack(pending).float().cpu().tolist()  # synchronizes
            pending.clear()
            curves.train_loss += values
            now = time.perf_counter()
            if t_steady is None and steps_done >= min(2 * settings.log_every, settings.steps):
                t_steady, steady_steps = now, steps_done
            if not all(math.isfinite(v) for v in values):
                status = "diverged"
                break
            if now - t_train > settings.run_time_limit_s and not last:
                status = "truncated"
                break
        paused = 0.0  # evaluation, statistics and re-calibration are not training time
        if steps_done % settings.eval_every == 0 and not last:
            t_eval = time.perf_counter()
            curves.eval_steps.append(steps_done)
            curves.heldout_loss.append(mean(evaluate(state.loss_fn, heldout_eval[:settings.eval_batches],
                                                     settings.compile)))
            measure(steps_done)
            paused += time.perf_counter() - t_eval
        if arm.recalibrate and steps_done in settings.recalibration_steps:
            seconds = state.recalibrate(steps_done, optimizer, heldout_eval[0])
            recalibration_s += seconds
            paused += seconds
        t_train += paused
        if t_steady is not None:
            t_steady += paused
    synchronize(device)
    t_end_train = time.perf_counter()
    steady_s = t_end_train - t_steady if t_steady is not None else float("nan")
    step_ms = 1000 * steady_s / (steps_done - steady_steps) if steps_done > steady_steps else float("nan")

    final_train = mean(evaluate(state.loss_fn, train_eval, settings.compile))
    heldout_losses = evaluate(state.loss_fn, heldout_eval, settings.compile)
    final_heldout = mean(heldout_losses)
    curves.eval_steps.append(steps_done)
    curves.heldout_loss.append(mean(heldout_losses[:settings.eval_batches]))  # same batches as the curve
    measure(steps_done)
    if not (math.isfinite(final_train) and math.isfinite(final_heldout)) and status == "ok":
        status = "diverged"
    tail = curves.train_loss[-max(1, steps_done // 10):]
    tokens_per_step = settings.batch_size * settings.seq_len
    n_params = count_parameters(model)
    return {
        "run_id": spec.run_id, "tag": spec.tag, "arm": spec.arm, "label": arm.label, "seed": spec.seed,
        "lr": spec.lr, "width": cfg.dim, "n_layers": cfg.n_layers, "format": arm.fmt, "k": k_blocks(cfg, arm.fmt),
        "k_blocks": {"mxfp8": cfg.dim // 32, "nvfp4": cfg.dim // 16},
        "rewrite_config": arm.rewrite_config(), "status": status,
        "steps_planned": settings.steps, "steps_done": steps_done, "tokens_seen": steps_done * tokens_per_step,
        "tokens_per_param": settings.steps * tokens_per_step / n_params,
        "initial": {"train_loss": initial_train, "heldout_loss": initial_heldout},
        "final": {"train_loss": final_train, "heldout_loss": final_heldout,
                  "train_loss_last_10pct_steps": sum(tail) / len(tail)},
        "curves": rounded(asdict(curves)),
        "calibration": asdict(state.calibration),
        "estimator": rounded(estimator),
        "timing": {"rewrite_s": rewrite_s, "first_eval_incl_compile_s": first_compile_s,
                   "first_step_s": first_step_s,
                   "train_s": t_end_train - t_train, "step_ms": step_ms,
                   "tokens_per_s": 1000 * tokens_per_step / step_ms if step_ms == step_ms else float("nan"),
                   "recalibration_s": recalibration_s, "stats_s": stats_s,
                   "total_s": time.perf_counter() - t_start},
        "report": state.report, "n_params": n_params,
        "model": asdict(model.cfg), "settings": settings.describe(),
    }


def source_digest() -> str:
    """SHA-256 (12 hex digits) of mxrewrite's and this benchmark's sources: which code ran, without git."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = sorted((root / "mxrewrite").rglob("*.py")) + sorted(Path(__file__).parent.glob("train_quality*.py"))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import mxrewrite
        from mxrewrite.ops.matmul import default_backend

        env["mxrewrite"] = getattr(mxrewrite, "__version__", "?")
        env["matmul_backend"] = default_backend(torch.device(device))
    except Exception as exc:  # noqa: BLE001 - the environment record must not stop a run
        env["mxrewrite_error"] = f"{type(exc).__name__}: {exc}"
    env["MXREWRITE_MATMUL"] = os.environ.get("MXREWRITE_MATMUL")  # MX GEMM backend override, if any
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or "cpu"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    env["source_digest"] = source_digest()
    return env


def probe_step_ms(arms: list[str], settings: TrainSettings, corpus: Corpus, tokens: dict, lr: float,
                  probe_steps: int) -> dict[str, float]:
    """--steps auto: steady-state ms per step of each arm over a short run (which also warms the compile caches)."""
    probe = replace(settings, steps=probe_steps, log_every=max(1, probe_steps // 3), eval_every=10**9,
                    eval_batches=1, final_eval_batches=1, stats_rows=0)
    result = {}
    for name in arms:
        try:
            record = train_run(RunSpec(name, 0, lr), probe, corpus, tokens)
        except Exception:  # the arm's own run will fail again and record why
            traceback.print_exc()
            continue
        result[name] = record["timing"]["step_ms"]
        print(f"probe {name}: {result[name]:.1f} ms/step, status {record['status']}, "
              f"{record['timing']['total_s']:.1f} s in all", flush=True)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep_group = parser.add_argument_group("width sweep (issue 15)")
    sweep_group.add_argument("--widths", default=None,
                             help="comma list of hidden sizes D or D:layers (default depth 4096 / D); "
                                  f"the sweep's are {','.join(map(str, sweep.DEFAULT_WIDTHS))}")
    sweep_group.add_argument("--plan", action="store_true", help="print the sweep's plan and estimates, run nothing")
    sweep_group.add_argument("--order", choices=("tier", "width"), default="tier")
    sweep_group.add_argument("--records", action="append", default=None,
                             help=f"records of finished runs to skip (default {sweep.RECORDS_DIR})")
    sweep_group.add_argument("--retry-errors", action="store_true", help="re-run runs recorded as 'error'")
    sweep_group.add_argument("--tokens-per-param", type=float, default=sweep.TOKENS_PER_PARAM)
    sweep_group.add_argument("--eval-points", type=int, default=8, help="held-out evaluations during a run")
    sweep_group.add_argument("--calib-batches", type=int, default=4)
    sweep_group.add_argument("--recalibrate-every", type=int, default=0,
                             help="steps between re-calibrations of the recal arm; 0: at 1/3 and 2/3 of training")
    sweep_group.add_argument("--stats-rows", type=int, default=4, help="held-out sequences for r / RMS; 0: off")
    sweep_group.add_argument("--compile-scope", choices=("blocks", "whole"), default=None,
                             help="torch.compile each decoder block (sweep default) or the whole loss "
                                  "(--preset default)")
    sweep_group.add_argument("--hard-deadline-s", type=float, default=None,
                             help="cut a run's training this long after launch (default --deadline-s + 60)")
    sweep_group.add_argument("--lanes", type=int, default=1,
                             help="run this many processes at once on the GPU, each its share of the runs "
                                  "(one process of the sweep's small models leaves a Hopper mostly idle)")
    # set for the lanes' processes: "i/n", and the call's time stamp (one for all its record files)
    sweep_group.add_argument("--lane", default=None, help=argparse.SUPPRESS)
    sweep_group.add_argument("--stamp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arms", default=None, help="comma list of arms (default: the mode's own)")
    parser.add_argument("--seeds", default=None, help="sweep: only these seeds; --preset: first runs every arm")
    parser.add_argument("--seed-arms", default=f"{BASELINE},mxfp8-mxnorm-p2")
    parser.add_argument("--lrs", default=None, help="sweep: only these; --preset: first is the main lr "
                                                     "(default 2e-3,1e-3,4e-3), the others --lr-arms")
    parser.add_argument("--lr-arms", default=f"{BASELINE},mxfp8-mxnorm-p2")
    parser.add_argument("--runs", default=None, help="comma list of run ids: run only these of the plan")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="one-model mode (issue 5)")
    parser.add_argument("--steps", default=None,
                        help="steps per run (sweep default: tokens per parameter; --preset default 1000), "
                             "or 'auto' with --preset (see --target-train-s)")
    parser.add_argument("--target-train-s", type=float, default=40.0, help="with --steps auto")
    parser.add_argument("--probe-arms", default=f"{BASELINE},nvfp4-mxnorm-p2", help="with --steps auto")
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=sweep.BATCH_SIZE)
    parser.add_argument("--seq-len", type=int, default=sweep.SEQ_LEN)
    parser.add_argument("--eval-every", type=int, default=100, help="--preset mode (the sweep: --eval-points)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--final-eval-batches", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the loss (default: on for CUDA, off for CPU)")
    parser.add_argument("--run-time-limit-s", type=float, default=math.inf, help="cut one run's training short")
    parser.add_argument("--deadline-s", type=float, default=math.inf,
                        help="after the first run, start none whose estimate would end later than this many "
                             "seconds after launch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None,
                        help=f"directory for the jsonl (sweep default {sweep.RECORDS_DIR}; --preset: "
                             "out/train_quality, runs.jsonl)")
    parser.add_argument("--md", default=None, help="also write the markdown results here")
    parser.add_argument("--plot", default=None, help="--preset: also write the loss-curve PNG here (matplotlib)")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return names


def _command(argv: list[str] | None) -> str:
    return "python benchmarks/train_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])


def setup_device(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # exact for dequantised MX operands
        torch.backends.cudnn.allow_tf32 = True
        # headroom for recompiles: each re-calibration rebuilds the rewritten modules (their constants are
        # buffers, so the blocks of one rewrite share a compiled graph)
        torch._dynamo.config.cache_size_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 4096


@dataclass
class Job:
    """A run to start: what, how, and how long it is expected to take (None: unknown)."""

    spec: RunSpec
    settings: TrainSettings
    estimate: "sweep.RunCost | None" = None


def failure_record(job: Job, status: str, message: str) -> dict:
    spec, settings = job.spec, job.settings
    arm = ARMS[spec.arm]
    return {"run_id": spec.run_id, "tag": spec.tag, "arm": spec.arm, "label": arm.label, "seed": spec.seed,
            "lr": spec.lr, "width": settings.model.dim, "n_layers": settings.model.n_layers, "format": arm.fmt,
            "k": k_blocks(settings.model, arm.fmt), "status": status, "error": message,
            "steps_planned": settings.steps, "settings": settings.describe()}


def execute(jobs: list[Job], corpus: Corpus, tokens: dict, env: dict, out_file: Path, command: str,
            t_launch: float, deadline_s: float, hard_deadline_s: float, probe: dict | None = None) -> list[dict]:
    """Run ``jobs`` in order, appending each record to ``out_file`` as soon as it ends.

    After the first run, a job starts only if its estimate ends before
    ``deadline_s``: the job's own estimate, scaled by how much longer (or shorter, down
    to half) than estimated the runs so far took (or, without one, the longest run so far). Its
    training is cut (status ``truncated``) where it would pass ``hard_deadline_s``.
    A failing run is recorded (``error``, or ``unavailable`` for a missing mxrewrite
    option) and the next one starts.
    """
    results, durations = [], []
    estimated, actual = 0.0, 0.0  # of the finished runs that had an estimate
    out_file.parent.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        spec, settings = job.spec, job.settings
        elapsed = time.perf_counter() - t_launch
        slowdown = min(4.0, max(0.5, actual / estimated)) if estimated else 1.0
        estimate = job.estimate.total_s * slowdown if job.estimate else max(durations, default=0.0)
        if durations and elapsed + estimate > deadline_s:  # the first run always starts
            print(f"skip {spec.run_id}: {elapsed:.0f} s elapsed + ~{estimate:.0f} s would pass the deadline",
                  flush=True)
            continue
        if math.isfinite(hard_deadline_s):
            overhead = (job.estimate.compile_s + job.estimate.other_s) * slowdown if job.estimate else 0.0
            settings = replace(settings, run_time_limit_s=min(settings.run_time_limit_s,
                                                              hard_deadline_s - elapsed - overhead))
        print(f"=== {spec.run_id} ({settings.steps} steps, est {estimate:.0f} s)", flush=True)
        try:
            record = train_run(spec, settings, corpus, tokens)
        except ArmUnavailable as exc:
            print(f"unavailable: {exc}", flush=True)
            record = failure_record(job, "unavailable", str(exc))
        except Exception as exc:  # one broken arm must not lose the others' results
            traceback.print_exc()
            record = failure_record(job, "error", f"{type(exc).__name__}: {exc}")
        record.update(env=env, corpus=corpus.describe(), probe_step_ms=probe, command=command)
        durations.append(record.get("timing", {}).get("total_s", 0.0))
        if job.estimate and "timing" in record:
            estimated, actual = estimated + job.estimate.total_s, actual + durations[-1]
        with open(out_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        results.append(record)
        final = record.get("final", {})
        print(f"--> {spec.run_id}: {record['status']} train {final.get('train_loss', float('nan')):.4f} "
              f"heldout {final.get('heldout_loss', float('nan')):.4f} "
              f"({record.get('timing', {}).get('step_ms', float('nan')):.1f} ms/step, "
              f"{durations[-1]:.0f} s)", flush=True)
    return results


def load_corpus(device: str) -> tuple[Corpus, dict]:
    corpus = build_corpus()
    return corpus, {"train": corpus.train.to(device), "heldout": corpus.heldout.to(device)}


# ---------------------------------------------------------------------------
# the width sweep

def sweep_settings(args: argparse.Namespace, widths: list[sweep.WidthSpec]) -> dict[sweep.WidthSpec, TrainSettings]:
    """Per width: the model, its step count and evaluation cadence."""
    steps_override = int(args.steps) if args.steps else None
    steps = sweep.plan_steps(widths, steps_override, args.tokens_per_param, args.batch_size, args.seq_len)
    compile_ = args.compile if args.compile is not None else args.device.startswith("cuda")
    return {w: TrainSettings(model=w.model, steps=steps[w], batch_size=args.batch_size, seq_len=args.seq_len,
                             device=args.device, compile=compile_, main_lr=sweep.MAIN_LR,
                             eval_every=max(1, steps[w] // max(1, args.eval_points)),
                             eval_batches=args.eval_batches, final_eval_batches=args.final_eval_batches,
                             log_every=min(args.log_every, steps[w]), run_time_limit_s=args.run_time_limit_s,
                             calib_batches=args.calib_batches, recalibrate_every=args.recalibrate_every,
                             stats_rows=args.stats_rows, compile_scope=args.compile_scope or "blocks", tag=w.tag)
            for w in widths}


def sweep_plan(args: argparse.Namespace) -> tuple[list[sweep.SweepRun], list[sweep.SweepRun], dict, list[dict]]:
    """(every planned run, those still to run, settings per width, existing records)."""
    widths = sweep.parse_widths(args.widths or ",".join(map(str, sweep.DEFAULT_WIDTHS)))
    arms = set(_names(args.arms)) if args.arms else None
    seeds = {int(v) for v in args.seeds.split(",")} if args.seeds else None
    lrs = {float(v) for v in args.lrs.split(",")} if args.lrs else None
    runs = sweep.plan_sweep(widths, arms=arms, seeds=seeds, lrs=lrs, order=args.order)
    if args.runs:
        wanted = set(args.runs.split(","))
        runs = [run for run in runs if run.run_id in wanted]
    settings = sweep_settings(args, widths)
    records = sweep.read_records(args.records + [args.out])
    done = sweep.finished(records, retry_errors=args.retry_errors)
    for run in runs:
        if run.run_id in done:
            sweep.check_same_design(run, settings[run.width].steps, done[run.run_id])
    pending = [run for run in runs if run.run_id not in done]
    return runs, pending, settings, records


def estimator_for(args: argparse.Namespace, records: list[dict], settings: dict) -> sweep.Estimator:
    """Run-time estimates for this plan (measured where the records have the width and arm)."""
    recalibrations = max((len(s.recalibration_steps) for s in settings.values()), default=2)
    return sweep.Estimator.from_records(records, eval_points=args.eval_points, eval_batches=args.eval_batches,
                                        final_eval_batches=args.final_eval_batches, recalibrations=recalibrations,
                                        batch_size=args.batch_size, seq_len=args.seq_len)


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run_sweep(args: argparse.Namespace, argv: list[str] | None, t_launch: float) -> list[dict]:
    args.records = args.records or [str(sweep.RECORDS_DIR)]
    args.out = args.out or str(sweep.RECORDS_DIR)
    runs, pending, settings, records = sweep_plan(args)
    estimator = estimator_for(args, records, settings)
    steps = {w: s.steps for w, s in settings.items()}
    deadline = args.deadline_s if math.isfinite(args.deadline_s) else 470.0
    if args.plan:
        command = sweep.device_command(args.widths or ",".join(map(str, sweep.DEFAULT_WIDTHS)), deadline, args.lanes)
        print(sweep.plan_text(runs, pending, list(settings), steps, estimator, deadline, command, args.lanes))
        return []
    if args.lanes > 1 and args.lane is None:
        shares = sweep.lane_shares(pending, steps, estimator, args.lanes)
        return run_lanes(args, argv, [[run.run_id for run in share] for share in shares])
    setup_device(args)
    corpus, tokens = load_corpus(args.device)
    env = environment(args.device)
    env["gpu_shared_by_lanes"] = int(args.lane.split("/")[1]) if args.lane else 1
    print(f"corpus {corpus.describe()}\nenv {env}", flush=True)
    print(f"sweep: {len(runs)} runs planned, {len(runs) - len(pending)} already recorded, {len(pending)} to run",
          flush=True)
    compiled: set = set()
    jobs = []
    for run in pending:
        cached = sweep.graph_key(run) in compiled
        compiled.add(sweep.graph_key(run))
        cost = estimator.run_cost(run, steps[run.width], cached)
        jobs.append(Job(RunSpec(run.arm, run.seed, run.lr, run.width.tag), settings[run.width], cost))
    stamp = args.stamp or utc_stamp()
    lane_suffix = f"-lane{args.lane.replace('/', 'of')}" if args.lane else ""
    out_file = Path(args.out) / f"runs-{stamp}{lane_suffix}.jsonl"
    hard = args.hard_deadline_s if args.hard_deadline_s is not None else args.deadline_s + 60
    results = execute(jobs, corpus, tokens, env, out_file, _command(argv), t_launch, args.deadline_s, hard)
    left = [run for run in pending if run.run_id not in {r["run_id"] for r in results
                                                            if r["status"] in sweep.FINAL_STATUSES | {"error"}}]
    print(f"sweep: {len(results)} runs recorded in {out_file}; {len(left)} of {len(runs)} planned runs left",
          flush=True)
    if args.md:
        from train_quality_report import write_sweep_report

        write_sweep_report(sweep.read_records(args.records + [args.out]), md_path=args.md)
    return results


SUMMARY_PREFIXES = ("-->", "skip", "sweep", "unavailable")


def run_lanes(args: argparse.Namespace, argv: list[str] | None, lanes: list[list[str]]) -> list[dict]:
    """Run each lane's runs in a process of its own, all at once; their logs are ``lane-<i>.log`` in
    ``--out`` and their summary lines are printed here when they end. Returns the lanes' records."""
    child_argv = []
    skip_value = False
    for arg in (sys.argv[1:] if argv is None else argv):
        if skip_value:
            skip_value = False
        elif arg in ("--lanes", "--runs"):
            skip_value = True
        elif not arg.startswith(("--lanes=", "--runs=")):
            child_argv.append(arg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = set(sweep.record_files([out]))
    procs, stamp = [], utc_stamp()
    for i, run_ids in enumerate(lanes):
        if not run_ids:
            continue
        log = open(out / f"lane-{i}.log", "w")
        command = [sys.executable, __file__, *child_argv, "--runs", ",".join(run_ids), "--lane", f"{i}/{len(lanes)}",
                   "--stamp", stamp]
        procs.append((i, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        print(f"sweep: lane {i}: {len(run_ids)} runs, log {log.name}", flush=True)
    failed = []
    for i, log, proc in procs:
        if proc.wait() != 0:
            failed.append(i)
        log.close()
        for line in Path(log.name).read_text().splitlines():
            if line.startswith(SUMMARY_PREFIXES):
                print(line, flush=True)
    if failed:
        raise SystemExit(f"lane(s) {failed} failed: see their logs in {out}")
    return sweep.read_records(sorted(set(sweep.record_files([out])) - before))


# ---------------------------------------------------------------------------
# one model (--preset), as issue 5 ran it

def run_preset(args: argparse.Namespace, argv: list[str] | None, t_launch: float) -> list[dict]:
    arms = _names(args.arms or ",".join(PRESET_ARMS))
    lrs = [float(v) for v in (args.lrs or "2e-3,1e-3,4e-3").split(",")]
    seeds = [int(v) for v in (args.seeds or "0,1").split(",")]
    plan = plan_runs(arms, seeds, lrs, _names(args.seed_arms), _names(args.lr_arms))
    if args.runs:
        wanted = set(args.runs.split(","))
        plan = [spec for spec in plan if spec.run_id in wanted]
    setup_device(args)
    compile_ = args.compile if args.compile is not None else args.device.startswith("cuda")
    settings = TrainSettings(model=PRESETS[args.preset], steps=1, batch_size=args.batch_size, seq_len=args.seq_len,
                             device=args.device, compile=compile_, main_lr=lrs[0], eval_every=args.eval_every,
                             eval_batches=args.eval_batches, final_eval_batches=args.final_eval_batches,
                             log_every=args.log_every, run_time_limit_s=args.run_time_limit_s,
                             calib_batches=args.calib_batches, recalibrate_every=args.recalibrate_every,
                             stats_rows=args.stats_rows, compile_scope=args.compile_scope or "whole")
    corpus, tokens = load_corpus(args.device)
    env = environment(args.device)
    print(f"corpus {corpus.describe()}\nenv {env}\nplan {[spec.run_id for spec in plan]}", flush=True)

    probe = None
    if args.steps == "auto":
        probe_arms = [name for name in _names(args.probe_arms) if name in {spec.arm for spec in plan}]
        probe = probe_step_ms(probe_arms, settings, corpus, tokens, lrs[0], args.probe_steps)
        slowest = max((v for v in probe.values() if math.isfinite(v)), default=math.nan)
        if not math.isfinite(slowest):
            raise SystemExit("--steps auto: every probe run failed (tracebacks above); nothing to calibrate on")
        steps = max(args.log_every, int(args.target_train_s * 1000 / slowest) // 50 * 50)
        print(f"--steps auto: slowest {slowest:.1f} ms/step -> {steps} steps", flush=True)
    else:
        steps = int(args.steps or 1000)
    settings = replace(settings, steps=steps)
    out = Path(args.out or "out/train_quality")
    jobs = [Job(spec, settings) for spec in plan]
    hard = args.hard_deadline_s if args.hard_deadline_s is not None else math.inf
    results = execute(jobs, corpus, tokens, env, out / "runs.jsonl", _command(argv), t_launch, args.deadline_s,
                      hard, probe)
    if args.md or args.plot:
        from train_quality_report import write_outputs

        write_outputs(results, md_path=args.md, plot_path=args.plot)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    t_launch = time.perf_counter()
    args = parse_args(argv)
    if args.preset and (args.widths or args.plan):
        raise SystemExit("--preset is the one-model mode; --widths/--plan the sweep: choose one")
    if args.preset:
        return run_preset(args, argv, t_launch)
    if args.steps == "auto":
        raise SystemExit("--steps auto is for --preset; the sweep's steps follow --tokens-per-param")
    return run_sweep(args, argv, t_launch)


if __name__ == "__main__":
    main()
