"""Accuracy of the FP8 (and MXFP8) training recipes on a Llama-3-8B layer, forward and backward, against float32.

The layer of bench_layer.py (same shapes, same construction), bf16 weights, ``--tokens`` tokens of a
standard normal input and a standard normal output gradient (``--heavy-tails``: 8 input channels 30 times
larger and a Student-t output gradient, the outliers trained models show; ``--gains spread``: the norms' gains
log-normal with 8 channels 10 times larger instead of ones, synthetic), run eagerly (no compile: every arm runs
its casts and GEMMs as written). Against the same layer in float32 on the same bf16 values it reports
the relative L2 error of:

* the residual branches (output minus input: the residual stream passes through exactly and would hide
  the branches' errors; bench_layer's "branch rel err"),
* the input gradient, and the seven weight gradients (their mean relative error).

Arms: bf16; torchao float8 tensorwise, tensorwise with power-of-two scales (``round_scales_to_power_of_2``),
rowwise (all 7 linears); mxrewrite ``format="fp8", linears="all"`` with exact RMSNorm and with MXNorm (its
error includes MXNorm's estimate, which is not RMSNorm: compare it with the rmsnorm arm for the casts; and
calibrated on the measured input, ``rescale="calibrated"``), and
with exact RMSNorm and e4m3 gradients (``grad_cast="e4m3"``) (both norms apply the gain in their cast, with
a static scale set by max|g|: ``--gains spread`` is its test); for comparison the MXFP8 recipe
on all 7 linears
(blocks of 32 with power-of-two scales; e5m2 or e4m3 gradients);
on a GPU also mxrewrite rmsnorm with the forward GEMMs accumulating exactly (no fast accumulation).
On CPU the FP8 GEMMs are emulated exactly (dequantised operands, float32 products): the casts' error
alone; on the GPU ``torch._scaled_mm`` adds its accumulation.

    python benchmarks/fp8_error.py --out OUT_DIR                 # CPU or GPU, 1024 tokens, seeds 0 and 7
    python benchmarks/fp8_error.py --smoke --out /tmp/x          # tiny layer: checks the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import arm_not_run, env_line, environment, select_arms, torchao_float8  # noqa: E402
from bench_layer import LLAMA3_8B, SMOKE, Arm, Llama3Layer  # noqa: E402

LINEARS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def _torchao(recipe: str, **overrides):
    return lambda layer, example: torchao_float8(layer, recipe, overrides)


def _mxrewrite(norm: str, grad_cast: str = "mx", fmt: str = "fp8", rescale: str = "gaussian", **options):
    def build(layer, example):
        import mxrewrite

        return mxrewrite.optimize(layer, (example,), format=fmt, norm=norm, linears="all", grad_cast=grad_cast,
                                  rescale=rescale, progress=False, **options)

    return build


@contextlib.contextmanager
def _exact_accumulation():
    from mxrewrite.modules import functions

    saved = functions.FAST_ACCUM_FORWARD
    functions.FAST_ACCUM_FORWARD = False
    try:
        yield
    finally:
        functions.FAST_ACCUM_FORWARD = saved


ARMS = [
    Arm("bf16", "bf16", lambda layer, example: layer),
    Arm("torchao float8 tensorwise", "torchao", _torchao("tensorwise")),
    Arm("torchao float8 tensorwise, power-of-two scales", "torchao",
        _torchao("tensorwise", round_scales_to_power_of_2=True)),
    Arm("torchao float8 rowwise", "torchao", _torchao("rowwise")),
    Arm("mxrewrite fp8 rmsnorm", "mxrewrite-fp8", _mxrewrite("rmsnorm")),
    Arm("mxrewrite fp8 mxnorm", "mxrewrite-fp8", _mxrewrite("mxnorm")),
    Arm("mxrewrite fp8 mxnorm, calibrated", "mxrewrite-fp8", _mxrewrite("mxnorm", rescale="calibrated")),
    Arm("mxrewrite fp8 rmsnorm, e4m3 gradients", "mxrewrite-fp8", _mxrewrite("rmsnorm", "e4m3")),
    Arm("mxrewrite mxfp8 rmsnorm", "mxrewrite-mx", _mxrewrite("rmsnorm", fmt="mxfp8")),
    Arm("mxrewrite mxfp8 rmsnorm, e4m3 gradients", "mxrewrite-mx", _mxrewrite("rmsnorm", "e4m3", fmt="mxfp8")),
    Arm("mxrewrite fp8 rmsnorm, exact accumulation", "mxrewrite-fp8-exact", _mxrewrite("rmsnorm")),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _run(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out.to(y.dtype))
    grads = {name: getattr(layer, name).weight.grad for name in LINEARS}
    return (y - x).detach(), x.grad, grads


def measure(arm: Arm, base: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, reference: tuple) -> dict:
    layer = arm.build(copy.deepcopy(base), x)
    exact = _exact_accumulation() if arm.kind == "mxrewrite-fp8-exact" else contextlib.nullcontext()
    with exact:
        branch, grad_x, grads = _run(layer, x, grad_out)
    ref_branch, ref_grad_x, ref_grads = reference
    weight_errs = {name: _rel(grads[name], ref_grads[name]) for name in LINEARS}
    return dict(arm=arm.name, status="ok", branch_err=_rel(branch, ref_branch), grad_x_err=_rel(grad_x, ref_grad_x),
                grad_w_err_mean=statistics.mean(weight_errs.values()), grad_w_err=weight_errs)


@torch.no_grad()
def spread_gains(layer: nn.Module, gen: torch.Generator) -> None:
    """Spread-out norm gains (synthetic): log-normal, median 1, sigma 0.5, and 8 channels (not the input's
    outlier channels) 10 times larger, which sets the static scale of a cast of x_hat * g."""
    for norm in (layer.attention_norm, layer.ffn_norm):
        dim = norm.weight.numel()
        gains = torch.exp(0.5 * torch.randn(dim, generator=gen))
        gains[dim // 16:: dim // 8] *= 10.0
        norm.weight.copy_(gains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seeds", default="0,7", help="comma-separated: weights from seed s, input from s + 1")
    parser.add_argument("--arms", default="", help="comma-separated substrings of the arm names (bf16 always runs)")
    parser.add_argument("--heavy-tails", action="store_true",
                        help="outliers as trained models have them: 8 input channels x 30, and a Student-t (3 dof) "
                        "output gradient, instead of standard normal input and gradient")
    parser.add_argument("--gains", choices=["ones", "spread"], default="ones",
                        help="the two norms' gains: ones (as initialised), or spread out (synthetic): "
                        "log-normal (median 1, sigma 0.5) with 8 channels 10 times larger")
    parser.add_argument("--smoke", action="store_true", help="tiny layer (d 256), 64 tokens, one seed")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    shape = SMOKE if args.smoke else LLAMA3_8B
    tokens, seeds = (64, [0]) if args.smoke else (args.tokens, [int(s) for s in args.seeds.split(",")])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arms = [a for a in select_arms(ARMS, args.arms) if device == "cuda" or a.kind != "mxrewrite-fp8-exact"]
    env = environment()
    print(json.dumps(env), flush=True)

    results = []
    for seed in seeds:
        torch.manual_seed(seed)
        base = Llama3Layer(**shape, max_seq=max(tokens, 128))
        if args.gains == "spread":
            spread_gains(base, torch.Generator().manual_seed(seed + 2))
        base = base.to(device=device, dtype=torch.bfloat16)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(1, tokens, shape["dim"], device=device, generator=gen)
        grad_out = torch.randn(1, tokens, shape["dim"], device=device, generator=gen)
        if args.heavy_tails:
            x[..., :: shape["dim"] // 8] *= 30.0
            # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
            chi2 = torch.randn(3, *grad_out.shape, device=device, generator=gen).pow(2).sum(0)
            grad_out = grad_out / (chi2 / 3).sqrt()
        x = x.to(torch.bfloat16)
        reference = _run(copy.deepcopy(base).float(), x.float(), grad_out)
        for arm in arms:
            try:
                res = measure(arm, base, x, grad_out, reference)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the other arms
                res = arm_not_run(arm, exc, device)
            res["seed"] = seed
            print(f"seed {seed} {arm.name}: " + (f"branch {res['branch_err']:.5f}, grad x {res['grad_x_err']:.5f}, "
                  f"grad W {res['grad_w_err_mean']:.5f}" if res["status"] == "ok" else res["status"]), flush=True)
            results.append(res)

    from tabulate import tabulate

    rows = []
    for arm in arms:
        ok = [r for r in results if r["arm"] == arm.name and r["status"] == "ok"]
        if not ok:
            rows.append([arm.name, next(r["status"] for r in results if r["arm"] == arm.name)[:60], "", ""])
            continue
        rows.append([arm.name] + [" / ".join(f"{r[key]:.5f}" for r in ok)
                                  for key in ("branch_err", "grad_x_err", "grad_w_err_mean")])
    data = "8 input channels x 30, Student-t(3) output gradient" if args.heavy_tails else "standard normal data"
    if args.gains == "spread":
        data += ", norm gains log-normal with 8 channels x 10"
    desc = (f"Llama-3-8B layer {shape}, {tokens} tokens, {data}, bf16, eager, relative L2 error against float32; "
            f"seeds {' / '.join(map(str, seeds))}")
    table = tabulate(rows, ["arm", "branch rel err", "input grad rel err", "weight grads rel err (mean of 7)"],
                     tablefmt="github")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_error.json").write_text(json.dumps(dict(env=env, description=desc, results=results),
                                                              indent=2))
    (Path(args.out) / "fp8_error_table.md").write_text(desc + "\n\n" + table + "\n")
    print(f"\n{desc}\n{env_line(env)}\ncommand: {env['command']}\n{table}", flush=True)
    if any(r["status"].startswith("FAILED") for r in results):
        sys.exit("an arm failed")


if __name__ == "__main__":
    main()
