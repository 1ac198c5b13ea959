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
(triton.testing.do_bench), and from one profiled step the GPU time in norm+cast
kernels (forward casts and the norm backward) and its share of the layer.

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

import torch
import torch.nn as nn
import torch.nn.functional as F


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


NORM_CAST_PATTERNS = ("norm_cast", "norm_backward")  # our kernels' names
INDUCTOR_NORM_PATTERNS = ("rsqrt", "amax")  # Inductor's fused RMSNorm / cast kernels carry these op names
GEMM_PATTERNS = ("gemm", "cutlass", "sm90", "xmma", "mx_gemm", "_mm_", "matmul", "nvjet")
ATTENTION_PATTERNS = ("flash", "fmha", "attention", "sdpa")


def categorise(name: str) -> str:
    low = name.lower()
    if any(p in low for p in NORM_CAST_PATTERNS) or any(p in low for p in INDUCTOR_NORM_PATTERNS):
        return "norm+cast"
    if any(p in low for p in ATTENTION_PATTERNS):
        return "attention"
    if any(p in low for p in GEMM_PATTERNS):
        return "gemm"
    return "other"


def profile_step(step) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """GPU time (ms) per category and the top kernels of one step."""
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
    return per_cat, sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]


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
            per_cat, top = profile_step(step)
        layer.zero_grad(set_to_none=True)
        rel = ((out - reference).norm() / reference.norm()).item()
        total = sum(per_cat.values())
        results.append(dict(arm=name, ms=ms, rel_err_vs_bf16=rel, gpu_ms=total, categories=per_cat, top=top))
        print(f"{name}: {ms:.3f} ms, norm+cast {per_cat.get('norm+cast', 0.0):.3f} ms of {total:.3f} ms GPU, "
              f"rel err vs bf16 {rel:.4f}", flush=True)
        for kname, kms in top:
            print(f"    {kms:8.3f} ms  [{categorise(kname)}] {kname[:110]}")

    same_math = (outputs["rmsnorm+cast (fused kernel)"] - outputs["rmsnorm+cast (inductor)"]).norm() / \
        outputs["rmsnorm+cast (inductor)"].norm()
    base = results[1]["ms"]
    device = torch.cuda.get_device_name()
    env = f"{device}, torch {torch.__version__}, triton {triton.__version__}"
    rows = [[r["arm"], f"{r['ms']:.3f}", f"{base / r['ms']:.3f}x",
             f"{r['categories'].get('norm+cast', 0.0):.3f}",
             f"{100 * r['categories'].get('norm+cast', 0.0) / r['gpu_ms']:.1f}%", f"{r['rel_err_vs_bf16']:.4f}"]
            for r in results]
    table = tabulate(rows, ["arm", "fwd+bwd ms", "vs inductor baseline", "norm+cast ms", "norm+cast share",
                            "rel err vs bf16"], tablefmt="github")
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
