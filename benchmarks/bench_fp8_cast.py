"""FSDP2's FP8 all-gather cast of a weight shard: our one-pass kernel against eager PyTorch and Inductor.

Before each gather every FP8-gathered weight shard is cast with its (precomputed)
scale, ``saturate(t * scale)`` in float8_e4m3fn (``mxrewrite::fp8_cast``), outside
the compiled layers. This times, for the weight shapes of the 1.1B Llama of
``bench_distributed.py`` in float32 (FSDP2's sharded master weights) and bfloat16:

* ``eager``: :func:`mxrewrite.formats.fp8.fp8_cast` (product, clamp, conversion: three kernels);
* ``inductor``: ``torch.compile`` of the same function (one fused kernel);
* ``ours bB wW``: :func:`mxrewrite.ops.kernels.fp8_cast.fp8_cast_triton`, B elements a program, W warps.

Times are medians of CUDA-graph replays over rotating inputs (``bench_norm_cast.time_us``);
GB/s counts bytes read plus written; "% copy" is that over the device-to-device copy rate
measured in the same run. Every result is checked equal to eager's bytes.

Reproduce on the GPU (tabulate installed): ``python benchmarks/bench_fp8_cast.py --out DIR``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from tabulate import tabulate

from bench_common import allow_recompiles, env_line, environment, write_report
from bench_norm_cast import L2_BYTES, copy_bandwidth, time_us

SHAPES = ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192))  # q/o, k/v, gate/up, down
DTYPES = (torch.float32, torch.bfloat16)
CONFIGS = ((1024, 4), (4096, 8), (8192, 8))
SCALE = 2.0 ** 12


def rotating_weights(shape: tuple[int, int], dtype: torch.dtype) -> list[torch.Tensor]:
    nbytes = math.prod(shape) * dtype.itemsize
    count = max(2, min(8, math.ceil(4 * L2_BYTES / nbytes)))
    return [(torch.randn(shape, device="cuda") * 0.02).to(dtype) for _ in range(count)]


def arms() -> dict[str, object]:
    from mxrewrite.formats.fp8 import fp8_cast
    from mxrewrite.ops.kernels.fp8_cast import Fp8CastConfig, fp8_cast_triton

    scale = torch.tensor(SCALE, device="cuda")
    compiled = torch.compile(fp8_cast, fullgraph=True, dynamic=False)
    out = {"eager": lambda t: fp8_cast(t, scale), "inductor": lambda t: compiled(t, scale)}
    for block, warps in CONFIGS:
        out[f"ours b{block} w{warps}"] = lambda t, c=Fp8CastConfig(block, warps): fp8_cast_triton(t, scale, c)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fp8_cast.json / .md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_cast.py times CUDA kernels: run it on a machine with a GPU")
    allow_recompiles()  # the inductor arm compiles the same function once per shape and dtype
    env = environment()
    bandwidth = copy_bandwidth()
    print(f"{env_line(env, ('triton',))}; device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES:
            inputs = rotating_weights(shape, dtype)
            fns = arms()
            want = [fns["eager"](t).view(torch.uint8) for t in inputs[:2]]
            for name, fn in fns.items():
                ok = all(torch.equal(fn(t).view(torch.uint8), w) for t, w in zip(inputs, want))
                us = time_us(fn, inputs)
                gbps = math.prod(shape) * (dtype.itemsize + 1) / (us * 1e-6) / 1e9
                rows.append(dict(shape=list(shape), dtype=str(dtype).removeprefix("torch."), arm=name,
                                 us=round(us, 2), gbps=round(gbps), of_copy=gbps * 1e9 / bandwidth,
                                 check="equal" if ok else "DIFFERS"))
                print(f"{shape} {dtype} {name}: {us:.1f} us, {gbps:.0f} GB/s, {rows[-1]['check']}", flush=True)
    table = tabulate([[f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], r["arm"], r["us"], r["gbps"],
                       f"{r['of_copy']:.0%}", r["check"]] for r in rows],
                     headers=["shape", "dtype", "arm", "us", "GB/s", "% copy", "check"], tablefmt="github")
    write_report(args.out, "fp8_cast", {"environment": env, "copy_GBps": bandwidth / 1e9, "results": rows},
                 f"{env_line(env, ('triton',))}; copy {bandwidth / 1e9:.0f} GB/s", table)


if __name__ == "__main__":
    main()
