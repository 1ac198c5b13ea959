"""Does MXNorm train as well as RMSNorm? Pre-train a small Llama-3-style model under each rewrite.

Reproduces, at small scale, the accuracy claim of the MXNorm paper
(../shared/MXNORM.md): with MXFP8 matmuls, MXNorm with p = 2 trains to within
noise of RMSNorm, and p = 1 is less stable. A ~25M-parameter decoder
(train_quality_model.py) is trained from scratch on the Python standard library's
source as bytes (train_quality_data.py). Every arm builds the same model from
the same seed, sees the same batches in the same order for the same number of
steps, and differs from the others only in the ``mxrewrite.RewriteConfig`` that
``mxrewrite.optimize`` applies (or in skipping optimize: the bf16 ceiling).

Arms (``--arms``): ``bf16`` (no rewrite), ``mxfp8-rmsnorm`` (the baseline: exact
RMSNorm fused with the MXFP8 cast), ``mxfp8-mxnorm-p2``, ``mxfp8-mxnorm-p1``,
``nvfp4-rmsnorm`` and ``nvfp4-mxnorm-p2``. The first of ``--seeds`` runs every
arm; the other seeds run the ``--seed-arms``. The first of ``--lrs`` is the main
learning rate; the others run the ``--lr-arms`` (the sensitivity slice).

Precision: parameters and AdamW state in float32, the forward under bf16
autocast on CUDA (fp32 master weights, bf16 compute: the usual mixed-precision
recipe). The rewritten linears (wq, wk, wv, w1, w3) run as MX GEMMs whose
operands are cast by mxrewrite's ops (on Hopper these GEMMs are emulated on the
exactly dequantised values, which changes nothing numerically); the linears that
no norm feeds (wo, w2) and the head stay in bf16 in every arm. On CPU everything
runs in float32 eagerly (the CI smoke test). On CUDA the loss function is
wrapped in ``torch.compile(fullgraph=True, dynamic=False)``.

Results go to ``<out>/runs.jsonl``, one line per finished run, written as soon as
the run ends (so a run cut off by the device's time limit still leaves the
earlier ones). ``--deadline-s`` stops starting runs that would not finish in
time; ``--run-time-limit-s`` cuts a single run's training short (marked
``truncated``). ``--steps auto`` measures the step time of the slowest arms
first and picks the step count that fits ``--target-train-s``.
``train_quality_report.py`` turns one or more runs.jsonl files into the markdown
table and the loss-curve plot.

    python benchmarks/train_quality.py --preset small --device cuda --steps auto --out out/tq
    python benchmarks/train_quality.py --preset toy --device cpu --steps 20 --batch-size 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import datetime
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

from train_quality_data import Corpus, WindowSampler, build_corpus, fixed_batches  # noqa: E402
from train_quality_model import PRESETS, Decoder, ModelConfig, count_parameters  # noqa: E402

# Settings shared by every rewritten arm (DESIGN.md's RewriteConfig); the arms override format/norm/p.
COMMON_REWRITE = (("scale_mode", "rceil"), ("rescale", "gaussian"), ("include_head", False), ("grad_cast", "mx"))


@dataclass(frozen=True)
class Arm:
    """One configuration of the comparison: a RewriteConfig, or no rewrite at all (``rewrite=None``)."""

    name: str
    label: str
    rewrite: tuple[tuple[str, object], ...] | None

    def rewrite_config(self) -> dict | None:
        return None if self.rewrite is None else dict(COMMON_REWRITE + self.rewrite)


ARMS = {arm.name: arm for arm in (
    Arm("mxfp8-rmsnorm", "MXFP8, RMSNorm (baseline)", (("format", "mxfp8"), ("norm", "rmsnorm"))),
    Arm("mxfp8-mxnorm-p2", "MXFP8, MXNorm p=2", (("format", "mxfp8"), ("norm", "mxnorm"), ("p", 2))),
    Arm("mxfp8-mxnorm-p1", "MXFP8, MXNorm p=1", (("format", "mxfp8"), ("norm", "mxnorm"), ("p", 1))),
    Arm("nvfp4-rmsnorm", "NVFP4, RMSNorm", (("format", "nvfp4"), ("norm", "rmsnorm"))),
    Arm("nvfp4-mxnorm-p2", "NVFP4, MXNorm p=2", (("format", "nvfp4"), ("norm", "mxnorm"), ("p", 2))),
    Arm("bf16", "bf16, no rewrite (ceiling)", None),
)}
BASELINE = "mxfp8-rmsnorm"


@dataclass(frozen=True)
class RunSpec:
    arm: str
    seed: int
    lr: float

    @property
    def run_id(self) -> str:
        return f"{self.arm}-s{self.seed}-lr{self.lr:g}"


@dataclass(frozen=True)
class TrainSettings:
    preset: str
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

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.startswith("cuda") else None

    @property
    def precision(self) -> str:
        return "fp32 weights, bf16 autocast" if self.autocast_dtype is not None else "fp32"


@dataclass
class Curves:
    train_loss: list[float] = field(default_factory=list)  # every step
    eval_steps: list[int] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)  # the first eval_batches held-out batches


def plan_runs(arms: list[str], seeds: list[int], lrs: list[float], seed_arms: list[str],
              lr_arms: list[str]) -> list[RunSpec]:
    """Every arm at the first seed and main lr, then the extra seeds, then the lr slice (priority order)."""
    runs = [RunSpec(arm, seeds[0], lrs[0]) for arm in arms]
    runs += [RunSpec(arm, seed, lrs[0]) for seed in seeds[1:] for arm in seed_arms if arm in arms]
    runs += [RunSpec(arm, seeds[0], lr) for lr in lrs[1:] for arm in lr_arms if arm in arms]
    return runs


def rewrite_model(model: nn.Module, example_inputs: tuple, arm: Arm) -> tuple[nn.Module, dict]:
    """The arm's model: ``mxrewrite.optimize(model)`` with its config, or ``model`` itself for bf16.

    Returns the module to train and a summary of the rewrite report. The rewrite
    must hit every block's two norms: an arm whose rewrite silently did less
    would compare nothing, so that raises.
    """
    config = arm.rewrite_config()
    if config is None:
        return model, {"sites_rewritten": 0, "note": "no rewrite"}
    import mxrewrite

    optimized = mxrewrite.optimize(model, example_inputs, config=mxrewrite.RewriteConfig(**config))
    report = mxrewrite.get_report(optimized)
    text = str(report)
    print(f"--- rewrite report ({arm.name}) ---\n{text}", flush=True)
    rewritten = [site for site in report.sites if site.status == "rewritten"]
    expected = 2 * model.cfg.n_layers
    if len(rewritten) != expected:
        raise RuntimeError(f"{arm.name}: optimize rewrote {len(rewritten)} sites, expected {expected} "
                           f"(attention_norm and ffn_norm of every block):\n{text}")
    summary = {"sites_rewritten": len(rewritten),
               "sites_skipped": [(site.norm, site.reason) for site in report.sites if site.status != "rewritten"],
               "text": text}
    return optimized, summary


def lr_factor(step: int, steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_frac`` at the last step."""
    warmup = max(1, round(warmup_frac * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, trained: nn.Module, lr: float, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over ``trained``'s parameters, which must be ``model``'s own tensors (DESIGN.md's promise)."""
    trained_ids = {id(p) for p in trained.parameters()}
    if trained_ids != {id(p) for p in model.parameters()}:
        raise RuntimeError("the optimized module does not train the original parameter tensors")
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "tok_embeddings" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "tok_embeddings" not in name)]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=settings.betas, fused=settings.device.startswith("cuda"))


def make_loss_fn(net: nn.Module, settings: TrainSettings):
    dtype = settings.autocast_dtype
    device_type = torch.device(settings.device).type

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    if settings.compile:
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


def train_run(spec: RunSpec, settings: TrainSettings, corpus: Corpus, tokens: dict[str, torch.Tensor]) -> dict:
    """Train one run from scratch; returns its result record (never raises for a diverging run)."""
    arm, cfg = ARMS[spec.arm], PRESETS[settings.preset]
    device = settings.device
    if settings.compile:
        torch._dynamo.reset()
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = Decoder(replace(cfg, max_seq_len=max(cfg.max_seq_len, settings.seq_len))).to(device)
    sampler = WindowSampler(tokens["train"], settings.batch_size, settings.seq_len, seed=10_000 + spec.seed)
    train_eval = fixed_batches(tokens["train"], settings.final_eval_batches, settings.batch_size, settings.seq_len)
    heldout_eval = fixed_batches(tokens["heldout"], settings.final_eval_batches, settings.batch_size,
                                 settings.seq_len)
    example = (heldout_eval[0][0],)

    net, report = rewrite_model(model, example, arm)
    rewrite_s = time.perf_counter() - t_start
    optimizer = build_optimizer(model, net, spec.lr, settings)
    loss_fn = make_loss_fn(net, settings)

    t0 = time.perf_counter()
    initial_heldout = mean(evaluate(loss_fn, heldout_eval[:settings.eval_batches], settings.compile))
    initial_train = mean(evaluate(loss_fn, train_eval[:settings.eval_batches], settings.compile))
    synchronize(device)
    first_compile_s = time.perf_counter() - t0

    curves = Curves(eval_steps=[0], heldout_loss=[initial_heldout])
    pending: list[torch.Tensor] = []
    status, steps_done, train_s, t_steady, steady_steps, first_step_s = "ok", 0, 0.0, None, 0, math.nan
    t_train = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(step, settings.steps, settings.warmup_frac, settings.min_lr_frac)
        inputs, targets = sampler.next_batch()
        loss = loss_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.grad_clip)
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
            train_s = now - t_train
            if t_steady is None and steps_done >= min(2 * settings.log_every, settings.steps):
                t_steady, steady_steps = now, steps_done
            if not all(math.isfinite(v) for v in values):
                status = "diverged"
                break
            if train_s > settings.run_time_limit_s and not last:
                status = "truncated"
                break
        if steps_done % settings.eval_every == 0 and not last:
            t_eval = time.perf_counter()
            curves.eval_steps.append(steps_done)
            curves.heldout_loss.append(mean(evaluate(loss_fn, heldout_eval[:settings.eval_batches],
                                                     settings.compile)))
            t_train += time.perf_counter() - t_eval  # evaluation is not training time
            if t_steady is not None:
                t_steady += time.perf_counter() - t_eval
    synchronize(device)
    t_end_train = time.perf_counter()
    steady_s = t_end_train - t_steady if t_steady is not None else float("nan")
    step_ms = 1000 * steady_s / (steps_done - steady_steps) if steps_done > steady_steps else float("nan")

    final_train = mean(evaluate(loss_fn, train_eval, settings.compile))
    heldout_losses = evaluate(loss_fn, heldout_eval, settings.compile)
    final_heldout = mean(heldout_losses)
    curves.eval_steps.append(steps_done)
    curves.heldout_loss.append(mean(heldout_losses[:settings.eval_batches]))  # same batches as the curve
    if not (math.isfinite(final_train) and math.isfinite(final_heldout)) and status == "ok":
        status = "diverged"
    tail = curves.train_loss[-max(1, steps_done // 10):]
    tokens_per_step = settings.batch_size * settings.seq_len
    return {
        "run_id": spec.run_id, "arm": spec.arm, "label": arm.label, "seed": spec.seed, "lr": spec.lr,
        "rewrite_config": arm.rewrite_config(), "status": status,
        "steps_planned": settings.steps, "steps_done": steps_done, "tokens_seen": steps_done * tokens_per_step,
        "initial": {"train_loss": initial_train, "heldout_loss": initial_heldout},
        "final": {"train_loss": final_train, "heldout_loss": final_heldout,
                  "train_loss_last_10pct_steps": sum(tail) / len(tail)},
        "curves": asdict(curves),
        "timing": {"rewrite_s": rewrite_s, "first_eval_incl_compile_s": first_compile_s,
                   "first_step_s": first_step_s,
                   "train_s": t_end_train - t_train, "step_ms": step_ms,
                   "tokens_per_s": 1000 * tokens_per_step / step_ms if step_ms == step_ms else float("nan"),
                   "total_s": time.perf_counter() - t_start},
        "report": report, "n_params": count_parameters(model),
        "model": asdict(model.cfg), "settings": {**asdict(settings), "precision": settings.precision},
    }


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

        env["mxrewrite"] = getattr(mxrewrite, "__version__", "?")
    except ImportError:
        pass
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
    return env


def probe_step_ms(arms: list[str], settings: TrainSettings, corpus: Corpus, tokens: dict, lr: float,
                  probe_steps: int) -> dict[str, float]:
    """Steady-state ms per step of each arm over a short run (which also warms the compile caches)."""
    probe = replace(settings, steps=probe_steps, log_every=max(1, probe_steps // 3), eval_every=10**9,
                    eval_batches=1, final_eval_batches=1)
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
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms (default: all)")
    parser.add_argument("--seeds", default="0,1", help="first seed runs every arm, the others --seed-arms")
    parser.add_argument("--seed-arms", default=f"{BASELINE},mxfp8-mxnorm-p2")
    parser.add_argument("--lrs", default="2e-3,1e-3,4e-3", help="first is the main lr, the others --lr-arms")
    parser.add_argument("--lr-arms", default=f"{BASELINE},mxfp8-mxnorm-p2")
    parser.add_argument("--runs", default=None, help="comma list of run ids: run only these of the plan")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", default="1000", help="steps per run, or 'auto' (see --target-train-s)")
    parser.add_argument("--target-train-s", type=float, default=40.0, help="with --steps auto")
    parser.add_argument("--probe-arms", default=f"{BASELINE},nvfp4-mxnorm-p2", help="with --steps auto")
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--final-eval-batches", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the loss (default: on for CUDA, off for CPU)")
    parser.add_argument("--run-time-limit-s", type=float, default=math.inf, help="cut one run's training short")
    parser.add_argument("--deadline-s", type=float, default=math.inf,
                        help="after the first run, start none that would end later than this many seconds "
                             "after launch (estimated from the longest run so far)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default="out/train_quality", help="directory for runs.jsonl")
    parser.add_argument("--md", default=None, help="also write the markdown results here")
    parser.add_argument("--plot", default=None, help="also write the loss-curve PNG here (needs matplotlib)")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return names


def main(argv: list[str] | None = None) -> list[dict]:
    t_launch = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # exact for dequantised MX operands
        torch.backends.cudnn.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    arms = _names(args.arms)
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    plan = plan_runs(arms, seeds, lrs, _names(args.seed_arms), _names(args.lr_arms))
    if args.runs:
        wanted = set(args.runs.split(","))
        plan = [spec for spec in plan if spec.run_id in wanted]
    compile_ = args.compile if args.compile is not None else args.device.startswith("cuda")
    settings = TrainSettings(preset=args.preset, steps=1, batch_size=args.batch_size, seq_len=args.seq_len,
                             device=args.device, compile=compile_, main_lr=lrs[0], eval_every=args.eval_every,
                             eval_batches=args.eval_batches, final_eval_batches=args.final_eval_batches,
                             log_every=args.log_every, run_time_limit_s=args.run_time_limit_s)

    corpus = build_corpus()
    tokens = {"train": corpus.train.to(args.device), "heldout": corpus.heldout.to(args.device)}
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
        steps = int(args.steps)
    settings = replace(settings, steps=steps)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, durations = [], []
    command = "python benchmarks/train_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for spec in plan:
        elapsed = time.perf_counter() - t_launch
        estimate = max(durations, default=0.0)
        if durations and elapsed + estimate > args.deadline_s:  # the first run always starts
            print(f"skip {spec.run_id}: {elapsed:.0f} s elapsed + ~{estimate:.0f} s would pass the deadline",
                  flush=True)
            continue
        print(f"=== {spec.run_id} ({steps} steps)", flush=True)
        try:
            record = train_run(spec, settings, corpus, tokens)
        except Exception as exc:  # one broken arm must not lose the others' results
            traceback.print_exc()
            record = {"run_id": spec.run_id, "arm": spec.arm, "label": ARMS[spec.arm].label, "seed": spec.seed,
                      "lr": spec.lr, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                      "steps_planned": steps, "settings": {**asdict(settings), "precision": settings.precision}}
        record.update(env=env, corpus=corpus.describe(), probe_step_ms=probe, command=command)
        durations.append(record.get("timing", {}).get("total_s", 0.0))
        with open(out / "runs.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        results.append(record)
        final = record.get("final", {})
        print(f"--> {spec.run_id}: {record['status']} train {final.get('train_loss', float('nan')):.4f} "
              f"heldout {final.get('heldout_loss', float('nan')):.4f} "
              f"({record.get('timing', {}).get('step_ms', float('nan')):.1f} ms/step, "
              f"{durations[-1]:.0f} s)", flush=True)

    if args.md or args.plot:
        from train_quality_report import write_outputs

        write_outputs(results, md_path=args.md, plot_path=args.plot)
    return results


if __name__ == "__main__":
    main()
