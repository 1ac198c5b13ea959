"""Training throughput of a ~1B-parameter transformers Llama: one step (forward, backward, AdamW) per recipe.

A ``transformers.LlamaForCausalLM`` (default preset ``1b``: hidden 2048, 16 layers, ffn 8192, 32/8
heads, vocab 32000, untied head: 1.10B parameters), bf16 weights, random initial weights shared
by every arm (each arm trains its own copy from the same start), one fixed batch of random token
ids (never zero; 8 x 2048 = 16384 tokens) trained on with ``labels=input_ids``, AdamW
(``fused=True`` on CUDA). Arms:

* ``bf16``: the model as built;
* ``torchao float8 tensorwise`` / ``rowwise``: ``convert_to_float8_training`` with
  ``Float8LinearConfig.from_recipe_name(...)``, every linear but ``lm_head``;
* ``mxrewrite fp8 rmsnorm`` / ``mxnorm``: ``optimize(format="fp8", norm=..., linears="all")``
  (Hopper-native FP8 on every linear but the head, the norm fused into the activation cast);
  "not available" until that API lands;
* ``mxrewrite mxfp8 mxnorm (norm-fed)``: ``optimize()`` as today (MXFP8 MXNorm on the norm-fed linears;
  emulated GEMMs on Hopper).

Compilation: by default each decoder layer is compiled (``layer.compile(fullgraph=True,
dynamic=False)``, as torchtitan does: the 16 identical layers share one compiled graph, so an arm
compiles in tens of seconds); ``--compile model`` compiles the whole model instead
(``torch.compile(model, dynamic=False)``: several times the compile time), ``--compile none``
runs eagerly. Embedding, final norm, head and loss run eagerly under ``--compile layers``
(the same in every arm).

Per arm: ``--warmup`` steps (the first compiles), then ``--steps`` timed steps (CUDA-synchronised
wall clock per step); reported: tokens/s of the median step, peak GPU memory, the loss of the
first step and the loss after the timed steps (one more forward on the same batch): every arm
must train (loss finite and lower than at the start; all arms start from the same weights and
see the same batch, so their losses should be close to bf16's). Timings are printed as they come.

    python benchmarks/bench_train.py --out OUT_DIR              # H200, ~1B model, 16384 tokens/step
    python benchmarks/bench_train.py --smoke --out /tmp/x       # CPU, tiny model: checks the code paths
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn as nn

# the helpers shared with the other bench scripts: this folder is on sys.path when the script is run, not
# always when it is imported (tests)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    LLAMA_PRESETS, allow_recompiles, arm_not_run, build_mxrewrite, converted_linears, env_line, environment,
    llama_for_causal_lm, select_arms, sync, torchao_float8)

PRESETS = {name: LLAMA_PRESETS[name] for name in ("1b", "smoke")}


# ---------------------------------------------------------------------------------------------
# Arms


def build_torchao(recipe: str):
    def build(model, example):
        return torchao_float8(model, recipe, module_filter_fn=lambda mod, fqn: fqn != "lm_head")

    return build


@dataclass
class Arm:
    name: str
    kind: str
    build: Callable[[nn.Module, torch.Tensor], nn.Module]


ARMS = [
    Arm("bf16", "bf16", lambda model, example: model),
    Arm("torchao float8 tensorwise", "torchao", build_torchao("tensorwise")),
    Arm("torchao float8 rowwise", "torchao", build_torchao("rowwise")),
    Arm("mxrewrite fp8 rmsnorm", "mxrewrite-fp8", build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all")),
    Arm("mxrewrite fp8 mxnorm", "mxrewrite-fp8", build_mxrewrite(True, format="fp8", norm="mxnorm", linears="all")),
    Arm("mxrewrite fp8 rmsnorm e4m3 grads", "mxrewrite-fp8",
        build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all", grad_cast="e4m3")),
    Arm("mxrewrite mxfp8 mxnorm (norm-fed)", "mx", build_mxrewrite(False, format="mxfp8", norm="mxnorm")),
]


def compile_model(model: nn.Module, how: str) -> nn.Module:
    if how == "none":
        return model
    if how == "model":
        return torch.compile(model, dynamic=False)
    for layer in model.model.layers:
        layer.compile(fullgraph=True, dynamic=False)
    return model


def run_arm(arm: Arm, base: nn.Module, ids: torch.Tensor, args, device: str, t0: float) -> dict:
    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {arm.name}: {msg}", flush=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.utils.counters.clear()
    model = copy.deepcopy(base).to(device)  # the same initial weights in every arm
    model.train()
    t_build = time.perf_counter()
    model = arm.build(model, ids[:2, : min(ids.shape[1], 256)])
    converted, n_linears = converted_linears(model)
    build_s = time.perf_counter() - t_build
    runner = compile_model(model, args.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=device == "cuda")
    log(f"built in {build_s:.1f} s, {converted}/{n_linears} linears converted")

    def step() -> torch.Tensor:
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(elapsed)
        if i < args.warmup:
            log(f"warm-up step {i}: {elapsed:.2f} s, loss {losses[-1]:.4f}")
    loss_after = runner(input_ids=ids, labels=ids).loss.item()  # after the last update; no backward
    sync(device)
    median_s = statistics.median(times)
    tokens = ids.numel()
    stats = torch._dynamo.utils.counters
    res = dict(
        arm=arm.name, kind=arm.kind, status="ok", converted_linears=converted, linears=n_linears,
        build_s=build_s, tokens_per_step=tokens, step_s=times, median_step_s=median_s,
        tokens_per_s=tokens / median_s, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
        else None, losses=losses, first_loss=losses[0], loss_after=loss_after,
        dynamo_unique_graphs=int(stats["stats"].get("unique_graphs", 0)),
        dynamo_graph_breaks=int(sum(stats["graph_break"].values())),
    )
    res["trains"] = bool(math.isfinite(loss_after) and loss_after < losses[0])
    log(f"median step {median_s * 1e3:.1f} ms, {res['tokens_per_s']:.0f} tokens/s, peak "
        f"{res['peak_mem_gib'] or float('nan'):.1f} GiB, loss {losses[0]:.4f} -> {loss_after:.4f}, "
        f"{res['dynamo_unique_graphs']} compiled graph(s), {res['dynamo_graph_breaks']} graph break(s)")
    del runner, model, optimizer, loss
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--compile", default="layers", choices=["layers", "model", "none"])
    parser.add_argument("--arms", default="", help="comma-separated substrings (e.g. 'torchao,mxrewrite fp8' or "
                        "'mxfp8'): run only the arms whose name contains one (bf16 always runs: the reference)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 x 64 tokens, 1 + 2 steps (CPU is fine)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.seq, args.warmup, args.steps = "smoke", 2, 64, 1, 2
    elif not torch.cuda.is_available():
        sys.exit("bench_train needs a CUDA GPU (or --smoke for the CPU check)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 16 decoder layers compiled per layer share one graph; leave room for the forward and backward
    # graphs of every arm without dynamo silently falling back to eager
    allow_recompiles(64)

    from tabulate import tabulate

    t0 = time.perf_counter()
    env = environment()
    print(json.dumps(env), flush=True)
    preset = PRESETS[args.preset]
    base = llama_for_causal_lm(preset, args.seq, device, seed=0).to(torch.bfloat16).cpu()  # master copy, off the GPU
    n_params = sum(p.numel() for p in base.parameters())
    n_layer_params = sum(p.numel() for p in base.model.layers.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, preset["vocab"], (args.batch, args.seq), device=device, generator=gen)
    desc = (f"LlamaForCausalLM preset {args.preset} {preset}: {n_params / 1e6:.1f}M parameters "
            f"({n_layer_params / 1e6:.1f}M in the decoder layers), bf16, batch {args.batch} x {args.seq} = "
            f"{ids.numel()} tokens/step, AdamW lr {args.lr}, compile={args.compile}, "
            f"{args.warmup} warm-up + {args.steps} timed steps")
    print(desc, flush=True)

    def save(results, complete):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_train.json").write_text(json.dumps(
            dict(env=env, preset=args.preset, config=preset, parameters=n_params, batch=args.batch, seq=args.seq,
                 warmup=args.warmup, steps=args.steps, lr=args.lr, compile=args.compile, results=results,
                 complete=complete), indent=2))

    chosen = select_arms(ARMS, args.arms)
    results = []
    for arm in chosen:
        print(f"--- {arm.name}", flush=True)
        try:
            res = run_arm(arm, base, ids, args, device, t0)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other arms
            res = arm_not_run(arm, exc, device)
        finally:
            torch._dynamo.reset()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if res["status"] != "ok":
            print(f"{arm.name}: {res['status']}", flush=True)
        results.append(res)
        save(results, complete=False)  # what is done so far, should the run be cut short

    ok = {r["arm"]: r for r in results if r["status"] == "ok"}
    ref = ok.get("bf16")
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["arm"], "-", r["status"][:70], "", "", "", "", ""])
            continue
        rows.append([r["arm"], f"{r['converted_linears']}/{r['linears']}", f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}x" if ref else "-",
                     f"{r['median_step_s'] * 1e3:.1f}",
                     f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-",
                     f"{r['first_loss']:.4f} -> {r['loss_after']:.4f}" + ("" if r["trains"] else " (NOT TRAINING)"),
                     f"{r['loss_after'] - ref['loss_after']:+.4f}" if ref else "-"])
    table = tabulate(rows, ["arm", "linears", "tokens/s", "vs bf16", "step ms", "peak GiB", "loss first -> after",
                            "loss after - bf16's"], tablefmt="github")
    save(results, complete=True)
    (Path(args.out) / "bench_train_table.md").write_text(desc + "\n\n" + table + "\n")

    print(f"\n{desc}; total {time.perf_counter() - t0:.0f} s")
    print(env_line(env, ("triton", "torchao", "transformers")))
    print(f"command: {env['command']}")
    if device == "cpu":
        print("(CPU smoke run: tokens/s are not meaningful)")
    print(table, flush=True)
    failed = [r["arm"] for r in results if r["status"].startswith("FAILED") or
              (r["status"] == "ok" and not r["trains"] and not args.smoke)]
    if failed:
        sys.exit(f"failed or not training: {failed}")


if __name__ == "__main__":
    main()
