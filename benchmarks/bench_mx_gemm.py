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

FP8 section (issue 13; ``--only fp8`` runs it alone): Hopper's native FP8 GEMM with float32
per-tensor scales, as the FP8 recipe runs it. The 21 GEMMs of a Llama-3-8B layer at 16384 tokens:
for each of the 7 linears (q, k, v, o, gate, up, down; weight (N, K)) the forward
``Y = X W^T`` (e4m3 x e4m3, M x N x K), the input gradient ``dX = dY W`` (e5m2 x e4m3, M x K x N)
and the weight gradient ``dW = dY^T X`` (e5m2 x e4m3, N x K x M), each with the operand layouts
``torch._scaled_mm`` requires (A row-major, B column-major: the transposed casts the recipe
writes) and bf16 outputs. Timed, interleaved, same operands: bare ``torch._scaled_mm``,
``mxrewrite.ops.fp8.fp8_matmul`` (same contract through the ``mxrewrite::fp8_mm`` custom op;
"not available" until it lands) and ``torch.mm`` of bf16 operands of the same shapes and layouts.
Reported per GEMM and summed: ms, TFLOP/s and fp8_matmul's throughput relative to bare
``_scaled_mm`` (target >= 95%); fp8_matmul's output is checked bit-equal to ``_scaled_mm``'s.
By default the forward GEMMs use ``use_fast_accum`` and the backward ones do not, as torchao's
float8 training and mxrewrite's FP8 recipe do (``--fp8-fast-accum on|off`` for all 21).

Reproduce on the H100: ``python benchmarks/bench_mx_gemm.py --sweep --out DIR``.
H200, FP8 section only: ``python benchmarks/bench_mx_gemm.py --only fp8 --out DIR``.
CPU check of the FP8 code path at tiny shapes: ``python benchmarks/bench_mx_gemm.py --smoke --out DIR``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# the helpers shared with the other bench scripts: this folder is on sys.path when the script is run, not
# always when it is imported (tests)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import bench_ms, env_line, environment  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# FP8 (Hopper-native, float32 per-tensor scales): the 21 GEMMs of a Llama-3-8B layer

# (name, N = out_features, K = in_features)
FP8_LINEARS = [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
               ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336)]
FP8_SMOKE_LINEARS = [("q", 256, 256), ("k", 64, 256), ("v", 64, 256), ("o", 256, 256),
                     ("gate", 512, 256), ("up", 512, 256), ("down", 256, 512)]
FP8_TARGET = 0.95
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@dataclass(frozen=True)
class FP8Gemm:
    """One GEMM ``out (m, n) = a (m, k) @ b (k, n)``, a row-major, b column-major (``_scaled_mm``'s layouts)."""

    linear: str
    kind: str  # fwd | dgrad | wgrad
    m: int
    n: int
    k: int
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    a_std: float
    b_std: float
    fast_accum: bool = False  # use_fast_accum: no periodic float32 promotion of the accumulator


def fp8_gemms(tokens: int, linears, fast_accum: str = "recipe") -> list[FP8Gemm]:
    """Forward Y = X W^T, input gradient dX = dY W, weight gradient dW = dY^T X of each linear.

    X: activations (e4m3, unit scale), W: weights (e4m3, 0.02), dY: output gradients (e5m2, 1e-3).
    The operand B of each is stored (n, k) row-major and passed transposed: for dgrad that is W^T
    stored row-major, for wgrad X^T: the transposed casts the recipe writes.

    ``fast_accum``: ``"recipe"`` (the forward GEMMs with ``use_fast_accum``, the backward ones without,
    as torchao's float8 training and mxrewrite's FP8 recipe do), ``"on"`` or ``"off"`` for all 21."""
    fwd_fast = fast_accum in ("recipe", "on")
    bwd_fast = fast_accum == "on"
    out = []
    for name, n, k in linears:
        out.append(FP8Gemm(name, "fwd", tokens, n, k, E4M3, E4M3, 1.0, 0.02, fwd_fast))     # X (M,K) @ W^T (K,N)
        out.append(FP8Gemm(name, "dgrad", tokens, k, n, E5M2, E4M3, 1e-3, 0.02, bwd_fast))  # dY (M,N) @ W (N,K)
        out.append(FP8Gemm(name, "wgrad", n, k, tokens, E5M2, E4M3, 1e-3, 1.0, bwd_fast))   # dY^T (N,M) @ X (M,K)
    return out


def _fp8_cast(shape, dtype, std, gen, device):
    """A random (never zero) bf16 tensor cast per tensor as the recipe does: (data, bf16 source, dequant scale)."""
    src = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) * std
    fmax = torch.finfo(dtype).max
    scale = (fmax / src.abs().amax().float().clamp(min=1e-12)).to(torch.float32)
    data = (src.float() * scale).clamp(-fmax, fmax).to(dtype)
    return data, src, scale.reciprocal()


def _median_ms(fn, rep_ms: int) -> float:
    return bench_ms(fn, 25, rep_ms, cpu_runs=5)


def fp8_matmul_or_reason():
    """``(fp8_matmul, takes_fast_accum, "")``, or ``(None, False, why not)``."""
    try:
        from mxrewrite.ops.fp8 import fp8_matmul
    except Exception as exc:  # noqa: BLE001 - not landed yet, or broken: reported, the rest still runs
        return None, False, f"mxrewrite.ops.fp8.fp8_matmul not available: {exc!r}"[:300]
    import inspect

    return fp8_matmul, "fast_accum" in inspect.signature(fp8_matmul).parameters, ""


def run_fp8(tokens: int, linears, rep_ms: int, rounds: int, fast_accum: str) -> dict:
    """Times each of the 21 GEMMs: bare ``_scaled_mm``, ``fp8_matmul`` (rounds interleaved) and bf16 mm."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp8_matmul, takes_fast_accum, missing = fp8_matmul_or_reason()
    if missing:
        print(missing, flush=True)
    elif not takes_fast_accum and fast_accum != "off":
        print("fp8_matmul takes no fast_accum: compared with _scaled_mm without use_fast_accum", flush=True)
        fast_accum = "off"
    rows = []
    for i, g in enumerate(fp8_gemms(tokens, linears, fast_accum)):
        gen = torch.Generator(device=device).manual_seed(1000 + i)
        a, a_src, sa = _fp8_cast((g.m, g.k), g.a_dtype, g.a_std, gen, device)
        b_store, b_src, sb = _fp8_cast((g.n, g.k), g.b_dtype, g.b_std, gen, device)
        b = b_store.t()  # (k, n), column-major
        b_bf16 = b_src.t()
        assert a.is_contiguous() and b.stride() == (1, g.k)

        def scaled():
            return torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=g.fast_accum)

        def ours():
            if takes_fast_accum:
                return fp8_matmul(a, b, sa, sb, torch.bfloat16, fast_accum=g.fast_accum)
            return fp8_matmul(a, b, sa, sb, torch.bfloat16)

        def bf16():
            return torch.mm(a_src, b_bf16)

        ref = scaled()
        row = dict(linear=g.linear, kind=g.kind, m=g.m, n=g.n, k=g.k, a_dtype=str(g.a_dtype).split(".")[-1],
                   b_dtype=str(g.b_dtype).split(".")[-1], fast_accum=g.fast_accum, flop=2.0 * g.m * g.n * g.k)
        if fp8_matmul is not None:
            try:
                got = ours()
                row["bit_equal"] = bool(torch.equal(got, ref))
                row["max_abs_diff"] = (got.float() - ref.float()).abs().max().item()
                row["max_rel_diff"] = row["max_abs_diff"] / max(ref.float().abs().max().item(), 1e-30)
                del got
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"{g.linear} {g.kind}: fp8_matmul FAILED {row['error']}", flush=True)
        del ref
        t_scaled, t_ours = [], []
        for _ in range(rounds):
            t_scaled.append(_median_ms(scaled, rep_ms))
            if fp8_matmul is not None and "error" not in row:
                t_ours.append(_median_ms(ours, rep_ms))
        row["scaled_mm_ms"] = sum(t_scaled) / len(t_scaled)
        row["fp8_matmul_ms"] = sum(t_ours) / len(t_ours) if t_ours else None
        row["bf16_ms"] = _median_ms(bf16, rep_ms)
        rows.append(row)
        ratio = row["scaled_mm_ms"] / row["fp8_matmul_ms"] if row["fp8_matmul_ms"] else None
        print(f"fp8 {g.linear:5s} {g.kind:5s} {g.m:6d}x{g.n:6d}x{g.k:6d} {row['a_dtype']:13s} x {row['b_dtype']:13s} "
              f"scaled_mm {row['scaled_mm_ms']:7.3f} ms ({_tflops(g.m, g.n, g.k, row['scaled_mm_ms']):5.0f} TFLOP/s)  "
              f"fp8_matmul {row['fp8_matmul_ms'] or float('nan'):7.3f} ms "
              f"({'%.1f%%' % (100 * ratio) if ratio else 'n/a'})  bf16 {row['bf16_ms']:7.3f} ms"
              f"{'' if row.get('bit_equal', True) else '  OUTPUT DIFFERS'}", flush=True)
        del a, a_src, b_store, b_src, b, b_bf16
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(tokens=tokens, rounds=rounds, rep_ms=rep_ms, fast_accum=fast_accum, rows=rows,
                fp8_matmul_missing=missing)


def fp8_summary(res: dict) -> tuple[str, dict]:
    """Per-GEMM table and sums (all, and per pass), the ratio and the target verdict."""
    rows = res["rows"]
    have_ours = bool(rows) and all(r.get("fp8_matmul_ms") for r in rows)

    def line(label, sel):
        flop = sum(r["flop"] for r in sel)
        sc, bf = sum(r["scaled_mm_ms"] for r in sel), sum(r["bf16_ms"] for r in sel)
        ours = sum(r["fp8_matmul_ms"] for r in sel) if have_ours else None
        return [label, f"{bf:.3f} ({flop / bf / 1e9:.0f})", f"{sc:.3f} ({flop / sc / 1e9:.0f})",
                f"{ours:.3f} ({flop / ours / 1e9:.0f})" if ours else "n/a",
                f"{100 * sc / ours:.1f}%" if ours else "n/a", f"{bf / sc:.2f}x"], (sc / ours if ours else None)

    table_rows = []
    for r in rows:
        ours = r.get("fp8_matmul_ms")
        table_rows.append([f"{r['linear']} {r['kind']} {r['m']}x{r['n']}x{r['k']} "
                           f"{r['a_dtype'].replace('float8_', '')}x{r['b_dtype'].replace('float8_', '')}"
                           f"{' fast' if r['fast_accum'] else ''}",
                           f"{r['bf16_ms']:.3f} ({r['flop'] / r['bf16_ms'] / 1e9:.0f})",
                           f"{r['scaled_mm_ms']:.3f} ({r['flop'] / r['scaled_mm_ms'] / 1e9:.0f})",
                           f"{ours:.3f} ({r['flop'] / ours / 1e9:.0f})" if ours else r.get("error", "n/a")[:40],
                           f"{100 * r['scaled_mm_ms'] / ours:.1f}%" if ours else "n/a",
                           f"{r['bf16_ms'] / r['scaled_mm_ms']:.2f}x"])
    summary = {}
    for kind in ("fwd", "dgrad", "wgrad"):
        row, ratio = line(f"sum {kind} (7)", [r for r in rows if r["kind"] == kind])
        table_rows.append(row)
        summary[f"ratio_{kind}"] = ratio
    row, ratio = line(f"sum all ({len(rows)})", rows)
    table_rows.append(row)
    summary["ratio_all"] = ratio
    summary["sum_ms"] = {v: sum(r[f"{v}_ms"] for r in rows) if (v != "fp8_matmul" or have_ours) else None
                         for v in ("bf16", "scaled_mm", "fp8_matmul")}
    from tabulate import tabulate

    table = tabulate(table_rows, ["GEMM (m x n x k, A x B)", "bf16 mm ms (TFLOP/s)", "_scaled_mm ms (TFLOP/s)",
                                  "fp8_matmul ms (TFLOP/s)", "fp8_matmul / _scaled_mm", "FP8 speedup vs bf16"],
                     tablefmt="github")
    if ratio is None:
        verdict = f"fp8_matmul vs _scaled_mm: not measured ({res['fp8_matmul_missing'] or 'fp8_matmul failed'})"
    else:
        worst = min(rows, key=lambda r: r["scaled_mm_ms"] / r["fp8_matmul_ms"])
        w = worst["scaled_mm_ms"] / worst["fp8_matmul_ms"]
        met = ratio >= FP8_TARGET
        verdict = (f"fp8_matmul at {100 * ratio:.1f}% of bare _scaled_mm over the {len(rows)} GEMMs "
                   f"(target >= {100 * FP8_TARGET:.0f}%: {'MET' if met else 'NOT MET'}); worst GEMM "
                   f"{worst['linear']} {worst['kind']} {100 * w:.1f}%; outputs bit-equal to _scaled_mm: "
                   f"{all(r.get('bit_equal', False) for r in rows)}")
        summary["target_met"] = met
    summary["verdict"] = verdict
    return table, summary


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
    parser.add_argument("--only", choices=["all", "mx", "fp8"], default="all",
                        help="run the MX sections, the FP8 section, or both (default)")
    parser.add_argument("--sweep", action="store_true", help="also time the fixed tile list on the q/o shape")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    parser.add_argument("--fp8-rounds", type=int, default=2,
                        help="interleaved rounds of _scaled_mm / fp8_matmul timings per GEMM (mean of medians)")
    parser.add_argument("--fp8-fast-accum", choices=["recipe", "on", "off"], default="recipe",
                        help="use_fast_accum of the FP8 GEMMs: forward only as the recipes do (default), all, none")
    parser.add_argument("--compile-workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="FP8 section at tiny shapes (64 tokens), CPU is fine")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_mx_gemm needs a CUDA GPU (or --smoke for the CPU check of the FP8 section)")
    run_mx = args.only in ("all", "mx") and torch.cuda.is_available()
    run_fp8_section = args.only in ("all", "fp8")
    if args.only in ("all", "mx") and not torch.cuda.is_available():
        print("MX sections skipped: they need CUDA (Triton kernels)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(json.dumps(env), flush=True)

    table = None
    if run_mx:
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

    fp8_table = None
    if run_fp8_section:
        tokens, linears = (64, FP8_SMOKE_LINEARS) if args.smoke else (M_TOKENS, FP8_LINEARS)
        print(f"\nFP8 GEMMs, {tokens} tokens", flush=True)
        res = run_fp8(tokens, linears, 20 if args.smoke else args.rep_ms, args.fp8_rounds, args.fp8_fast_accum)
        fp8_table, summary = fp8_summary(res)
        with open(os.path.join(args.out, "fp8_gemm_results.json"), "w") as f:
            json.dump({"environment": env, **res, "summary": summary}, f, indent=1)
        with open(os.path.join(args.out, "fp8_gemm_table.md"), "w") as f:
            f.write(fp8_table + "\n\n" + summary["verdict"] + "\n")

    print(f"\n{env_line(env)}, CUDA {env.get('cuda', '-')}")
    print(f"command: {env['command']}")
    if table:
        print("\nMX GEMMs: TFLOP/s, median of do_bench")
        print(table)
    if fp8_table:
        print(f"\nFP8 GEMMs of a Llama-3-8B layer{' (smoke shapes)' if args.smoke else ''}, {tokens} tokens, "
              f"bf16 outputs, per-tensor float32 scales, use_fast_accum {res['fast_accum']} ('fast': on); "
              f"ms (TFLOP/s), median of do_bench"
              f"{', CPU wall clock: not meaningful' if not torch.cuda.is_available() else ''}")
        print(fp8_table)
        print(summary["verdict"], flush=True)


if __name__ == "__main__":
    main()
