"""A Llama-3-8B-shaped transformer layer, forward + backward under torch.compile, with and without MXNorm.

Arms (same layer, same weights, same input; every arm compiled with
``torch.compile(fullgraph=True, dynamic=False)``):

* ``bf16``: the layer as written, no MX (a reference point);
* ``rmsnorm+cast (inductor)``: ``optimize(norm="rmsnorm")`` with the norm-cast op
  run as PyTorch ops (``MXREWRITE_KERNELS=reference``), so Inductor fuses RMSNorm
  and the MX cast itself - the paper's baseline "RMSNorm then cast, torch.compile";
* ``rmsnorm+cast (fused kernel)``: the same rewrite with our fused Triton kernel;
* ``mxnorm+cast (fused kernel)``: ``optimize(norm="mxnorm")``, MXNorm p=2.

All MX arms use the same MX linears for q, k, v, gate and up (o and down stay
bf16 in every arm: no norm feeds them). Reported: median fwd+bwd time
(triton.testing.do_bench), and from one profiled step the GPU time by kernel
category: norm+cast (the activation casts and the norm backward: our kernels by
name, Inductor's by the norm ops in their names), the weight and gradient MX
casts Inductor generates, the GEMMs (with the Hopper dequantisation), attention.

    python benchmarks/bench_layer.py --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# Inductor's caches key on the captured graph, which is the same for the two rmsnorm arms (the
# MXREWRITE_KERNELS switch acts when the ops are traced): a cached arm would replay the other one.
os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


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


OUR_NORM_KERNELS = ("_norm_cast_kernel", "_rms_norm_backward_kernel")
# Inductor names a generated kernel after the ops it fuses: its RMSNorm (bf16 arm) and the rho of
# RMSNorm + cast (reference arm) carry these; the weight and gradient casts feed block_scaled_mm.
INDUCTOR_NORM_PATTERNS = ("rms_norm", "sqrt", "mean")
# the reference norm backward (rho*g - rho**3 * x * <g, x> / D), as Inductor fuses it
INDUCTOR_NORM_BACKWARD_OPS = ("sum", "sub", "div")
GEMM_PATTERNS = ("gemm", "cutlass", "sm90", "xmma", "_dequantize_kernel", "nvjet")
ATTENTION_PATTERNS = ("flash", "fmha", "attention", "sdpa")


def categorise(name: str) -> str:
    low = name.lower()
    inductor = low.startswith("triton_")
    if any(p in name for p in OUR_NORM_KERNELS) or (inductor and any(p in low for p in INDUCTOR_NORM_PATTERNS)):
        return "norm+cast"
    if inductor and "block_scaled_mm" not in low and all(p in low for p in INDUCTOR_NORM_BACKWARD_OPS):
        return "norm+cast"
    if any(p in low for p in ATTENTION_PATTERNS):
        return "attention"
    if any(p in low for p in GEMM_PATTERNS):
        return "gemm"
    if inductor and "block_scaled_mm" in low:
        return "weight/grad casts"
    return "other"


def profile_step(step) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """GPU time (ms) per category, and per kernel (largest first), of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + evt.device_time / 1e3
    per_cat: dict[str, float] = {}
    for name, ms in per_kernel.items():
        per_cat[categorise(name)] = per_cat.get(categorise(name), 0.0) + ms
    return per_cat, sorted(per_kernel.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--format", default="mxfp8", choices=["mxfp8", "nvfp4"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer needs a CUDA GPU")

    import triton
    from tabulate import tabulate

    import mxrewrite

    torch.manual_seed(0)
    layer = Llama3Layer().cuda().to(torch.bfloat16)
    batch = args.tokens // args.seq
    x = torch.randn(batch, args.seq, 4096, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    arms = [
        ("bf16", None, None),
        ("rmsnorm+cast (inductor)", "rmsnorm", "reference"),
        ("rmsnorm+cast (fused kernel)", "rmsnorm", None),
        ("mxnorm+cast (fused kernel)", "mxnorm", None),
    ]
    results, outputs = [], {}
    with torch.no_grad():
        reference = layer(x).float()
    for name, norm, kernels in arms:
        with kernels_env(kernels):
            module = layer if norm is None else mxrewrite.optimize(layer, (x,), format=args.format, norm=norm,
                                                                 progress=False)
            torch._dynamo.reset()
            compiled = torch.compile(module, fullgraph=True, dynamic=False)
            inp = x.detach().requires_grad_()

            def step():
                compiled(inp).backward(grad)

            with torch.no_grad():
                out = compiled(x).float()
            outputs[name] = out
            ms = triton.testing.do_bench(step, warmup=200, rep=2000, return_mode="median")
            per_cat, per_kernel = profile_step(step)
        layer.zero_grad(set_to_none=True)
        rel = ((out - reference).norm() / reference.norm()).item()
        total = sum(per_cat.values())
        results.append(dict(arm=name, ms=ms, rel_err_vs_bf16=rel, gpu_ms=total, categories=per_cat, kernels=per_kernel))
        print(f"{name}: {ms:.3f} ms, GPU {total:.3f} ms: "
              + ", ".join(f"{cat} {t:.3f}" for cat, t in sorted(per_cat.items())), flush=True)
        for kname, kms in per_kernel[:16]:
            print(f"    {kms:8.3f} ms  [{categorise(kname)}] {kname[:110]}")

    same_math = (outputs["rmsnorm+cast (fused kernel)"] - outputs["rmsnorm+cast (inductor)"]).norm() / \
        outputs["rmsnorm+cast (inductor)"].norm()
    base = results[1]["ms"]
    device = torch.cuda.get_device_name()
    env = f"{device}, torch {torch.__version__}, triton {triton.__version__}"
    rows = [[r["arm"], f"{r['ms']:.3f}", f"{base / r['ms']:.3f}x",
             f"{r['categories'].get('norm+cast', 0.0):.3f}",
             f"{100 * r['categories'].get('norm+cast', 0.0) / r['gpu_ms']:.1f}%",
             f"{r['categories'].get('weight/grad casts', 0.0):.3f}", f"{r['categories'].get('gemm', 0.0):.3f}",
             f"{r['rel_err_vs_bf16']:.4f}"]
            for r in results]
    table = tabulate(rows, ["arm", "fwd+bwd ms", "vs inductor baseline", "norm+cast ms", "norm+cast share",
                            "weight/grad casts ms", "GEMM ms", "rel err vs bf16"], tablefmt="github")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_layer.json").write_text(json.dumps(
        dict(env=env, tokens=args.tokens, seq=args.seq, format=args.format, results=results,
             fused_vs_inductor_rmsnorm_rel_diff=same_math.item()), indent=2))
    print(f"\nLlama-3-8B layer (d 4096, ffn 14336, 32/8 heads), {args.tokens} tokens ({batch}x{args.seq}), "
          f"{args.format}, {env}")
    print(f"fused rmsnorm kernel vs inductor rmsnorm+cast outputs: rel diff {same_math.item():.2e}")
    print(table)
    assert math.isfinite(results[-1]["ms"])


if __name__ == "__main__":
    main()
