"""Where a GPU step's time goes: each CUDA kernel of one profiled step, by name and by category.

Shared by the benchmarks that report a step's time per kernel category (``bench_layer.py``) or its largest
kernels (``bench_distributed.py --profile``). Categories come from kernel names (Inductor names a generated
kernel after the ops it fuses; cuBLAS, CUTLASS, flash attention and our Triton kernels by their own names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# Our norm-cast kernels (MX and FP8) and the norm backward, by name.
OUR_NORM_KERNELS = ("norm_cast", "rms_norm_backward", "rmsnorm_backward", "mxnorm", "_gain_tensor_scale")
# Inductor names a generated kernel after the ops it fuses: its RMSNorm (bf16 and torchao arms, where
# the activation's amax/cast is fused into it) and the rho of RMSNorm + cast (reference arm) carry these.
INDUCTOR_NORM_PATTERNS = ("rms_norm", "sqrt", "mean")
# the reference norm backward (rho*g - rho**3 * x * <g, x> / D), as Inductor fuses it
INDUCTOR_NORM_BACKWARD_OPS = ("sum", "sub", "div")
# cuBLAS / cuBLASLt (nvjet: Hopper's FP8 and bf16 GEMMs), CUTLASS (torch's rowwise-scaled FP8 GEMM),
# Inductor GEMM templates, and our Hopper MX dequantisation before cuBLAS (counted with its GEMM).
GEMM_PATTERNS = ("gemm", "cutlass", "sm90", "xmma", "nvjet", "cublas", "splitk", "f8f8bf16", "scaled_mm",
                 "_dequantize_kernel", "mx_gemm")
ATTENTION_PATTERNS = ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn")
# Casts outside the norm: weight and gradient casts (MX or FP8), the own-input casts of o and down
# under linears="all", their amax reductions and transposed copies: Inductor's (named after the ops
# and the mx_linear/fp8 ops it traced) and ours (Triton, by name).
CAST_PATTERNS = ("amax", "abs_max", "float8", "fp8", "e4m3", "e5m2", "quant", "cast", "block_scaled_mm",
                 "scale", "to_mx", "clamp", "reciprocal")


def categorise(name: str) -> str:
    """The kernel category of a CUDA kernel name: norm+cast, attention, gemm, casts or other.

    * norm+cast: the norm (forward, fused with the activation cast where the recipe does) and its backward;
    * attention: flash / memory-efficient / cuDNN attention, forward and backward;
    * gemm: every matmul (bf16, FP8 ``_scaled_mm``, the MX emulated GEMM with its dequantisation);
    * casts: every other cast to a low-precision format (weights, gradients, unnormed activations),
      with its amax reduction and transposes;
    * other: elementwise (RoPE, SiLU * up, residual adds, bf16 copies), memset/memcpy.
    """
    low = name.lower()
    inductor = low.startswith("triton_")
    if any(p in low for p in OUR_NORM_KERNELS):
        return "norm+cast"
    if any(p in low for p in ATTENTION_PATTERNS):  # (Inductor's kernels around SDPA too: layout copies)
        return "attention"
    if inductor and low.startswith("triton_tem"):
        return "gemm"
    if not inductor and any(p in low for p in GEMM_PATTERNS):
        return "gemm"
    if inductor and any(p in low for p in INDUCTOR_NORM_PATTERNS):
        return "norm+cast"
    if any(p in low for p in CAST_PATTERNS):
        return "casts"
    if inductor and all(p in low for p in INDUCTOR_NORM_BACKWARD_OPS):
        return "norm+cast"
    return "other"


CATEGORIES = ("norm+cast", "casts", "gemm", "attention", "other")


@dataclass(frozen=True)
class StepProfile:
    """One profiled step: device ms per kernel category and per kernel (largest first), and the host's CPU
    operators and labelled regions (FSDP2's hooks, autograd) by self ms, largest first (empty unless asked)."""

    per_category: dict[str, float]
    kernels: list[tuple[str, float]]
    host: list[tuple[str, float]] = field(default_factory=list)


def profile_step(step, trace: str | None = None, host: bool = False) -> StepProfile:
    """Profile one call of ``step``. ``trace``: also write its Chrome trace there (``.json.gz``: compressed).
    ``host``: also time the host side, for a step whose kernels add up to less than its wall clock.

    On CPU (``--smoke``) the kernels are the operators' self CPU time, only to exercise the path."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if cuda else []
    if host or not cuda:
        activities.append(ProfilerActivity.CPU)
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    per_kernel: dict[str, float] = {}
    per_host: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CPU:
            per_host[evt.name] = per_host.get(evt.name, 0.0) + evt.self_cpu_time_total / 1e3
            if cuda:
                continue
            ms = evt.self_cpu_time_total / 1e3
        elif evt.device_type == torch.autograd.DeviceType.CUDA:
            ms = evt.device_time / 1e3
        else:
            continue
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + ms
    per_cat: dict[str, float] = {}
    for name, ms in per_kernel.items():
        per_cat[categorise(name)] = per_cat.get(categorise(name), 0.0) + ms
    return StepProfile(per_cat, _largest_first(per_kernel), _largest_first(per_host) if host else [])


def _largest_first(ms: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(ms.items(), key=lambda kv: -kv[1])
