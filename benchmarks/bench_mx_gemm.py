"""Throughput of the MX linear's GEMM on Hopper: the fused Triton kernel against cuBLAS bf16 and emulation.

For the Llama-3-8B linear shapes at M = 16384 tokens, in MXFP8 (e4m3 x e4m3),
the MX backward pair (e5m2 x e4m3) and NVFP4, this times (median of
``triton.testing.do_bench``, one process, baselines measured in the same run):

* ``bf16 mm``: ``torch.mm`` of bfloat16 operands (cuBLAS), the reference rate;
* ``emulated``: ``block_scaled_mm(backend="emulated")`` (dequantise in torch ops, then bf16 mm);
* ``fused dequant``: :func:`triton_block_scaled_mm`, dequantising in the GEMM prologue (autotuned);
* ``fused dot_scaled``: the same with ``tl.dot_scaled`` (MX formats only);
* ``materialize``: ``method="materialize"``, :func:`triton_dequantize` of both operands then
  cuBLAS with a float32 output: the materialising alternative done well (one read of the
  bytes, one bf16 write per operand); ``dequantize A+B`` times that first half alone.

Small token counts (16, 256, 2048) are timed too for the q/o and gate/up shapes,
to see where materialising stops paying.

Each fused result is checked in the same run against a float64 product of the
same operands (error within ``K * 2**-23 * (|A| @ |B|^T)``, see
``tests/ops/kernels/test_mx_gemm.py``) and against the emulated backend
(relative Frobenius error). The operand A of every shape is at least 64 MiB, larger
than the 50 MB L2, so inputs are not rotated.

``--sweep`` also times a list of fixed tiles for the fused kernel on the q/o shape, to
choose the autotuner's short list. Kernels are compiled up front in parallel
worker processes (Triton's disk cache is shared), which keeps the run short.

Reproduce on the H100: ``python benchmarks/bench_mx_gemm.py --sweep --out DIR``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

M_TOKENS = 16384
SMALL_M = (16, 256, 2048)
LLAMA3_8B_LINEARS = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
# name -> (format, A element dtype, B element dtype)
FORMATS = {
    "mxfp8": ("mxfp8", torch.float8_e4m3fn, torch.float8_e4m3fn),
    "mx-e5m2xe4m3": ("mxfp8", torch.float8_e5m2, torch.float8_e4m3fn),
    "nvfp4": ("nvfp4", None, None),
}
SWEEP = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), fused dequant kernel only
    (128, 128, 64, 3, 4),
    (128, 128, 64, 2, 4),
    (128, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 3, 4),
    (64, 128, 64, 3, 4),
    (128, 256, 64, 3, 8),
    (128, 256, 128, 2, 8),
]


@dataclass(frozen=True)
class Timing:
    shape: str
    m: int
    n: int
    k: int
    fmt: str
    variant: str
    ms: float
    tflops: float
    config: str = ""


@dataclass(frozen=True)
class Check:
    shape: str
    fmt: str
    variant: str
    max_err_over_bound: float
    rel_err_vs_emulated: float
    ok: bool


def _tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def _operands(fmt_name: str, m: int, n: int, k: int, seed: int):
    from mxrewrite.ops.matmul import quantize_matrix

    fmt, elem_a, elem_b = FORMATS[fmt_name]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    return quantize_matrix(x, fmt, elem_dtype=elem_a), quantize_matrix(w, fmt, elem_dtype=elem_b)


def _check(out: torch.Tensor, a, b, emulated: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref64| / bound, ||out - emulated|| / ||emulated||), in row chunks to bound memory."""
    from mxrewrite.ops.matmul import dequantize_matrix

    da = dequantize_matrix(a, torch.float64, with_tensor_scale=False)
    db = dequantize_matrix(b, torch.float64, with_tensor_scale=False)
    tscale = float(a.tensor_scale) * float(b.tensor_scale)
    k = da.shape[1]
    worst = 0.0
    for rows in torch.split(torch.arange(da.shape[0], device=da.device), 4096):
        ref = (da[rows] @ db.t()) * tscale
        bound = k * 2.0**-23 * (da[rows].abs() @ db.abs().t()) * tscale + 1e-30
        worst = max(worst, ((out[rows].double() - ref).abs() / bound).max().item())
        del ref, bound
    rel = ((out - emulated.float()).norm() / emulated.float().norm()).item()
    return worst, rel


def _label(method: str) -> str:
    return "materialize" if method == "materialize" else f"fused {method}"


def _config_str(cfg) -> str:
    if cfg is None:
        return ""
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} w{cfg.num_warps}"


# ---------------------------------------------------------------------------------------------
# Parallel precompilation


def _compile_one(task) -> str:
    """Compile one kernel variant (worker process): Triton's disk cache keeps it for the main process."""
    method, a_elem, b_elem, scale_block, has_ts, n, k, cfg = task
    from mxrewrite.ops.kernels import mx_gemm

    u8 = torch.empty(64, dtype=torch.uint8, device="cuda")
    f32 = torch.empty(64, dtype=torch.float32, device="cuda")
    per_byte = 2 if a_elem == 2 else 1
    args = (u8, u8, u8, u8, f32, f32, M_TOKENS, n, k, M_TOKENS,
            k // per_byte, k // scale_block, k // per_byte, k // scale_block, n)
    if method == "dequant":
        kwargs = dict(A_ELEM=a_elem, B_ELEM=b_elem, SCALE_BLOCK=scale_block, HAS_TENSOR_SCALE=has_ts,
                      INTERPRETED=False, E2M1_SHIFT=mx_gemm._E2M1_GEMM_SHIFT if a_elem == 2 else 0,
                      A_PACK=mx_gemm._A_OPERAND_PACK)
    else:
        kwargs = dict(A_FORMAT=mx_gemm._DOT_SCALED_FORMATS[a_elem], B_FORMAT=mx_gemm._DOT_SCALED_FORMATS[b_elem],
                      HAS_TENSOR_SCALE=False)
    bm, bn, bk, stages, warps = cfg
    t0 = time.perf_counter()
    try:
        mx_gemm._KERNELS[method].warmup(*args, grid=(1,), **kwargs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                        num_stages=stages, num_warps=warps)
    except Exception as exc:  # noqa: BLE001 - reported, the timed run will show the same failure
        return f"{task}: FAILED {exc!r}"[:400]
    return f"{task}: {time.perf_counter() - t0:.1f}s"


def precompile(workers: int, sweep: bool) -> None:
    from mxrewrite.ops.kernels import mx_gemm

    tuned = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
             for c in mx_gemm._configs()]
    combos = [("dequant", 0, 0, 32, False), ("dequant", 1, 0, 32, False), ("dequant", 2, 2, 16, True),
              ("dot_scaled", 0, 0, 32, False), ("dot_scaled", 1, 0, 32, False)]
    tasks = {(*combo, 4096, 4096, cfg) for combo in combos for cfg in tuned}
    if sweep:
        tasks |= {(*combo, 4096, 4096, cfg) for combo in combos
                  if combo[0] == "dequant" and combo[1] == combo[2] for cfg in SWEEP}
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for line in pool.map(_compile_one, sorted(tasks)):
            if "FAILED" in line:
                print("precompile:", line, flush=True)
    print(f"precompiled {len(tasks)} kernels with {workers} workers in {time.perf_counter() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------


def run(sweep: bool, rep_ms: int) -> tuple[list[Timing], list[Timing], list[Check]]:
    import triton

    from mxrewrite.ops.kernels import mx_gemm
    from mxrewrite.ops.kernels.mx_gemm import TileConfig, triton_block_scaled_mm, triton_dequantize
    from mxrewrite.ops.matmul import block_scaled_mm

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")

    timings: list[Timing] = []
    checks: list[Check] = []
    m = M_TOKENS
    for shape, n, k in LLAMA3_8B_LINEARS:
        gen = torch.Generator(device="cuda").manual_seed(n + k)
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        ms = bench(lambda: torch.mm(xb, wb.t()))
        timings.append(Timing(shape, m, n, k, "bf16", "bf16 mm", ms, _tflops(m, n, k, ms)))
        del xb, wb
        for fmt_name in FORMATS:
            a, b = _operands(fmt_name, m, n, k, seed=n * 7 + k)
            emulated = block_scaled_mm(a, b, backend="emulated")
            ms = bench(lambda: block_scaled_mm(a, b, backend="emulated"))
            timings.append(Timing(shape, m, n, k, fmt_name, "emulated", ms, _tflops(m, n, k, ms)))

            ms = bench(lambda: (triton_dequantize(a), triton_dequantize(b)))
            moved = a.data.numel() + a.scales.numel() + b.data.numel() + b.scales.numel() + 2 * (m + n) * k
            timings.append(Timing(shape, m, n, k, fmt_name, "dequantize A+B", ms, 0.0,
                                  f"{moved / ms / 1e9:.2f} TB/s"))
            methods = ["dequant"] + (["dot_scaled"] if fmt_name != "nvfp4" else []) + ["materialize"]
            for method in methods:
                try:
                    out = triton_block_scaled_mm(a, b, method=method)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                    print(f"{shape} {fmt_name} {method}: FAILED {exc!r}"[:600], flush=True)
                    continue
                worst, rel = _check(out, a, b, emulated)
                ok = worst <= 1.0 and rel < 4e-3
                checks.append(Check(shape, fmt_name, method, worst, rel, ok))
                del out
                ms = bench(lambda method=method: triton_block_scaled_mm(a, b, method=method))
                cfg = _config_str(mx_gemm.last_tuned_config(method)) if method != "materialize" else ""
                timings.append(Timing(shape, m, n, k, fmt_name, _label(method), ms, _tflops(m, n, k, ms), cfg))
                print(f"{shape:8s} {fmt_name:13s} {_label(method):17s} {ms:7.3f} ms "
                      f"{_tflops(m, n, k, ms):6.0f} TFLOP/s "
                      f"[{cfg}] err/bound {worst:.3f} rel-vs-emulated {rel:.2e}", flush=True)
            del a, b, emulated
            torch.cuda.empty_cache()

    # Small token counts (decode, short sequences): where does materialising stop paying?
    for shape, n, k in (LLAMA3_8B_LINEARS[0], LLAMA3_8B_LINEARS[2]):
        for m_small in SMALL_M:
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            xb = torch.randn(m_small, k, device="cuda", dtype=torch.bfloat16)
            ms = bench(lambda: torch.mm(xb, wb.t()))
            timings.append(Timing(shape, m_small, n, k, "bf16", "bf16 mm", ms, _tflops(m_small, n, k, ms)))
            for fmt_name in ("mxfp8", "nvfp4"):
                a, b = _operands(fmt_name, m_small, n, k, seed=3)
                for method in ("dequant", "materialize"):
                    ms = bench(lambda method=method: triton_block_scaled_mm(a, b, method=method))
                    cfg = _config_str(mx_gemm.last_tuned_config(method)) if method == "dequant" else ""
                    timings.append(Timing(shape, m_small, n, k, fmt_name, _label(method), ms,
                                          _tflops(m_small, n, k, ms), cfg))

    sweep_rows: list[Timing] = []
    if sweep:
        shape, n, k = LLAMA3_8B_LINEARS[0]
        for fmt_name, method in [("mxfp8", "dequant"), ("nvfp4", "dequant")]:
            a, b = _operands(fmt_name, m, n, k, seed=1)
            for bm, bn, bk, stages, warps in SWEEP:
                cfg = TileConfig(bm, bn, bk, num_stages=stages, num_warps=warps)
                try:
                    ms = bench(lambda cfg=cfg: triton_block_scaled_mm(a, b, method=method, config=cfg))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
                    print(f"sweep {fmt_name} {method} {_config_str(cfg)}: FAILED {type(exc).__name__}", flush=True)
                    continue
                sweep_rows.append(Timing(shape, m, n, k, fmt_name, f"fused {method}", ms, _tflops(m, n, k, ms),
                                         _config_str(cfg)))
            del a, b
    return timings, sweep_rows, checks


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def markdown(timings: list[Timing]) -> str:
    """Short table: TFLOP/s per shape and format, and the fused kernel's ratio to bf16 cuBLAS."""
    by = {(t.shape, t.fmt, t.variant): t for t in timings if t.m == M_TOKENS}
    lines = ["| shape (M=16384) | format | bf16 mm | emulated | fused dequant | fused dot_scaled | materialize | "
             "fused / bf16 mm | fused / emulated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, _, _ in LLAMA3_8B_LINEARS:
        base = by[(shape, "bf16", "bf16 mm")].tflops
        for fmt_name in FORMATS:
            def cell(variant):
                t = by.get((shape, fmt_name, variant))
                return (f"{t.tflops:.0f}", t.tflops) if t else ("-", 0.0)

            emu, deq, dsc, mat = (cell(v) for v in ("emulated", "fused dequant", "fused dot_scaled", "materialize"))
            best = max(deq[1], dsc[1])
            lines.append(f"| {shape} | {fmt_name} | {base:.0f} | {emu[0]} | {deq[0]} | {dsc[0]} | {mat[0]} | "
                         f"{best / base:.2f} | {best / emu[1] if emu[1] else math.nan:.1f}x |")
    small = sorted({(t.shape, t.m) for t in timings if t.m != M_TOKENS}, key=lambda x: (x[0], x[1]))
    if small:
        allm = {(t.shape, t.m, t.fmt, t.variant): t for t in timings}
        lines += ["", "| shape | M | bf16 mm | mxfp8 fused | mxfp8 materialize | nvfp4 fused | nvfp4 materialize |",
                  "|---|---|---|---|---|---|---|"]
        for shape, m in small:
            vals = [allm.get((shape, m, f, v)) for f, v in [("bf16", "bf16 mm"), ("mxfp8", "fused dequant"),
                                                           ("mxfp8", "materialize"), ("nvfp4", "fused dequant"),
                                                           ("nvfp4", "materialize")]]
            lines.append(f"| {shape} | {m} | " + " | ".join(f"{t.tflops:.0f}" if t else "-" for t in vals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the full results")
    parser.add_argument("--sweep", action="store_true", help="also time the fixed tile list on the q/o shape")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    parser.add_argument("--compile-workers", type=int, default=min(12, os.cpu_count() or 1))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mx_gemm needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(json.dumps(env), flush=True)
    if args.compile_workers > 1:
        precompile(args.compile_workers, args.sweep)
    timings, sweep_rows, checks = run(args.sweep, args.rep_ms)
    with open(os.path.join(args.out, "mx_gemm_results.json"), "w") as f:
        json.dump({"environment": env, "timings": [asdict(t) for t in timings],
                   "sweep": [asdict(t) for t in sweep_rows], "checks": [asdict(c) for c in checks]}, f, indent=1)
    table = markdown(timings)
    with open(os.path.join(args.out, "mx_gemm_table.md"), "w") as f:
        f.write(table + "\n")
    print("\nall timings:")
    for t in timings:
        print(f"  {t.shape:8s} M={t.m:<6d} {t.fmt:13s} {t.variant:17s} {t.ms:8.3f} ms {t.tflops:6.0f} TFLOP/s  "
              f"{t.config}")
    if sweep_rows:
        print("\nsweep (q/o shape):")
        for t in sorted(sweep_rows, key=lambda t: (t.fmt, t.variant, t.ms)):
            print(f"  {t.fmt:8s} {t.variant:17s} {t.config:22s} {t.ms:7.3f} ms {t.tflops:6.0f} TFLOP/s")
    print("\nchecks:", "all ok" if all(c.ok for c in checks) else "FAILURES")
    for c in checks:
        if not c.ok:
            print("  FAILED", c)
    print(f"\n{env['device']} (sm_{env['capability']}), {env['date_utc']} UTC, torch {env['torch']}, "
          f"CUDA {env['cuda']}, triton {env['triton']}; TFLOP/s, median of do_bench")
    print(table)


if __name__ == "__main__":
    main()
