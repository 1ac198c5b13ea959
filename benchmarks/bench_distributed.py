"""An optimized transformers Llama trained on several GPUs the way torchtitan parallelises it (issue 14).

Run with torchrun, one process per GPU::

    torchrun --nproc-per-node 8 benchmarks/bench_distributed.py --out OUT_DIR            # 8 H200s, FSDP2
    torchrun --nproc-per-node 8 benchmarks/bench_distributed.py --tp 2 --out OUT_DIR     # FSDP2 x TP 2
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --smoke --out /tmp/x     # CPU + gloo, tiny model

Per arm, every rank builds the same ``LlamaForCausalLM`` (same seed, float32 master weights), applies the
recipe (``optimize()`` or torchao's ``convert_to_float8_training``), then parallelises it as torchtitan
does, in its order:

1. tensor parallelism within the ``tp`` mesh dim (``--tp``; ColwiseParallel on q/k/v/gate/up,
   RowwiseParallel on o/down; torchao's Float8 styles for the torchao arm);
2. per-layer ``torch.compile`` (``fullgraph=True``; ``--compile none`` runs eagerly);
3. activation checkpointing of every decoder layer (``checkpoint_wrapper``, non-reentrant; ``--no-ac``) around
   the compiled layer (torchtitan wraps it the other way round; see :func:`apply_compile_and_ac`);
4. FSDP2 ``fully_shard`` on every decoder layer and on the root over the ``dp`` mesh dim, with
   ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`` (``--param-dtype``).

It then trains ``--steps`` AdamW steps on one fixed global batch (``--global-batch`` sequences of ``--seq``
random token ids, never zero, the same every step; each data-parallel rank takes its slice) and records the
loss of every step (averaged over the ranks), the median step time after ``--warmup`` steps, tokens/s per
GPU and the peak memory per GPU (the largest over the ranks).

Correctness (``--reference``, on by default): rank 0 then trains the same arm alone, FSDP2 over a one-rank
mesh (the same code, mixed precision and casts, no TP) on the whole global batch, while the other ranks
wait, and compares: the loss curves step by step (``--loss-rtol``) and every parameter after the steps,
as the distance between the N-rank and the one-rank parameters relative to how far the one-rank run moved
them (``--param-rtol``). The one-rank run's tokens/s is the scaling baseline.
Expected differences: reduction order (FSDP2 reduce-scatters, TP all-reduces) changes float rounding, which
a block-scaled cast (MXNorm's estimate, the MX scales) can turn into a different rounding of a few elements.
Per-tensor FP8 scales follow each rank's data (its slice of the batch under FSDP2, its weight shard under
TP): mxrewrite's are powers of two, so a normal value casts the same whatever the scale; torchao's
tensorwise scales are not, so its ranks round differently from one GPU: it is held to
``--param-rtol-per-rank-scales`` instead of ``--param-rtol``. The default tolerances come from CPU runs
in float32; with bf16 compute on GPUs the split batch also changes the GEMMs' rounding, and the bf16 arm's
own drift is the floor the others are read against.

Arms (``--arms``: comma-separated substrings of the names; bf16 always runs):

* ``bf16``: the model as built;
* ``torchao float8 tensorwise``: ``convert_to_float8_training`` (every linear but ``lm_head``) with
  ``enable_fsdp_float8_all_gather`` and ``precompute_float8_dynamic_scale_for_fsdp`` after each step,
  torchao's recommended FSDP2 setup (its GEMMs emulated on CPU);
* ``mxrewrite fp8 rmsnorm`` / ``mxnorm``: ``optimize(format="fp8", linears="all")``; ``mxrewrite fp8-all-gather
  rmsnorm`` the same (RMSNorm) with ``fsdp_fp8_all_gather=True``, FSDP2 gathering the weights' FP8 casts as torchao's
  arm does;
* ``mxrewrite mxfp8 mxnorm``: ``optimize()`` as by default (MXFP8 MXNorm on the norm-fed linears).

Results go to ``OUT_DIR/bench_distributed.json`` and a table ``bench_distributed_table.md`` (with
``--profile``, each arm's last step profiled on rank 0, by kernel category and largest kernels, in
``bench_distributed_profile.md``, and its Chrome trace, ``trace-<arm>.json.gz``, which
``benchmarks/trace_diff.py`` compares between two arms without a GPU); the script
exits non-zero when an arm failed, did not train, or missed a stated tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    LLAMA_PRESETS as PRESETS, allow_recompiles, arm_not_run, build_mxrewrite, converted_linears, env_line,
    environment, llama_for_causal_lm, select_arms, sync, torchao_float8)
from bench_profile import profile_step  # noqa: E402

TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str                                    # "bf16" | "torchao" | "mxrewrite"
    recipe: Callable[[nn.Module, torch.Tensor], nn.Module]
    per_rank_scales: bool = False                # its casts round differently on each rank (see above)


def _torchao_tensorwise(model, example):
    # on CPU (--smoke) torchao's own emulation: torch._scaled_mm there takes seconds for the tiny model's step
    overrides = {"enable_fsdp_float8_all_gather": True, "emulate": example.device.type == "cpu"}
    return torchao_float8(model, "tensorwise", overrides, module_filter_fn=lambda mod, fqn: fqn != "lm_head")


ARMS = [
    Arm("bf16", "bf16", lambda model, example: model),
    Arm("torchao float8 tensorwise", "torchao", _torchao_tensorwise, per_rank_scales=True),
    Arm("mxrewrite fp8 rmsnorm", "mxrewrite", build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all")),
    Arm("mxrewrite fp8 mxnorm", "mxrewrite", build_mxrewrite(True, format="fp8", norm="mxnorm", linears="all")),
    Arm("mxrewrite fp8-all-gather rmsnorm", "mxrewrite",
        build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all", fsdp_fp8_all_gather=True)),
    Arm("mxrewrite mxfp8 mxnorm", "mxrewrite", build_mxrewrite(False, format="mxfp8", norm="mxnorm")),
]


# ---------------------------------------------------------------------------------------------
# The model and its parallelisation


def apply_tp(model: nn.Module, tp_mesh, torchao: bool) -> None:
    """Megatron-style TP of every decoder layer's linears (the norms, embedding and head stay replicated)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if torchao:
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        styles = {"colwise": Float8ColwiseParallel, "rowwise": Float8RowwiseParallel}
    else:
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {name: styles[style]() for name, style in TP_PLAN.items()})


def apply_compile_and_ac(model: nn.Module, compile_layers: bool, ac: bool) -> None:
    """Compile every decoder layer and checkpoint it (non-reentrant; backward runs the compiled forward again).

    torchtitan compiles the checkpointed layer instead; dynamo then traces the checkpoint as a higher-order op
    and refuses transformers' attention when the ``kernels`` package wraps it (a global set inside the forward:
    "HOP: Unsafe side effect"). Full checkpointing recomputes the whole layer either way."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        if compile_layers:
            layer.compile(fullgraph=True, dynamic=False)
        if ac:
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=False)


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def sharded_fraction(model: nn.Module) -> float:
    """The fraction of the parameters' elements this rank holds (1 / world size when all are sharded)."""
    from torch.distributed.tensor import DTensor

    full = local = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / full


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, in float32 on the CPU (a collective: every rank of the model's mesh calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[_canonical(name)] = t.detach().float().cpu()
    return out


def _canonical(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (checkpoint_wrapper, torch.compile)."""
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


# ---------------------------------------------------------------------------------------------
# One arm


@dataclass(frozen=True)
class Layout:
    """How the ranks of one run are arranged."""

    world: int
    dp: int
    tp: int
    dp_mesh: object
    tp_mesh: object | None
    dp_rank: int


def make_layout(device_type: str, tp: int, group=None) -> Layout:
    """The (dp, tp) meshes over all ranks, or, given ``group`` (of this rank only), a one-rank dp mesh."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if group is not None:
        mesh = DeviceMesh.from_group(group, device_type, mesh_dim_names=("dp",))
        return Layout(1, 1, 1, mesh, None, 0)
    world = dist.get_world_size()
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world size {world}")
    if tp == 1:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
        return Layout(world, world, 1, mesh, None, mesh.get_local_rank())
    mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(world, world // tp, tp, mesh["dp"], mesh["tp"], mesh["dp"].get_local_rank())


def train_arm(arm: Arm, layout: Layout, ids: torch.Tensor, args, device: torch.device, log) -> dict:
    """Build, parallelise and train one arm; its losses, timings, memory and (when asked) final parameters."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.utils.counters.clear()
    preset = PRESETS[args.preset]
    t_build = time.perf_counter()
    model = llama_for_causal_lm(preset, args.seq, device, seed=0)   # the same on every rank
    initial = {_canonical(n): p.detach().float().cpu() for n, p in model.named_parameters()} \
        if args.reference and layout.world == 1 else None
    model = arm.recipe(model, ids[:1, : min(ids.shape[1], 128)])
    model.train()
    converted, _ = converted_linears(model)
    if layout.tp_mesh is not None:
        apply_tp(model, layout.tp_mesh, arm.kind == "torchao")
    apply_compile_and_ac(model, args.compile == "layers", args.ac)
    apply_fsdp(model, layout.dp_mesh, DTYPES[args.param_dtype])
    held = sharded_fraction(model)
    gathered_in_fp8 = fp8_gathered_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    after_step = _after_step(model, arm)
    build_s = time.perf_counter() - t_build
    log(f"built in {build_s:.1f} s, this rank holds {held:.3f} of the parameters")

    per_rank = ids.shape[0] // layout.dp
    local_ids = ids[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    precomputed = []  # how many FP8-gathered weights got a precomputed scale after each step

    def step() -> torch.Tensor:
        loss = model(input_ids=local_ids, labels=local_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        precomputed.append(after_step())
        return loss.detach().float()

    losses, times, kernels = [], [], None
    for i in range(args.steps):
        sync(device)
        start = time.perf_counter()
        if args.profile and i == args.steps - 1:  # the last step, profiled and left out of the timing
            kernels, loss = profiled(step, Path(args.out) / f"trace-{slug(arm.name)}.json.gz")
        else:
            loss = step()
        sync(device)
        elapsed = time.perf_counter() - start
        if kernels is not None:
            kernels["wall_ms"] = elapsed * 1e3
        if layout.world > 1:
            dist.all_reduce(loss)
            loss /= layout.world
        losses.append(loss.item())
        if kernels is None:
            times.append(elapsed)
        if i < args.warmup:
            log(f"warm-up step {i}: {elapsed:.2f} s, loss {losses[-1]:.4f}")
    timed = times[args.warmup:] or times
    median_s = statistics.median(timed)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                        device=device)
    if layout.world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = ids.numel()
    result = dict(
        arm=arm.name, kind=arm.kind, status="ok", world=layout.world, dp=layout.dp, tp=layout.tp,
        converted_linears=converted, fp8_gathered_weights=gathered_in_fp8, precomputed_scales=precomputed[-1],
        held_fraction=held, build_s=build_s,
        losses=losses, step_s=times, median_step_s=median_s,
        tokens_per_s=tokens / median_s, tokens_per_s_per_gpu=tokens / median_s / layout.world,
        peak_mem_gib_per_gpu=float(peak) if device.type == "cuda" else None,
        compiled_graphs=int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)),
        profile=kernels,
    )
    result["trains"] = bool(all(map(math.isfinite, losses)) and losses[-1] < losses[0])
    params = full_parameters(model) if args.reference else None     # a collective: every rank gathers
    if dist.get_rank() != 0:
        params = None
    log(f"median step {median_s * 1e3:.1f} ms, {result['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    del model, optimizer
    return dict(result=result, params=params, initial=initial)


def profiled(step: Callable[[], torch.Tensor], trace: Path, top: int = 25) -> tuple[dict, torch.Tensor]:
    """Run ``step`` under the profiler: this rank's device ms per kernel category and of its ``top`` kernels
    (CPU: operators' self time), the host's ``top`` operators and regions by self time, and the step's loss.
    Rank 0 also writes the step's Chrome trace to ``trace``."""
    out = {}
    prof = profile_step(lambda: out.update(loss=step()), trace=str(trace) if dist.get_rank() == 0 else None,
                        host=True)
    return dict(per_category=prof.per_category, top_kernels=prof.kernels[:top], host=prof.host[:top],
                total_ms=sum(ms for _, ms in prof.kernels)), out["loss"]


def slug(name: str) -> str:
    """A file-name form of an arm's name."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def fp8_gathered_weights(model: nn.Module) -> int:
    """Parameters FSDP2 gathers through a pre-all-gather hook: FP8 casts (``fsdp_fp8_all_gather``, torchao's
    ``enable_fsdp_float8_all_gather``)."""
    return sum(hasattr(getattr(p, "_local_tensor", p), "fsdp_pre_all_gather") for p in model.parameters())


def _after_step(model: nn.Module, arm: Arm) -> Callable[[], int | None]:
    """What runs after each optimizer step: the FP8-gathered weights' scales in one all-reduce (torchao's and
    mxrewrite's recommended FSDP2 setup; nothing for weights gathered in high precision). It returns how many
    weights got a scale (mxrewrite's count; None for torchao, which does not say)."""
    if arm.kind == "torchao":
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        return lambda: precompute_float8_dynamic_scale_for_fsdp(model)
    if arm.kind == "mxrewrite":
        import mxrewrite

        return lambda: mxrewrite.precompute_fp8_scales(model)
    return lambda: None


def compare(run: dict, reference: dict, arm: Arm, args) -> dict:
    """The N-rank run against the one-rank run of the same arm: loss curves and parameters after the steps."""
    param_rtol = args.param_rtol_per_rank_scales if arm.per_rank_scales else args.param_rtol
    loss_diff = [abs(a - b) / abs(b) for a, b in zip(run["result"]["losses"], reference["result"]["losses"])]
    drift = {}
    for name, p_ref in reference["params"].items():
        moved = float((p_ref - reference["initial"][name]).norm())
        diff = float((run["params"][name] - p_ref).norm())
        drift[name] = diff / moved if moved > 0 else (0.0 if diff == 0 else math.inf)
    worst = max(drift, key=drift.get)
    return dict(
        loss_max_rel_diff=max(loss_diff), loss_rtol=args.loss_rtol,
        param_max_rel_drift=drift[worst], param_worst=worst, param_median_rel_drift=statistics.median(drift.values()),
        param_rtol=param_rtol,
        ok=max(loss_diff) <= args.loss_rtol and drift[worst] <= param_rtol,
        reference_tokens_per_s=reference["result"]["tokens_per_s"],
        reference_losses=reference["result"]["losses"],
        reference_peak_mem_gib=reference["result"]["peak_mem_gib_per_gpu"],
    )


def _cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step over all ranks (default: 2 per data-parallel rank)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (the first compiles)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (within a node)")
    parser.add_argument("--no-ac", dest="ac", action="store_false", help="no activation checkpointing")
    parser.add_argument("--compile", default=None, choices=["layers", "none"],
                        help="per-layer torch.compile (default) or eager (the default with --smoke)")
    parser.add_argument("--param-dtype", default="bfloat16", choices=sorted(DTYPES),
                        help="FSDP2's compute dtype for the parameters (the master copy stays float32)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the one-rank run and the comparison")
    parser.add_argument("--loss-rtol", type=float, default=0.01,
                        help="largest relative difference of a step's loss to the one-rank run's")
    parser.add_argument("--param-rtol", type=float, default=0.1,
                        help="largest |p_N - p_1| / |p_1 - p_0| of a parameter tensor after the steps")
    parser.add_argument("--param-rtol-per-rank-scales", type=float, default=0.5,
                        help="--param-rtol for an arm whose casts round differently per rank (torchao)")
    parser.add_argument("--arms", default="", help="comma-separated substrings of the arm names (bf16 always runs)")
    parser.add_argument("--profile", action="store_true", help="profile each arm's last step (left out of the "
                        "timing): rank 0's kernel categories and largest kernels go to bench_distributed_profile.md")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 64 tokens per sequence, 6 steps, "
                        "float32 compute, eager unless --compile says: checks the code paths on CPU (gloo)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.seq, args.steps, args.warmup = "smoke", 64, 6, 1
        args.param_dtype, args.lr = "float32", 1e-3
    args.compile = args.compile or ("none" if args.smoke else "layers")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("bench_distributed needs CUDA GPUs (or --smoke for the CPU check)")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    allow_recompiles(64)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    layout = make_layout(device.type, args.tp)
    solo_group = dist.new_group([0]) if args.reference else None    # every rank takes part in new_group
    global_batch = args.global_batch or 2 * layout.dp
    if global_batch % layout.dp:
        sys.exit(f"--global-batch {global_batch} is not a multiple of the data-parallel size {layout.dp}")
    preset = PRESETS[args.preset]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, preset["vocab"], (global_batch, args.seq), generator=gen).to(device)
    env = environment() if rank == 0 else {}
    desc = (f"LlamaForCausalLM preset {args.preset} {preset}, {world} ranks (dp {layout.dp} x tp {layout.tp}) on "
            f"{env.get('device', '')}, global batch {global_batch} x {args.seq} tokens, {args.steps} AdamW steps "
            f"(lr {args.lr}, {args.warmup} untimed), FSDP2 param dtype {args.param_dtype} / reduce float32, "
            f"activation checkpointing {'on' if args.ac else 'off'}, compile={args.compile}")
    log(json.dumps(env))
    log(desc)

    results = []
    for arm in select_arms(ARMS, args.arms):
        log(f"--- {arm.name}")
        try:
            run = train_arm(arm, layout, ids, args, device, lambda m, a=arm: log(f"{a.name}: {m}"))
        except Exception as exc:  # noqa: BLE001 - every rank fails the same way (same model, same code)
            results.append(arm_not_run(arm, exc, "cuda" if cuda else "cpu"))
            _cleanup(device)
            dist.barrier()
            continue
        _cleanup(device)
        result = run["result"]
        if args.reference:
            if rank == 0:
                solo = make_layout(device.type, 1, group=solo_group)
                ref = train_arm(arm, solo, ids, args, device, lambda m, a=arm: log(f"{a.name} (1 rank): {m}"))
                result["reference"] = compare(run, ref, arm, args)
                del ref
                _cleanup(device)
            dist.barrier()
        del run
        results.append(result)
        if rank == 0:
            _save(args, env, desc, results, complete=False)
    if rank == 0:
        table = _save(args, env, desc, results, complete=True)
        print(f"\n{desc}; total {time.perf_counter() - t0:.0f} s")
        print(env_line(env, ("triton", "torchao", "transformers")))
        print(f"command: torchrun --nproc-per-node {world} {env['command'].removeprefix('python ')}")
        print(table, flush=True)
    failed = [r["arm"] for r in results if not r["status"].startswith(("ok", "not available", "skipped on CPU"))
              or (r["status"] == "ok" and not r["trains"])
              or (r["status"] == "ok" and "reference" in r and not r["reference"]["ok"])]
    dist.destroy_process_group()
    if failed:
        sys.exit(f"failed, not training, or off the one-rank run: {failed}")


def _save(args, env: dict, desc: str, results: list[dict], complete: bool) -> str:
    from tabulate import tabulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(json.dumps(
        dict(env=env, description=desc, args=vars(args), results=results, complete=complete), indent=2))
    bf16 = next((r for r in results if r["arm"] == "bf16" and r["status"] == "ok"), None)
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["arm"], r["status"][:70]] + [""] * 7)
            continue
        ref = r.get("reference")
        rows.append([
            r["arm"], f"{r['tokens_per_s_per_gpu']:.0f}",
            f"{r['tokens_per_s_per_gpu'] / bf16['tokens_per_s_per_gpu']:.3f}x" if bf16 else "-",
            f"{r['peak_mem_gib_per_gpu']:.1f}" if r["peak_mem_gib_per_gpu"] is not None else "-",
            f"{ref['reference_tokens_per_s']:.0f}" if ref else "-",
            f"{r['tokens_per_s_per_gpu'] / ref['reference_tokens_per_s']:.2f}" if ref else "-",
            f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" + ("" if r["trains"] else " (NOT TRAINING)"),
            f"{ref['loss_max_rel_diff']:.2e}" if ref else "-",
            (f"{ref['param_median_rel_drift']:.1e} / {ref['param_max_rel_drift']:.1e} ({ref['param_worst']})"
             + ("" if ref["ok"] else " FAIL")) if ref else "-",
        ])
    table = tabulate(rows, ["arm", "tokens/s/GPU", "vs bf16", "peak GiB/GPU", "1-GPU tokens/s", "per-GPU vs 1 GPU",
                            "loss first -> last", "loss vs 1 GPU (max rel)",
                            "params vs 1 GPU (median / max drift)"],
                     tablefmt="github")
    (out / "bench_distributed_table.md").write_text(desc + "\n\n" + table + "\n")
    profiles = [r for r in results if r.get("profile")]
    if profiles:
        (out / "bench_distributed_profile.md").write_text(profile_markdown(desc, profiles))
    return table


def profile_markdown(desc: str, results: list[dict]) -> str:
    """Per arm: rank 0's profiled step by kernel category, then its largest kernels."""
    from tabulate import tabulate

    unit = "device ms" if torch.cuda.is_available() else "CPU self ms"
    lines = [desc, "", f"One profiled step per arm (the last), rank 0, {unit}.", ""]
    categories = sorted({c for r in results for c in r["profile"]["per_category"]})
    lines += [tabulate([[r["arm"], f"{r['profile']['wall_ms']:.1f}", f"{r['profile']['total_ms']:.1f}"]
                        + [f"{r['profile']['per_category'].get(c, 0.0):.1f}" for c in categories] for r in results],
                       ["arm", "step wall", "kernels"] + categories, tablefmt="github"), ""]
    for r in results:
        kernels = [[name[:110], f"{ms:.2f}"] for name, ms in r["profile"]["top_kernels"]]
        host = [[name[:110], f"{ms:.2f}"] for name, ms in r["profile"]["host"]]
        lines += [f"## {r['arm']}", "", tabulate(kernels, ["kernel", "ms"], tablefmt="github"), "",
                  "Host: operators and regions by self CPU time", "",
                  tabulate(host, ["host", "self ms"], tablefmt="github"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
