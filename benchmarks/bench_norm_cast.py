"""The fused norm + MXFP8/NVFP4 cast against torch.compile of RMSNorm + torchao's cast, and the bandwidth floor.

For M in {4096, 16384, 65536} tokens and D in {2048, 4096, 5120, 8192, 14336,
16384}, bf16 input, this times (one process, one run):

MXFP8
* ``baseline``: ``torch.compile(rms_norm(x, w) -> torchao to_mx(rceil))``, the paper's baseline;
* ``to_mx``: ``torch.compile(to_mx(x))`` alone: the cast without any norm;
* ``mxnorm``: our kernel, MXNorm p=2 (the gain is folded into the next weight, MXNORM.md);
* ``rmsnorm``: our kernel, exact RMSNorm with the gain, fused with the cast.

NVFP4 likewise, against torchao's ``nvfp4_quantize`` with the dynamic per-tensor
scale of its NVFP4 recipe (``per_tensor_amax_to_scale(amax(y))``); ours uses the
static per-tensor scale that the norm's output bound allows.

The floor is the fewest bytes the fused op must move (read x, write data, block
scales and rho) over the device-to-device copy bandwidth measured in the same run.
Each baseline is compiled afresh for each shape (``torch._dynamo.reset()``,
``dynamic=False``). Times are medians over replays of a CUDA graph holding many
calls, each call on the next of several input buffers (together at least 4x the
L2 cache), so no launch overhead and no L2 reuse flatter small shapes. Every
variant is checked in the same run on sampled rows: ours bit for bit against
``norm_cast_reference`` (rmsnorm: rho within 2 ulp, data against the reference
cast of ``x * rho``), the baselines by their dequantised error against an fp32
RMSNorm.

``--sweep`` times our kernel over launch configurations (rows per program,
warps, chunk) instead, rmsnorm with the gain as above, to choose
:func:`mxrewrite.ops.kernels.norm_cast.launch_config`.

Reproduce on the H100 (torchao and tabulate installed, as wheels there: ../shared/GPU.md):
``python benchmarks/bench_norm_cast.py --out DIR`` (``--formats mxfp8`` or ``nvfp4`` to split the run).
The short table prints last; full results go to ``DIR/norm_cast.json`` and ``DIR/norm_cast.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

M_SIZES = (4096, 16384, 65536)
D_SIZES = (2048, 4096, 5120, 8192, 14336, 16384)
EPS = 1e-6
L2_BYTES = 50 * 2**20
CHECK_ROWS = 96  # sampled rows per variant for the correctness checks (first, middle, last)
GRAPH_TARGET_MS = 8.0
REPLAYS = 15
TARGETS = {  # (fmt, variant): minimum fraction of the floor (issue 4)
    ("mxfp8", "mxnorm"): 0.90,
    ("mxfp8", "rmsnorm"): 0.85,
    ("nvfp4", "mxnorm"): 0.80,
    ("nvfp4", "rmsnorm"): 0.80,
}
SPEEDUP_TARGET = 1.5  # MXFP8 mxnorm over the baseline where M*D >= 64M
# tried by --sweep: rows held in registers, (elements per program, warps), 8 to 64 elements per thread ...
SWEEP_POINTS = [(4096, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16)]
# ... and the two-loop variant, (rows per program, warps, elements per chunk)
SWEEP_CHUNKED = [(1, 4, 2048), (1, 8, 4096), (2, 8, 2048), (2, 4, 1024), (2, 8, 1024), (4, 8, 1024)]


@dataclass(frozen=True)
class Result:
    fmt: str
    m: int
    d: int
    variant: str
    us: float
    floor_us: float
    check: str
    config: str = ""

    @property
    def of_floor(self) -> float:
        return self.floor_us / self.us if self.us > 0 else float("nan")


# ---------------------------------------------------------------- timing

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_us(fn, inputs: list[torch.Tensor]) -> float:
    """Median time of one call: CUDA graph of many calls on rotating inputs, replayed ``REPLAYS`` times."""
    if not torch.cuda.is_available():  # dry run on CPU: wall clock of a few calls
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        return (time.perf_counter() - start) / len(inputs) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs:  # warm-up (compiles, allocator)
            fn(x)
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(2 * len(inputs)):
            fn(inputs[i % len(inputs)])
        end.record()
        sync()
    estimate_ms = start.elapsed_time(end) / (2 * len(inputs))
    calls = int(min(400, max(2 * len(inputs), GRAPH_TARGET_MS / max(estimate_ms, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(inputs[i % len(inputs)])
    graph.replay()
    sync()
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written.

    The faster of ``copy_`` (a memcpy) and an elementwise kernel (``torch.neg``) over 1 GiB:
    inside a CUDA graph the memcpy node can run below what a kernel reaches.
    """
    n = 2**29 if torch.cuda.is_available() else 2**22  # 1 GiB of bf16
    src = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    us = min(time_us(lambda s: dst.copy_(s), [src]), time_us(lambda s: torch.neg(s, out=dst), [src]))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def floor_bytes(fmt: str, m: int, d: int, in_bytes: int = 2) -> int:
    from mxrewrite.formats import get_format

    spec = get_format(fmt)
    return m * d * in_bytes + int(m * spec.bytes_per_row(d)) + m * 4  # x, data + scales, rho


def rotating_inputs(m: int, d: int, seed: int) -> list[torch.Tensor]:
    """Random bf16 inputs (rows at different scales, never zeros), enough to cover 4x the L2 cache."""
    nbytes = m * d * 2
    count = max(2, min(8, math.ceil(4 * L2_BYTES / nbytes)))
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 2**34
    count = max(1, min(count, int(free * 0.4) // nbytes))
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for _ in range(count):
        row_scale = torch.exp2(torch.randint(-4, 5, (m, 1), generator=g, device=DEVICE).float())
        x = (torch.randn(m, d, generator=g, device=DEVICE) + 0.1) * row_scale
        out.append(x.to(torch.bfloat16))
    return out


# ---------------------------------------------------------------- variants

def variants(fmt: str, d: int, gain: torch.Tensor) -> dict[str, tuple[object, bool]]:
    """name -> (function of x, compile it?)."""
    import torchao.prototype.mx_formats.nvfp4_tensor as ao_nvfp4
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    from mxrewrite.ops import gaussian_correction, norm_cast, norm_constant

    block = 32 if fmt == "mxfp8" else 16
    eps, c = norm_constant(EPS, gain.device), norm_constant(gaussian_correction(2, block), gain.device)

    def ours_mxnorm(x):
        return norm_cast(x, None, eps, c, fmt, "mxnorm", 2, "rceil", True)

    def ours_rmsnorm(x):
        return norm_cast(x, gain, eps, c, fmt, "rmsnorm", 2, "rceil", True)

    if fmt == "mxfp8":
        def cast(y):
            scale, data = to_mx(y, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
            return data, scale
    else:
        def cast(y):
            tensor_scale = ao_nvfp4.per_tensor_amax_to_scale(y.abs().amax().float())
            scales, packed = ao_nvfp4.nvfp4_quantize(y, 16, tensor_scale)
            return packed, scales, tensor_scale

    def baseline(x):
        return cast(F.rms_norm(x, (d,), gain, EPS))

    return {
        "baseline": (baseline, True),
        "cast alone": (cast, True),
        "mxnorm": (ours_mxnorm, False),
        "rmsnorm": (ours_rmsnorm, False),
    }


# ---------------------------------------------------------------- checks

def sample_rows(m: int) -> torch.Tensor:
    k = CHECK_ROWS // 3
    idx = torch.cat([torch.arange(k), torch.arange(m // 2, m // 2 + k), torch.arange(m - k, m)])
    return idx.clamp(max=m - 1).unique()


def check_ours(fmt: str, norm: str, x: torch.Tensor, gain: torch.Tensor | None, out) -> str:
    """Bit-exact check of our outputs on sampled rows against the reference evaluated on CPU."""
    from mxrewrite.formats import get_format, mx_quantize, nvfp4_quantize
    from mxrewrite.ops import gaussian_correction
    from mxrewrite.ops.reference import norm_cast_reference

    spec = get_format(fmt)
    data, scales, rho, tscale = out
    rows = sample_rows(x.shape[0])
    xs = x[rows.to(x.device)].cpu()
    g = gain.cpu() if gain is not None else None
    ref = norm_cast_reference(xs, g, fmt=fmt, norm=norm, p=2, scale_mode="rceil", eps=EPS,
                              correction=gaussian_correction(2, spec.block_size))
    rho_s = rho[rows.to(rho.device)].cpu()
    bits = lambda t: t.view(torch.int32).long()  # noqa: E731
    ulp = (bits(rho_s) - bits(ref[2])).abs().max().item()
    if norm == "mxnorm" and ulp != 0 or ulp > 2:
        return f"FAIL rho {ulp} ulp"
    if not torch.equal(tscale.cpu(), ref[3]):
        return "FAIL tensor scale"
    xhat = xs.float() * rho_s.unsqueeze(-1)
    if g is not None:
        xhat = xhat * g.float()
    if spec.tensor_scale:
        want_data, want_scales, _ = nvfp4_quantize(xhat, ref[3])
    else:
        want_data, want_scales = mx_quantize(xhat, scale_mode="rceil")
    for name, got, want in (("data", data, want_data), ("scales", scales, want_scales)):
        got = got[rows.to(got.device)].cpu()
        if not torch.equal(got, want.view(torch.uint8)):
            return f"FAIL {name}: {(got != want.view(torch.uint8)).sum().item()} bytes differ"
    return f"bit-exact ({len(rows)} rows, rho {ulp} ulp)"


def check_baseline(fmt: str, x: torch.Tensor, gain: torch.Tensor | None, out) -> str:
    """Relative Frobenius error of the dequantised cast against fp32 RMSNorm (or x) on sampled rows."""
    from mxrewrite.formats import mx_dequantize, nvfp4_dequantize

    rows = sample_rows(x.shape[0]).to(x.device)
    xs = x[rows].float()
    want = F.rms_norm(xs, (x.shape[-1],), gain.float(), EPS) if gain is not None else xs
    if fmt == "mxfp8":
        data, scale = out
        got = mx_dequantize(data[rows].contiguous(), scale.reshape(x.shape[0], -1)[rows].contiguous())
    else:
        packed, scales, tensor_scale = out
        got = nvfp4_dequantize(packed.view(torch.uint8)[rows].contiguous(),
                               scales.reshape(x.shape[0], -1)[rows].contiguous(), tensor_scale)
    err = ((got - want).norm() / want.norm()).item()
    bound = 0.05 if fmt == "mxfp8" else 0.15
    return f"{'ok' if err < bound else 'FAIL'} rel. error {err:.3g}"


# ---------------------------------------------------------------- runs

def bench_gain(d: int) -> torch.Tensor:
    """The RMSNorm weight of every timed rmsnorm: bf16 around 1."""
    return (torch.randn(d, device=DEVICE) * 0.2 + 1.0).to(torch.bfloat16)


def run_shape(fmt: str, m: int, d: int, bandwidth: float, log) -> list[Result]:
    torch._dynamo.reset()
    inputs = rotating_inputs(m, d, seed=m + d)
    gain = bench_gain(d)
    floor_us = floor_bytes(fmt, m, d) / bandwidth * 1e6
    results = []
    for name, (fn, compile_it) in variants(fmt, d, gain).items():
        try:
            f = torch.compile(fn, fullgraph=True, dynamic=False) if compile_it else fn
            out = f(inputs[0])
            if name in ("mxnorm", "rmsnorm"):
                check = check_ours(fmt, name, inputs[0], gain if name == "rmsnorm" else None, out)
            else:
                check = check_baseline(fmt, inputs[0], gain if name == "baseline" else None, out)
            del out
            us = time_us(f, inputs)
        except Exception as exc:  # keep the other variants' numbers
            log(f"  {fmt} {m}x{d} {name}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
            us, check = float("nan"), f"ERROR {type(exc).__name__}"
        results.append(Result(fmt, m, d, name, us, floor_us, check))
        log(f"  {fmt} {m:>6}x{d:<6} {name:<11} {us:9.1f} us  floor {floor_us:8.1f} us  {check}")
    del inputs
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def run_sweep(fmts, shapes, norms, bandwidth: float, log) -> list[Result]:
    from mxrewrite.formats import get_format
    from mxrewrite.ops import gaussian_correction, norm_constant
    from mxrewrite.ops.kernels.norm_cast import LaunchConfig, chunk_blocks_for, launch_config, norm_cast_triton

    results = []
    eps = norm_constant(EPS, DEVICE)
    for fmt in fmts:
        block = get_format(fmt).block_size
        c = norm_constant(gaussian_correction(2, block), DEVICE)
        for m, d in shapes:
            inputs = rotating_inputs(m, d, seed=1)
            floor_us = floor_bytes(fmt, m, d) / bandwidth * 1e6
            padded = triton_next_pow2(d)
            configs = [LaunchConfig(e // padded, w) for e, w in SWEEP_POINTS if padded <= e <= 8 * padded]
            configs += [LaunchConfig(r, w, chunk_blocks_for(d // block, chunk // block))
                        for r, w, chunk in SWEEP_CHUNKED if chunk < d]
            for norm in norms:
                gain = bench_gain(d) if norm == "rmsnorm" else None
                for cfg in [None, *configs]:
                    chosen = cfg or launch_config(d, m, fmt, has_gain=gain is not None)

                    def fn(x, cfg=chosen, norm=norm, gain=gain):
                        return norm_cast_triton(x, gain, fmt=fmt, norm=norm, p=2, scale_mode="rceil", eps=eps,
                                                correction=c, launch_cfg=cfg)

                    try:
                        us = time_us(fn, inputs)
                    except Exception as exc:
                        us = float("nan")
                        log(f"  sweep {fmt} {norm} {m}x{d} {chosen}: {type(exc).__name__}: {str(exc)[:300]}")
                    label = (f"rows={chosen.rows_per_program} warps={chosen.num_warps} chunk={chosen.chunk_blocks}"
                             + (" (default)" if cfg is None else ""))
                    results.append(Result(fmt, m, d, norm, us, floor_us, "", label))
                    log(f"  sweep {fmt} {norm:<8} {m:>6}x{d:<6} {label:<38} {us:8.1f} us  "
                        f"{floor_us / us:6.1%} of floor")
            del inputs
    return results


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def environment() -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
    }
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        pass
    return env


def summary_table(results: list[Result]) -> str:
    """One line per (fmt, M, D): times, % of floor, speedup over the baseline; targets marked."""
    from tabulate import tabulate

    rows = []
    keys = sorted({(r.fmt, r.m, r.d) for r in results}, key=lambda k: (k[0], k[1], k[2]))
    by = {(r.fmt, r.m, r.d, r.variant): r for r in results}
    for fmt, m, d in keys:
        base = by.get((fmt, m, d, "baseline"))
        line = [fmt, m, d, f"{by[(fmt, m, d, 'mxnorm')].floor_us:.1f}"]
        for v in ("baseline", "cast alone", "mxnorm", "rmsnorm"):
            r = by.get((fmt, m, d, v))
            line.append(f"{r.us:.1f}" if r else "-")
        for v in ("mxnorm", "rmsnorm"):
            r = by.get((fmt, m, d, v))
            if r is None:
                line += ["-", "-"]
                continue
            target = TARGETS[(fmt, v)]
            mark = "" if r.of_floor >= target else " (miss)"
            line.append(f"{r.of_floor:.0%}{mark}")
            speedup = base.us / r.us if base else float("nan")
            speedup_target = fmt == "mxfp8" and v == "mxnorm" and m * d >= 64 * 2**20
            smark = " (miss)" if speedup_target and speedup < SPEEDUP_TARGET else ""
            line.append(f"{speedup:.2f}x{smark}")
        bad = [r.variant for r in results
               if (r.fmt, r.m, r.d) == (fmt, m, d) and not r.check.startswith(("ok", "bit-exact"))]
        line.append("ok" if not bad else "FAIL " + ",".join(bad))
        rows.append(line)
    headers = ["fmt", "M", "D", "floor us", "baseline us", "cast alone us", "mxnorm us", "rmsnorm us",
               "mxnorm %floor", "mxnorm speedup", "rmsnorm %floor", "rmsnorm speedup", "checks"]
    return tabulate(rows, headers=headers, tablefmt="github")


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["mxfp8", "nvfp4"], choices=["mxfp8", "nvfp4"])
    parser.add_argument("--m", nargs="+", type=int, default=list(M_SIZES))
    parser.add_argument("--d", nargs="+", type=int, default=list(D_SIZES))
    parser.add_argument("--sweep", action="store_true", help="time launch configurations of our kernel instead")
    parser.add_argument("--norms", nargs="+", default=["mxnorm", "rmsnorm"], help="norms --sweep times")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for norm_cast.json / .md")
    args = parser.parse_args()
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "norm_cast_log.txt")
    log_file = open(log_path, "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    env = environment()
    log(f"environment: {env}")
    bandwidth = copy_bandwidth()
    log(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s (read + write)")
    env["copy_TBps"] = round(bandwidth / 1e12, 4)

    shapes = [(m, d) for m in args.m for d in args.d]
    stem = "norm_cast_sweep" if args.sweep else "norm_cast"

    def save(results: list[Result]) -> None:
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump({"environment": env, "results": [asdict(r) | {"of_floor": r.of_floor} for r in results]}, f,
                      indent=1)

    if args.sweep:
        results = run_sweep(args.formats, shapes, args.norms, bandwidth, log)
    else:
        results = []
        for fmt in args.formats:
            for m, d in shapes:
                results.extend(run_shape(fmt, m, d, bandwidth, log))
                save(results)  # a run cut short keeps what it measured
    save(results)
    if not args.sweep:
        table = summary_table(results)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(f"environment: {json.dumps(env)}\n\n{table}\n")
        print("\n" + table)


DEVICE = "cuda"

if __name__ == "__main__":
    main()
