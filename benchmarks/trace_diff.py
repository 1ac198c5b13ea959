"""Where one profiled step spends time that another does not: two Chrome traces compared, on this machine.

``bench_distributed.py --profile`` writes rank 0's trace of each arm's profiled step (``trace-<arm>.json.gz``).
A step slower than its kernels add up to, or slower than a recipe doing the same GEMMs, loses its time in
one of three places, and this script tells them apart without another GPU run:

* the GPU waits: gaps on the busiest (compute) stream, each with the host operator or region that was
  running when the gap began (a host that fell behind: FSDP2's hooks, a sync);
* more kernels, or slower ones: device time per kernel name in both traces, largest differences first;
* other streams (FSDP2's all-gather copy-in and copy-out, reduce-scatter): busy time per stream.

Usage::

    python benchmarks/trace_diff.py trace-mxrewrite-fp8-rmsnorm.json.gz trace-mxrewrite-fp8-all-gather-rmsnorm.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation")


@dataclass(frozen=True)
class Span:
    name: str
    start: float   # µs
    end: float     # µs


@dataclass(frozen=True)
class Trace:
    """The GPU work (per stream) and the host's operators and regions of one profiled step."""

    streams: dict[int, list[Span]]
    host: list[Span]

    @property
    def compute_stream(self) -> int:
        """The stream with the most device time."""
        return max(self.streams, key=lambda s: busy_us(self.streams[s]))


def load(path: str | Path) -> Trace:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    streams: dict[int, list[Span]] = defaultdict(list)
    host = []
    for e in events:
        if e.get("ph") != "X":
            continue
        span = Span(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        if e.get("cat") in KERNEL_CATEGORIES:
            streams[int(e.get("args", {}).get("stream", -1))].append(span)
        elif e.get("cat") in HOST_CATEGORIES:
            host.append(span)
    for spans in streams.values():
        spans.sort(key=lambda s: s.start)
    host.sort(key=lambda s: s.start)
    return Trace(dict(streams), host)


def busy_us(spans: list[Span]) -> float:
    """The time at least one of ``spans`` runs (their union's length)."""
    total, end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end > end:
            total += s.end - max(s.start, end)
            end = s.end
    return total


def gaps(spans: list[Span], min_us: float) -> list[tuple[float, float]]:
    """``(start, length)`` of every idle interval of at least ``min_us`` between the first and last span."""
    out, end = [], None
    for s in sorted(spans, key=lambda s: s.start):
        if end is not None and s.start - end >= min_us:
            out.append((end, s.start - end))
        end = s.end if end is None else max(end, s.end)
    return out


def host_at(trace: Trace, t: float) -> str:
    """The host operators and regions running at time ``t``, outermost first ("-" if none)."""
    running = sorted((s for s in trace.host if s.start <= t < s.end), key=lambda s: s.start - s.end)
    return " > ".join(s.name for s in running) or "-"


def per_kernel_ms(trace: Trace) -> dict[str, float]:
    ms: dict[str, float] = defaultdict(float)
    for spans in trace.streams.values():
        for s in spans:
            ms[s.name] += (s.end - s.start) / 1e3
    return ms


def report(a: Trace, b: Trace, names: tuple[str, str], top: int = 20, min_gap_us: float = 50.0) -> str:
    from tabulate import tabulate

    lines = []
    rows = []
    for label, t in zip(names, (a, b)):
        spans = [s for ss in t.streams.values() for s in ss]
        step = (max(s.end for s in spans) - min(s.start for s in spans)) / 1e3 if spans else 0.0
        compute = t.streams[t.compute_stream] if t.streams else []
        idle = sum(length for _, length in gaps(compute, min_gap_us)) / 1e3
        per_stream = "; ".join(f"{s}: {busy_us(ss) / 1e3:.2f} ms, {len(ss)} kernels"
                               for s, ss in sorted(t.streams.items()))
        rows.append([label, f"{step:.2f}", f"{busy_us(compute) / 1e3:.2f}", f"{idle:.2f}", per_stream])
    lines += [tabulate(rows, ["trace", "step ms (first kernel to last)", "compute stream busy ms",
                              f"its gaps >= {min_gap_us:.0f} µs, ms", "each stream: busy, kernels"],
                       tablefmt="github", disable_numparse=True), ""]
    for label, t in zip(names, (a, b)):
        if not t.streams:
            continue
        largest = sorted(gaps(t.streams[t.compute_stream], min_gap_us), key=lambda g: -g[1])[:top]
        lines += [f"Largest gaps on the compute stream, {label}", "",
                  tabulate([[f"{length / 1e3:.2f}", host_at(t, start)[-120:]] for start, length in largest],
                           ["ms", "host when the gap began"], tablefmt="github", disable_numparse=True), ""]
    ka, kb = per_kernel_ms(a), per_kernel_ms(b)
    diff = sorted(set(ka) | set(kb), key=lambda n: -abs(kb.get(n, 0.0) - ka.get(n, 0.0)))[:top]
    lines += [f"Kernels by device time, largest differences first (total {sum(ka.values()):.1f} vs "
              f"{sum(kb.values()):.1f} ms)", "",
              tabulate([[n[:100], f"{ka.get(n, 0.0):.2f}", f"{kb.get(n, 0.0):.2f}",
                         f"{kb.get(n, 0.0) - ka.get(n, 0.0):+.2f}"] for n in diff],
                       ["kernel", names[0][:30], names[1][:30], "difference"], tablefmt="github",
                       disable_numparse=True), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the baseline's trace (.json or .json.gz)")
    parser.add_argument("b", help="the trace compared with it")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--min-gap-us", type=float, default=50.0, help="shortest idle interval counted")
    args = parser.parse_args(argv)
    a, b = load(args.a), load(args.b)
    if not (a.streams and b.streams):
        raise SystemExit("a trace without GPU kernels: compare the traces of a GPU run (bench_distributed.py "
                         "--profile on CUDA; on CPU it profiles operators only)")
    print(report(a, b, (Path(args.a).name, Path(args.b).name), args.top, args.min_gap_us))


if __name__ == "__main__":
    main()
