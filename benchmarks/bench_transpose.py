"""The FP8 norm cast's transposed copy: our tiled kernel against Inductor's and eager ``t().contiguous()``.

The weight gradient of every linear a rewritten norm feeds reads the norm's FP8
cast transposed (``mxrewrite::transpose_bytes``). This times, for one-byte
``[M, D]`` inputs (the norm's output of M tokens; and weights):

* ``eager``: ``x.t().contiguous()``;
* ``inductor``: ``torch.compile`` of ``x.reshape(-1, D).t().contiguous()`` from a ``[M/2048, 2048, D]``
  input, the pattern Inductor compiled into ``triton_poi_fused_clone_t_view`` in the layer's backward;
* ``ours bB wW``: :func:`mxrewrite.ops.kernels.transpose.transpose_triton`, tile B x B, W warps.

Times are medians of CUDA-graph replays over rotating inputs (at least 4x the L2 cache;
``bench_norm_cast.time_us``); GB/s counts bytes read plus written; "% copy" is that over the
device-to-device copy rate measured in the same run. Every result is checked equal to eager.

Reproduce on the GPU (tabulate installed): ``python benchmarks/bench_transpose.py --out DIR``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from tabulate import tabulate

from bench_common import env_line, environment, write_report
from bench_norm_cast import L2_BYTES, copy_bandwidth, time_us

SHAPES = ((16384, 4096), (16384, 5120), (65536, 4096), (16384, 8192), (14336, 4096), (4096, 14336))
CONFIGS = ((32, 2), (64, 4), (64, 8), (128, 4), (128, 8))
SEQ = 2048


def rotating_bytes(m: int, d: int) -> list[torch.Tensor]:
    count = max(2, min(8, math.ceil(4 * L2_BYTES / (m * d))))
    return [torch.randint(0, 256, (m, d), dtype=torch.uint8, device="cuda") for _ in range(count)]


def arms(d: int) -> dict[str, object]:
    from mxrewrite.ops.kernels.transpose import TransposeConfig, transpose_triton

    inductor = torch.compile(lambda x: x.reshape(-1, d).t().contiguous(), fullgraph=True, dynamic=False)
    out = {"eager": lambda x: x.t().contiguous(),
           "inductor": lambda x: inductor(x.view(-1, SEQ, d) if x.shape[0] % SEQ == 0 else x)}
    for block, warps in CONFIGS:
        out[f"ours b{block} w{warps}"] = lambda x, c=TransposeConfig(block, warps): transpose_triton(x, c)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for transpose.json / .md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_transpose.py times CUDA kernels: run it on a machine with a GPU")
    env = environment()
    bandwidth = copy_bandwidth()
    print(f"{env_line(env, ('triton',))}; device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for m, d in SHAPES:
        inputs = rotating_bytes(m, d)
        for name, fn in arms(d).items():
            ok = all(torch.equal(fn(x), x.t().contiguous()) for x in inputs[:2])
            us = time_us(fn, inputs)
            gbps = 2 * m * d / (us * 1e-6) / 1e9
            rows.append(dict(m=m, d=d, arm=name, us=round(us, 2), gbps=round(gbps), of_copy=gbps * 1e9 / bandwidth,
                             check="equal" if ok else "DIFFERS"))
            print(f"{m}x{d} {name}: {us:.1f} us, {gbps:.0f} GB/s, {rows[-1]['check']}", flush=True)
    table = tabulate([[r["m"], r["d"], r["arm"], r["us"], r["gbps"], f"{r['of_copy']:.0%}", r["check"]]
                      for r in rows], headers=["M", "D", "arm", "us", "GB/s", "% copy", "check"], tablefmt="github")
    write_report(args.out, "transpose", {"environment": env, "copy_GBps": bandwidth / 1e9, "results": rows},
                 f"{env_line(env, ('triton',))}; copy {bandwidth / 1e9:.0f} GB/s", table)


if __name__ == "__main__":
    main()
