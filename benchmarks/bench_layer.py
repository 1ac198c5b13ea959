"""A Llama-3-8B-shaped transformer layer, forward + backward under torch.compile: bf16, FP8 and MX recipes.

Arms (same layer, same weights, same input and output gradient; every arm compiled with
``torch.compile(fullgraph=True, dynamic=False)``, Inductor's caches off):

* ``bf16``: the layer as written (the reference column: speedups are over this arm);
* ``torchao float8 tensorwise`` / ``rowwise``: ``torchao.float8.convert_to_float8_training`` with
  ``Float8LinearConfig.from_recipe_name(...)`` on all 7 linears;
* ``mxrewrite fp8 rmsnorm`` / ``mxnorm``: ``optimize(format="fp8", norm=..., linears="all")``, Hopper's
  native FP8 (e4m3 activations and weights, e5m2 gradients, float32 per-tensor scales,
  ``torch._scaled_mm``) on all 7 linears, the norm fused into the activation cast;
* the MX arms as before (``--format``, default mxfp8; q, k, v, gate and up, emulated GEMMs on Hopper):
  ``rmsnorm+cast (inductor)`` (``optimize(norm="rmsnorm")`` with the norm-cast op run as PyTorch ops,
  ``MXREWRITE_KERNELS=reference``, so Inductor fuses RMSNorm and the cast itself), ``rmsnorm+cast
  (fused kernel)`` and ``mxnorm+cast (fused kernel)``.

An arm whose API is not there yet (``format="fp8"``, ``linears="all"``) is reported "not available";
an arm that fails is reported with its error and the others still run.

Reported per arm: median fwd+bwd time (``triton.testing.do_bench``), the speedup over bf16, the GPU
time by kernel category from one profiled step (see :func:`categorise`), the number of linears the
recipe converted, and the relative L2 error of the layer output against the same layer (same
weights) run in float32 on the same input ("rel err"), and of the residual branches alone
(output minus input, "branch rel err": the residual stream passes through exactly and would hide
differences). Last: how far the best mxrewrite FP8 arm is from torchao tensorwise, and issue 13's
targets (>= 1.35x bf16, faster than torchao rowwise, error <= torchao rowwise's).

    python benchmarks/bench_layer.py --out OUT_DIR          # H200, 16384 tokens (4 x 4096)
    python benchmarks/bench_layer.py --smoke --out /tmp/x   # CPU, tiny layer: checks the code paths
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Inductor's caches key on the captured graph, which is the same for the two rmsnorm arms (the
# MXREWRITE_KERNELS switch acts when the ops are traced): a cached arm would replay the other one.
os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# the helpers shared with the other bench scripts: this folder is on sys.path when the script is run, not
# always when it is imported (tests)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    arm_not_run, bench_ms, build_mxrewrite, env_line, environment, select_arms, torchao_float8)
from bench_common import fp8_api_missing  # noqa: E402, F401 - bench_layer.fp8_api_missing (tests)
from bench_profile import CATEGORIES, categorise, profile_step  # noqa: E402


class Llama3Layer(nn.Module):
    """Pre-norm decoder layer: RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU."""

    def __init__(self, dim=4096, ffn=14336, heads=32, kv_heads=8, max_seq=8192, eps=1e-5, theta=500000.0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        freqs = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(max_seq).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rope(self, t):
        seq = t.shape[2]
        cos, sin = self.cos[:seq].to(t.dtype), self.sin[:seq].to(t.dtype)
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def forward(self, x):
        bsz, seq, _ = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True, enable_gqa=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(bsz, seq, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


LLAMA3_8B = dict(dim=4096, ffn=14336, heads=32, kv_heads=8)
SMOKE = dict(dim=256, ffn=512, heads=4, kv_heads=2)
N_LINEARS = 7


@contextmanager
def kernels_env(value: str | None):
    old = os.environ.get("MXREWRITE_KERNELS")
    if value is None:
        os.environ.pop("MXREWRITE_KERNELS", None)
    else:
        os.environ["MXREWRITE_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MXREWRITE_KERNELS", None)
        else:
            os.environ["MXREWRITE_KERNELS"] = old


# ---------------------------------------------------------------------------------------------
# Arms


def build_torchao(recipe: str) -> Callable[[nn.Module, torch.Tensor], nn.Module]:
    def build(layer, x):
        # (a copy: it converts in place; on CPU, --smoke, torchao's emulated GEMMs: torch._scaled_mm takes seconds)
        return torchao_float8(copy.deepcopy(layer), recipe, {"emulate": x.device.type == "cpu"})

    return build


def build_bf16(layer, x):
    return layer


@dataclass
class Arm:
    name: str
    kind: str  # bf16 | torchao | mxrewrite-fp8 | mx
    build: Callable[[nn.Module, torch.Tensor], nn.Module]
    kernels: str | None = None  # MXREWRITE_KERNELS while the arm is built, traced and run


def arms(mx_format: str) -> list[Arm]:
    return [
        Arm("bf16", "bf16", build_bf16),
        Arm("torchao float8 tensorwise", "torchao", build_torchao("tensorwise")),
        Arm("torchao float8 rowwise", "torchao", build_torchao("rowwise")),
        Arm("mxrewrite fp8 rmsnorm", "mxrewrite-fp8",
            build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all")),
        Arm("mxrewrite fp8 mxnorm", "mxrewrite-fp8",
            build_mxrewrite(True, format="fp8", norm="mxnorm", linears="all")),
        Arm("mxrewrite fp8 rmsnorm e4m3 grads", "mxrewrite-fp8",
            build_mxrewrite(True, format="fp8", norm="rmsnorm", linears="all", grad_cast="e4m3")),
        Arm(f"{mx_format} rmsnorm+cast (inductor)", "mx", build_mxrewrite(False, format=mx_format, norm="rmsnorm"),
            "reference"),
        Arm(f"{mx_format} rmsnorm+cast (fused kernel)", "mx", build_mxrewrite(False, format=mx_format, norm="rmsnorm")),
        Arm(f"{mx_format} mxnorm+cast (fused kernel)", "mx", build_mxrewrite(False, format=mx_format, norm="mxnorm")),
    ]


def converted_linears(module: nn.Module) -> int:
    """Linears the recipe replaced: any ``nn.Linear`` whose class is not ``nn.Linear`` itself."""
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------


def run_arm(arm: Arm, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, reference: torch.Tensor,
            args) -> tuple[dict, torch.Tensor]:
    """Builds, compiles and times one arm: (its results, its float32 output)."""
    on_gpu = torch.cuda.is_available()
    t_start = time.perf_counter()
    with kernels_env(arm.kernels):
        module = arm.build(layer, x)
        converted = converted_linears(module)
        torch._dynamo.reset()
        compiled = module if args.eager else torch.compile(module, fullgraph=True, dynamic=False)
        inp = x.detach().requires_grad_()

        def step():
            compiled(inp).backward(grad)

        # the first call compiles (forward and backward) and gives the output the error is measured on
        out = compiled(inp)
        out.backward(grad)
        out = out.detach().float()
        if on_gpu:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t_start
        ms = bench_ms(step, args.warmup_ms, args.rep_ms)
        profiled = profile_step(step)
        per_cat, per_kernel = profiled.per_category, profiled.kernels
    module.zero_grad(set_to_none=True)
    layer.zero_grad(set_to_none=True)
    err = rel_l2(out, reference)
    branch_err = rel_l2(out - x.float(), reference - x.float())
    total = sum(per_cat.values())
    del compiled, module
    return dict(arm=arm.name, kind=arm.kind, status="ok", ms=ms, converted_linears=converted,
                rel_err_vs_fp32=err, branch_rel_err_vs_fp32=branch_err, gpu_ms=total, categories=per_cat,
                kernels=per_kernel, compile_and_first_step_s=compile_s), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--format", default="mxfp8", choices=["mxfp8", "nvfp4"], help="format of the MX arms")
    parser.add_argument("--arms", default="", help="comma-separated substrings (e.g. 'torchao,mxrewrite fp8' or "
                        "'mxfp8'): run only the arms whose name contains one (bf16 always runs: the reference)")
    parser.add_argument("--warmup-ms", type=int, default=200)
    parser.add_argument("--rep-ms", type=int, default=2000)
    parser.add_argument("--eager", action="store_true", help="do not compile (debugging only)")
    parser.add_argument("--smoke", action="store_true", help="tiny layer (d 256, 2 x 64 tokens) on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.seq = 128, 64
    elif not torch.cuda.is_available():
        sys.exit("bench_layer needs a CUDA GPU (or --smoke for the CPU check)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    torch.backends.cudnn.allow_tf32 = False

    from tabulate import tabulate

    env = environment(cpu=platform.processor() or platform.machine())
    print(json.dumps(env), flush=True)
    shape = SMOKE if args.smoke else LLAMA3_8B
    torch.manual_seed(0)
    layer = Llama3Layer(**shape, max_seq=max(args.seq, 64)).to(device=device, dtype=torch.bfloat16)
    batch = args.tokens // args.seq
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, args.seq, shape["dim"], device=device, dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(x.shape, device=device, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():  # the same layer, same weights, in float32, on the same input
        layer32 = copy.deepcopy(layer).float()
        reference = layer32(x.float())
        del layer32
    if device == "cuda":
        torch.cuda.empty_cache()

    chosen = select_arms(arms(args.format), args.arms)
    results, outputs = [], {}
    for arm in chosen:
        print(f"--- {arm.name}", flush=True)
        try:
            res, out = run_arm(arm, layer, x, grad, reference, args)
            if arm.kind == "mx" and "rmsnorm" in arm.name:
                outputs[arm.name] = out
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other arms
            res = arm_not_run(arm, exc, device)
        finally:
            layer.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        Path(args.out).mkdir(parents=True, exist_ok=True)  # what is done so far, should the run be cut short
        (Path(args.out) / "bench_layer.json").write_text(json.dumps(
            dict(env=env, tokens=args.tokens, seq=args.seq, shape=shape, mx_format=args.format, results=results,
                 complete=False), indent=2))
        if res["status"] != "ok":
            print(f"{arm.name}: {res['status']}", flush=True)
            continue
        print(f"{arm.name}: {res['ms']:.3f} ms (compile + first step {res['compile_and_first_step_s']:.0f} s), "
              f"{res['converted_linears']} linears converted, rel err vs fp32 {res['rel_err_vs_fp32']:.4f} "
              f"(branches {res['branch_rel_err_vs_fp32']:.4f}), device {res['gpu_ms']:.3f} ms: "
              + ", ".join(f"{c} {res['categories'].get(c, 0.0):.3f}" for c in CATEGORIES), flush=True)
        for kname, kms in res["kernels"][:16]:
            print(f"    {kms:8.3f} ms  [{categorise(kname)}] {kname[:110]}")

    ok = {r["arm"]: r for r in results if r["status"] == "ok"}
    base = ok.get("bf16")
    summary: dict = {}
    mx_rms = [n for n in outputs]
    if len(mx_rms) == 2:
        summary["fused_vs_inductor_rmsnorm_rel_diff"] = rel_l2(outputs[mx_rms[1]], outputs[mx_rms[0]])

    lines = []
    fp8 = [r for r in ok.values() if r["kind"] == "mxrewrite-fp8"]
    tw, rw = ok.get("torchao float8 tensorwise"), ok.get("torchao float8 rowwise")
    if fp8:
        best = min(fp8, key=lambda r: r["ms"])
        summary["best_mxrewrite_fp8"] = best["arm"]
        if tw:
            summary["best_fp8_vs_torchao_tensorwise"] = tw["ms"] / best["ms"]
            lines.append(f"best mxrewrite FP8 arm ({best['arm']}, {best['ms']:.3f} ms) vs torchao tensorwise "
                         f"({tw['ms']:.3f} ms): {best['ms'] - tw['ms']:+.3f} ms, {tw['ms'] / best['ms']:.3f}x "
                         f"({'faster' if best['ms'] < tw['ms'] else 'slower'})")
        targets = {}
        for r in fp8:
            t = {}
            if base:
                t[">= 1.35x bf16"] = (base["ms"] / r["ms"] >= 1.35, f"{base['ms'] / r['ms']:.3f}x")
            if rw:
                t["faster than torchao rowwise"] = (r["ms"] < rw["ms"], f"{r['ms']:.3f} vs {rw['ms']:.3f} ms")
                t["error <= torchao rowwise's"] = (r["rel_err_vs_fp32"] <= rw["rel_err_vs_fp32"],
                                                   f"{r['rel_err_vs_fp32']:.4f} vs {rw['rel_err_vs_fp32']:.4f}")
            targets[r["arm"]] = {k: dict(met=bool(v[0]), value=v[1]) for k, v in t.items()}
            lines.append(f"targets, {r['arm']}: " + "; ".join(
                f"{k}: {'MET' if v[0] else 'NOT MET'} ({v[1]})" for k, v in t.items()))
        summary["targets"] = targets
    else:
        lines.append("no mxrewrite FP8 arm ran: targets not evaluated")

    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["arm"], "-", r["status"][:60], "", "", "", "", "", "", "", ""])
            continue
        c = r["categories"]
        rows.append([r["arm"], f"{r['converted_linears']}/{N_LINEARS}", f"{r['ms']:.3f}",
                     f"{base['ms'] / r['ms']:.3f}x" if base else "-",
                     f"{c.get('norm+cast', 0.0):.3f}", f"{c.get('casts', 0.0):.3f}", f"{c.get('gemm', 0.0):.3f}",
                     f"{c.get('attention', 0.0):.3f}", f"{c.get('other', 0.0):.3f}",
                     f"{r['rel_err_vs_fp32']:.4f}", f"{r['branch_rel_err_vs_fp32']:.4f}"])
    table = tabulate(rows, ["arm", "linears", "fwd+bwd ms", "vs bf16", "norm+cast", "casts", "GEMM", "attention",
                            "other", "rel err vs fp32", "branch rel err"], tablefmt="github")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_layer.json").write_text(json.dumps(
        dict(env=env, tokens=args.tokens, seq=args.seq, shape=shape, mx_format=args.format, results=results,
             summary=summary, complete=True), indent=2))
    (Path(args.out) / "bench_layer_table.md").write_text(table + "\n")

    what = "Llama-3-8B layer (d 4096, ffn 14336, 32/8 heads)" if not args.smoke else f"smoke layer {shape}"
    print(f"\n{what}, {args.tokens} tokens ({batch}x{args.seq}), fwd+bwd, torch.compile"
          f"{' (eager)' if args.eager else ''}; category columns: device ms of one profiled step"
          f"{' (CPU self time: smoke only, not meaningful)' if device == 'cpu' else ''}")
    print(env_line(env))
    print(f"command: {env['command']}")
    if "fused_vs_inductor_rmsnorm_rel_diff" in summary:
        print(f"fused rmsnorm kernel vs inductor rmsnorm+cast outputs: rel diff "
              f"{summary['fused_vs_inductor_rmsnorm_rel_diff']:.2e}")
    for line in lines:
        print(line)
    print(table, flush=True)
    failed = [r["arm"] for r in results if r["status"].startswith("FAILED")]
    if failed:
        sys.exit(f"failed arms: {failed}")
    assert base is None or math.isfinite(base["ms"])


if __name__ == "__main__":
    main()
