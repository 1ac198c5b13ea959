"""Semantic mutation check: small deliberate bugs that the test suite must catch (issue 16).

Each :class:`Mutant` replaces one exact snippet of one file with a wrong version
(rounding mode swapped, gain not folded, the head rewritten...) and names the
tests that should fail because of it. For every mutant the runner

1. copies the repository's tracked and untracked-but-not-ignored files
   (``git ls-files -co --exclude-standard``, snapshotted once when the run
   starts, so edits made meanwhile change nothing) to a scratch directory,
2. applies the replacement there (the snippet must occur exactly once: a
   snippet that no longer occurs is reported as ``stale`` - the code moved on and
   the mutant needs updating -, one that occurs twice as an ``error``),
3. runs ``python -m pytest -x -q -p no:cacheprovider <its tests>`` in the copy,
   with ``PYTHONPATH`` pointing at it, and a guard plugin that fails the run
   unless ``mxrewrite`` and ``tests`` were imported from the copy (the venv's
   editable install points at the working tree, not at the mutated copy); the
   plugin also makes hypothesis skip shrinking and draw the same examples on
   every run,

and prints a table: ``killed`` (a named test failed), ``survived`` (they all
passed: a test is missing), ``stale``, ``error`` (pytest could not run them, or
the guard fired) or ``timeout``. Before the mutants, the union of their tests
runs once on an unmutated copy (``baseline``): a test that already fails would
"kill" every mutant and prove nothing.

Usage::

    python scripts/mutants.py              # all 66 mutants: about 6 minutes on 2 CPU cores (-j 2)
    python scripts/mutants.py --list       # the mutants, their files and tests
    python scripts/mutants.py -k e8m0 -k head   # a subset (substring of the name)
    python scripts/mutants.py --check      # only check that every snippet applies (no tests)
    python scripts/mutants.py -j 2         # two mutants at a time (each with half the CPU threads)

Exit status: 0 when every selected mutant is killed, 1 when one survives or
errors (or the baseline fails), 3 when the only problem is stale snippets.
The tests are picked to fail fast (``-x`` stops at the first failure): a
mutant costs the pytest start-up (~4 s) plus a few seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
REF = "tests/test_reference.py"
FORMS = "tests/passes/test_match_forms.py"
NORM_CAST = "tests/ops/test_norm_cast.py"
MX_LINEAR = "tests/ops/test_mx_linear.py"
REWRITE = "tests/passes/test_rewrite.py"


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: ``old`` (exactly once in ``file``) becomes ``new``; ``tests`` must fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def ref(case: str) -> str:
    return f"{REF}::test_matches_reference[{case}]"


FP8_REF = ("tests/test_fp8_recipe.py::test_fp8_recipe_matches_an_independent_reference[rmsnorm-mx-False]",)
FP8_REF_MXNORM = ("tests/test_fp8_recipe.py::test_fp8_recipe_matches_an_independent_reference[mxnorm-mx-False]",)
FP8_REF_HP = ("tests/test_fp8_recipe.py::test_fp8_recipe_matches_an_independent_reference[mxnorm-hp-False]",)
LINEARS_ALL = ("tests/test_fp8_recipe.py::test_linears_all_converts_every_linear_but_head_and_router[fp8]",)

MUTANTS: tuple[Mutant, ...] = (
    # --- RewriteConfig fields that must reach the computation
    Mutant("scale_mode-ignored", "mxrewrite/passes/module_plan.py",
           "config.p, config.scale_mode, site.match.eps_in_root", 'config.p, "rceil", site.match.eps_in_root',
           (ref("llama-scale_mode=floor"),), "the rewrite hard-codes rceil whatever config.scale_mode says"),
    Mutant("grad_cast-ignored", "mxrewrite/passes/module_plan.py",
           "gain_in_cast, config.grad_cast)", 'gain_in_cast, "mx")',
           (ref("llama-grad_cast=hp"),), "the rewrite hard-codes grad_cast='mx'"),
    Mutant("include_head-ignored", "mxrewrite/passes/plan.py",
           "if user in heads and not config.include_head:", "if user in heads:",
           (ref("llama-include_head=True"),), "include_head=True no longer rewrites the head's norm"),
    Mutant("calibration-not-applied", "mxrewrite/api.py",
           "constants=s.constants._replace(correction=corrections[s.norm])", "constants=s.constants",
           (ref("llama-rescale=calibrated"),), "rescale='calibrated' measures the constants and keeps c'(p, B)"),
    # --- the norm, its constants and its backward
    Mutant("rescale-B16-constant", "mxrewrite/ops/mxnorm_constants.py",
           "return GAUSSIAN_CORRECTION[(p, block_size)]", "return GAUSSIAN_CORRECTION[(p, 16)]",
           (ref("llama-default"),), "MXFP8 sites get c'(p, 16) instead of c'(p, 32) (1.12x too large)"),
    Mutant("mxfp8-block-size", "mxrewrite/formats/spec.py",
           'FormatSpec("mxfp8", MXFP8_BLOCK_SIZE,', 'FormatSpec("mxfp8", NVFP4_BLOCK_SIZE,',
           (ref("llama-default"),), "MXFP8 casts and estimates with blocks of 16"),
    Mutant("estimate-block-size", "mxrewrite/ops/reference.py",
           "amax = block_amax(x, block_size).double()", "amax = block_amax(x, 2 * block_size).double()",
           (f"{NORM_CAST}::test_mxnorm_rho_matches_float64_formula",),
           "MXNorm's estimate takes its block maxima over blocks twice too long"),
    Mutant("p-ignored", "mxrewrite/ops/reference.py",
           "power_mean = (amax if p == 1 else amax * amax).mean(-1)", "power_mean = (amax * amax).mean(-1)",
           (f"{NORM_CAST}::test_mxnorm_rho_matches_float64_formula",),
           "MXNorm's p=1 power mean computed as p=2's (without the root)"),
    Mutant("mxnorm-eps-scaled", "mxrewrite/ops/reference.py",
           "r = (correction * power_mean + eps).float()", "r = (correction * (power_mean + eps)).float()",
           (f"{NORM_CAST}::test_equals_reference_composition",), "MXNorm's eps multiplied by the rescale constant"),
    Mutant("eps-placement-swapped", "mxrewrite/ops/reference.py",
           "r = (mean_sq + eps).sqrt() if eps_in_root else mean_sq.sqrt() + eps",
           "r = mean_sq.sqrt() + eps if eps_in_root else (mean_sq + eps).sqrt()",
           (f"{NORM_CAST}::test_eps_outside_the_root", ref("eps_outside-norm=rmsnorm-scale_mode=floor")),
           "the exact RMSNorm puts eps outside the root where the model has it inside, and vice versa"),
    Mutant("rmsnorm-sum-in-input-dtype", "mxrewrite/ops/reference.py",
           "    xf = x.float()\n    mean_sq", "    xf = x\n    mean_sq",
           (f"{NORM_CAST}::test_equals_reference_composition",), "the exact RMSNorm sums squares in bfloat16"),
    Mutant("gemma-offset-dropped", "mxrewrite/modules/norm.py",
           "gain = gain.float() + constants[GAIN_OFFSET]", "gain = gain.float()",
           (ref("gemma-default"),), "Gemma's gain (1 + weight) applied as weight"),
    Mutant("nvfp4-scale-ignores-gain", "mxrewrite/ops/reference.py",
           "        scale = base * gain_max\n", "        scale = base\n",
           (ref("gemma-format=nvfp4-norm=rmsnorm-grad_cast=hp"),),
           "the NVFP4 static tensor scale leaves out max|gain| when the gain is applied in the cast"),
    Mutant("nvfp4-min-tensor-scale-dropped", "mxrewrite/ops/reference.py",
           "    return torch.clamp(scale, min=MIN_TENSOR_SCALE).float()", "    return scale.float()",
           (f"{NORM_CAST}::test_zero_rows_and_zero_gain_stay_finite",),
           "an all-zero gain gives the NVFP4 cast a zero tensor scale (every code NaN)"),
    Mutant("straight-through-term-dropped", "mxrewrite/ops/reference.py",
           "dx = r * g - (r * r * r) * xf * (dot / x.shape[-1])", "dx = r * g",
           (f"{NORM_CAST}::test_rms_norm_backward_is_rmsnorms_gradient",),
           "the norm backward forgets the projection term (the gradient of rho)"),
    Mutant("norm-backward-ignores-gain", "mxrewrite/ops/reference.py",
           "g = grad.float() if gain is None else grad.float() * gain.float()", "g = grad.float()",
           (f"{NORM_CAST}::test_rms_norm_backward_is_rmsnorms_gradient",), "the norm backward forgets the gain"),
    Mutant("gain-grad-unnormalised", "mxrewrite/modules/cast_tensor.py",
           "grad_gain = (normalize(x, rho) * grad_h.float())", "grad_gain = (x.float() * grad_h.float())",
           (ref("llama-default"),), "the gain's gradient uses x instead of x * rho"),
    # --- calibration
    Mutant("calibrate-block-16", "mxrewrite/passes/calibrate.py",
           "amax = block_amax(rows, block_size)", "amax = block_amax(rows, 16)",
           (f"{REF}::test_calibrated_constant_is_mean_rms_over_power_mean[llama-rescale=calibrated]",),
           "calibration measures M_p over blocks of 16 in MXFP8"),
    Mutant("calibrate-p-ignored", "mxrewrite/passes/calibrate.py",
           "power_mean = amax.mean(-1) if p == 1 else amax.pow(2).mean(-1).sqrt()",
           "power_mean = amax.pow(2).mean(-1).sqrt()",
           (f"{REF}::test_calibrated_constant_is_mean_rms_over_power_mean",),
           "calibration measures M_2 when the sites use p=1"),
    Mutant("calibrate-zero-rows", "mxrewrite/passes/calibrate.py",
           "valid = power_mean > 0", "valid = power_mean >= 0",
           ("tests/passes/test_calibrate.py::test_zero_rows_are_left_out",),
           "calibration averages the 0/0 of all-zero rows (a NaN constant)"),
    # --- element and scale formats, the GEMM
    Mutant("e8m0-rounding-swapped", "mxrewrite/formats/e8m0.py",
           'if mode == "rceil":\n        descale = amax / elem_max',
           'if mode != "rceil":\n        descale = amax / elem_max',
           ("tests/formats/test_mx.py::test_edge_cases_match_torchao",),
           "E8M0 block scales: rceil computes floor's exponent and floor rceil's"),
    Mutant("e2m1-ties-not-to-even", "mxrewrite/formats/e2m1.py",
           "(mag_bits + _NORMAL_ADD + mantissa_odd)", "(mag_bits + _NORMAL_ADD)",
           ("tests/formats/test_e2m1.py",), "e2m1 rounds normal ties down instead of to even"),
    Mutant("nvfp4-tensor-scale-dropped", "mxrewrite/ops/matmul.py",
           "    return out.float() * (a.tensor_scale * b.tensor_scale)\n\n\ndef _scaled_mm",
           "    return out.float()\n\n\ndef _scaled_mm",
           (f"{MX_LINEAR}::test_forward_equals_dequantized_matmul",),
           "the emulated GEMM forgets NVFP4's per-tensor scales"),
    # --- the linears
    Mutant("gain-not-folded", "mxrewrite/ops/mx_linear.py",
           "w = weight.float() * gamma.float()", "w = weight.float()",
           (f"{MX_LINEAR}::test_forward_equals_dequantized_matmul",),
           "MXNorm's linears multiply W instead of W * diag(gain)"),
    Mutant("weight-cast-ignores-scale_mode", "mxrewrite/ops/mx_linear.py",
           "w_cast = quantize_matrix(w, spec, scale_mode=scale_mode)",
           'w_cast = quantize_matrix(w, spec, scale_mode="rceil")',
           (ref("llama-scale_mode=floor"),), "the weight cast uses rceil under scale_mode=floor"),
    Mutant("gradient-cast-e4m3", "mxrewrite/ops/mx_linear.py",
           "elem_dtype=gradient_elem_dtype(grad_cast))", "elem_dtype=torch.float8_e4m3fn)",
           (ref("llama-default"),), "grad_cast='mx' casts the output gradient to e4m3 instead of e5m2"),
    Mutant("gradient-cast-ignores-scale_mode", "mxrewrite/ops/mx_linear.py",
           'a = quantize_matrix(grad_t, "mxfp8", scale_mode=scale_mode,',
           'a = quantize_matrix(grad_t, "mxfp8", scale_mode="rceil",',
           (ref("llama-scale_mode=floor"),), "the gradient casts use rceil under scale_mode=floor"),
    # --- the cast travelling through the model
    Mutant("alpha-dropped", "mxrewrite/modules/cast_tensor.py",
           "return t.replace(alpha=t.alpha * float(other))", "return t.replace()",
           (f"{REWRITE}::test_constant_multipliers_survive_exactly",),
           "a constant multiplier between the norm and its linears is lost"),
    Mutant("div-alpha-inverted", "mxrewrite/modules/cast_tensor.py",
           "return t.replace(alpha=t.alpha / float(other))", "return t.replace(alpha=t.alpha * float(other))",
           (f"{REWRITE}::test_constant_multipliers_survive_exactly",), "h / 4 before a linear is carried as h * 4"),
    Mutant("weight-grad-alpha-dropped", "mxrewrite/modules/linear.py",
           "                h = h * ctx.alpha", "                h = h",
           (f"{REWRITE}::test_constant_multipliers_survive_exactly",),
           "the weight gradient of a linear fed h * 0.25 forgets the 0.25"),
    Mutant("exact-value-drops-alpha", "mxrewrite/modules/cast_tensor.py",
           "        if self.alpha != 1.0:\n            h = h * self.alpha\n        return h.to(self.dtype)",
           "        return h.to(self.dtype)",
           (f"{REWRITE}::test_constant_multipliers_survive_exactly",), "a non-MX consumer of h * 0.25 reads h"),
    Mutant("exact-value-is-estimate", "mxrewrite/modules/cast_tensor.py",
           'rho = self.rho if s.norm == "rmsnorm" else rmsnorm_rho(', "rho = self.rho if True else rmsnorm_rho(",
           (f"{REWRITE}::test_non_linear_consumers_read_the_exact_norm",),
           "consumers that are not MX linears read MXNorm's estimate instead of the exact RMSNorm"),
    Mutant("transpose-moves-last-dim", "mxrewrite/modules/cast_tensor.py",
           "    if _last_dim(t.dim(), dim0) or _last_dim(t.dim(), dim1):\n        return None\n", "",
           (f"{REWRITE}::test_fan_out_site_becomes_one_cast_and_three_mx_linears",),
           "a transpose that moves the last dim keeps the cast"),
    # --- finding the sites
    Mutant("confirm-accepts-all", "mxrewrite/passes/match/confirm.py",
           "    def run(self) -> None:\n", "    def run(self) -> None:\n        return\n",
           (f"{FORMS}::test_wrong_constants_are_rejected_numerically_in_any_precision",),
           "the matcher's numerical confirmation accepts every candidate"),
    Mutant("confirm-accepts-all-property", "mxrewrite/passes/match/confirm.py",
           "    def run(self) -> None:\n", "    def run(self) -> None:\n        return\n",
           ("tests/test_property.py",), "the same, against the property test's numerical decoys alone"),
    Mutant("confirm-ignores-common-scale", "mxrewrite/passes/match/confirm.py",
           "if abs(common - 1) <= self.rtol / 8:", "if True:",
           (f"{FORMS}::test_wrong_constants_are_rejected_numerically_in_any_precision",),
           "a norm times a constant within bfloat16's per-row tolerance (0.99, D/(D-1)) passes"),
    Mutant("confirm-eps-always-inside", "mxrewrite/passes/match/confirm.py",
           "r = (ms + eps).sqrt() if self.cand.eps_in_root else ms.sqrt() + eps", "r = (ms + eps).sqrt()",
           ("tests/passes/test_match.py::test_eps_inside_and_outside_the_root_are_told_apart_even_when_large",),
           "the numerical check compares every candidate with eps inside the root"),
    Mutant("repeated-blocks-all-alike", "mxrewrite/passes/repeated.py",
           "members[key] = first.setdefault(_signature(container._modules[key]), key)",
           "members[key] = first.setdefault((), key)",
           ("tests/test_property.py",), "blocks of different structure are taken for copies of the first"),
    Mutant("block-copies-ignored", "mxrewrite/passes/repeated.py",
           'tuple(f"{container}.{m}." for m, r in members.items() if r == rep)', '(f"{container}.{rep}.",)',
           (ref("llama-default"),), "only the analysed block of a repeated stack is rewritten"),
    # --- which consumers become MX linears
    Mutant("consumer-linear-dropped", "mxrewrite/passes/plan.py",
           "linears = tuple(c for c in consumers if isinstance(c, LinearConsumer))",
           "linears = tuple(c for c in consumers if isinstance(c, LinearConsumer))[1:]",
           ("tests/passes/test_plan.py::test_fan_out_is_one_site_with_every_linear",),
           "one linear consumer of each norm is silently left out"),
    Mutant("view-breaks-chain", "mxrewrite/passes/plan.py",
           "return True  # view / reshape", "return False  # view / reshape",
           (f"{REWRITE}::test_row_preserving_views_keep_the_cast",),
           "a linear reached through a view/reshape is no longer a consumer"),
    Mutant("routers-rewritten", "mxrewrite/passes/plan.py",
           "if _routes_experts(user):", "if False:",
           ("tests/passes/test_plan.py::test_moe_router_stays_high_precision",), "MoE routers are rewritten to MX"),
    Mutant("head-rewritten", "mxrewrite/passes/plan.py",
           "if user in heads and not config.include_head:", "if False:",
           (ref("llama-default"),), "the output head is rewritten although include_head=False"),
    Mutant("float32-linear-rewritten", "mxrewrite/passes/plan.py",
           "if path.upcast or weight_upcast:", "if weight_upcast:",
           ("tests/passes/test_plan.py::test_explicit_float32_linear_is_kept",),
           "a linear the model computes in float32 on purpose is rewritten"),
    Mutant("fp8-mxnorm-gain-dropped", "mxrewrite/passes/module_plan.py",
           'gain_in_cast = config.norm == "rmsnorm" or config.format == "fp8"', 'gain_in_cast = config.norm == "rmsnorm"',
           FP8_REF_MXNORM, "format='fp8': MXNorm leaves its gain out of its cast (and FP8 linears never fold it)"),
    Mutant("fp8-rmsnorm-gain-dropped", "mxrewrite/passes/module_plan.py",
           'gain_in_cast = config.norm == "rmsnorm" or config.format == "fp8"',
           'gain_in_cast = config.norm == "rmsnorm" and config.format != "fp8"',
           FP8_REF, "format='fp8': the exact RMSNorm leaves its gain out of its cast"),
    Mutant("fp8-hp-weight-grad-misses-gain", "mxrewrite/modules/functions.py",
           "h = normalize(x, rho, gain)", "h = normalize(x, rho)",
           FP8_REF_HP, "format='fp8', grad_cast='hp': grad_W = G^T xhat without the gain"),
    Mutant("fp8-gradients-e4m3", "mxrewrite/modules/functions.py",
           "fp8_quantize_with_transpose(grad, gradient_elem_dtype(grad_cast))",
           "fp8_quantize_with_transpose(grad, E4M3)",
           FP8_REF,
           "format='fp8': output gradients cast to e4m3 instead of e5m2"),
    Mutant("fp8-static-scale-too-small", "mxrewrite/ops/reference.py",
           "return static_scale(norm_output_bound(hidden, fmt=\"fp8\", norm=norm, p=p, correction=correction))",
           "return static_scale(norm_output_bound(hidden, fmt=\"fp8\", norm=norm, p=p, correction=correction) / 4)",
           ("tests/formats/test_fp8.py::test_normalised_rows_at_the_bound_do_not_saturate",),
           "format='fp8': the static activation scale clips normalised values below the norm's bound"),
    Mutant("fp8-dynamic-scale-not-power-of-two", "mxrewrite/formats/fp8.py",
           "return torch.exp2(torch.floor(torch.log2(scale)))", "return scale",
           ("tests/formats/test_fp8.py::test_a_slice_casts_its_normal_values_as_the_whole_tensor_does",),
           "format='fp8': dynamic scales not rounded to powers of two (a rank's casts differ from one GPU's)"),
    Mutant("e4m3-gradients-ignored", "mxrewrite/ops/mx_linear.py",
           'return torch.float8_e4m3fn if grad_cast == "e4m3" else torch.float8_e5m2', "return torch.float8_e5m2",
           ("tests/test_fp8_recipe.py::test_fp8_recipe_matches_an_independent_reference[rmsnorm-e4m3-False]",
            "tests/ops/test_mx_linear.py::test_mx_gradient_casts_use_the_gradient_element_type[mxfp8-e4m3-grad_dtype1]"),
           "grad_cast='e4m3' still casts the gradients to e5m2"),
    Mutant("estimate-check-skipped", "mxrewrite/passes/calibrate.py",
           "    if off:\n        worst", "    if False:\n        worst",
           ("tests/test_api.py::test_an_estimate_far_from_the_rms_is_reported",),
           "optimize() no longer says where MXNorm's estimate misreads the example inputs' RMS"),
    Mutant("linears-all-ignored", "mxrewrite/passes/rewrite.py",
           'if config is not None and config.linears == "all":', "if False:",
           LINEARS_ALL,
           "linears='all' swaps the modules but they never cast their own input"),
    Mutant("router-converted-by-linears-all", "mxrewrite/passes/linear_plan.py",
           "    if _routes_experts(node):", "    if False:",
           LINEARS_ALL,
           "linears='all' converts an MoE router"),
    Mutant("constants-lost-on-move", "mxrewrite/modules/norm.py",
           "        self._buffers[CONSTANTS_BUFFER] = self.constants.tensor(device)\n", "",
           ("tests/modules/test_norm.py::test_meta_device_initialisation_restores_the_constants[torchtitan_llama]",),
           "a rewritten norm's constants buffer is left as .to(dtype) or .to_empty() made it (rounded or garbage)"),
    Mutant("transposed-cast-kept-by-a-slice", "mxrewrite/modules/cast_tensor.py",
           "aten.slice.Tensor(v, dim % t.dim(), start, end, step), keeps_order=False)",
           "aten.slice.Tensor(v, dim % t.dim(), start, end, step), keeps_order=True)",
           ("tests/test_fp8_recipe.py::test_row_views_keep_the_transposed_cast_only_in_row_order",),
           "format='fp8': a slice of the norm's rows keeps the transposed cast of all rows (wrong weight gradient)"),
    Mutant("kernel-fp8-scale-not-ceiled", "mxrewrite/ops/kernels/norm_cast.py",
           "    exponent += ((bits & _FLOAT64_MANTISSA) != 0).to(tl.int64)\n", "",
           ("tests/ops/kernels/test_norm_cast_kernel.py::test_kernels_bit_exact_under_triton_interpreter",),
           "the fused kernel's FP8 static scale is the power of two below bound / 448 (normalised values clip)"),
    Mutant("kernel-fp8-scale-ignores-the-gain", "mxrewrite/ops/kernels/norm_cast.py",
           "GAIN_SETS_SCALE: tl.constexpr = HAS_GAMMA and FMT != 0",
           "GAIN_SETS_SCALE: tl.constexpr = HAS_GAMMA and FMT == 1",
           ("tests/ops/kernels/test_norm_cast_kernel.py::test_kernels_bit_exact_under_triton_interpreter",),
           "the fused kernel casts an FP8 activation times its gain with the gain-free static scale (gains > 1 clip)"),
    Mutant("kernel-fp8-cast-masks-the-tail", "mxrewrite/ops/kernels/fp8_cast.py",
           "mask = offs < numel", "mask = offs < numel - 1",
           ("tests/ops/kernels/test_fp8_cast_kernel.py::test_kernel_under_triton_interpreter",),
           "the FSDP2 shard cast leaves the last element of each shard unwritten"),
    Mutant("fp8-gain-folded-and-applied", "mxrewrite/modules/functions.py",
           "w_data, w_scale = weight_cast(weight)  # (the norm applied",
           "w_data, w_scale = weight_cast(weight * h.gain if h.gain is not None else weight)  # (the norm applied",
           FP8_REF_MXNORM, "format='fp8': the gain applied in the norm's cast and to the weights too"),
    Mutant("fp8-all-gather-scale-of-the-shard", "mxrewrite/modules/fp8_weight.py",
           "            _all_reduce_max(amax, mesh)\n", "",
           ("tests/distributed/test_fsdp_tp.py::test_fsdp2_after_optimize[fsdp_torchtitan_llama_fp8_all_gather]",),
           "fsdp_fp8_all_gather: each rank casts its shard with its own scale, and reads the others' with it"),
    Mutant("fp8-precomputed-scale-never-stale", "mxrewrite/modules/fp8_weight.py",
           "return tensor is not None and tensor._version == version", "return tensor is not None",
           ("tests/modules/test_fp8_weight.py::test_a_precomputed_scale_is_used_only_while_the_weight_is_unchanged",),
           "precompute_fp8_scales: a scale computed before an optimizer step is used after it (stale; values clip)"),
    Mutant("fp8-precomputed-cast-with-the-dequant-scale", "mxrewrite/modules/fp8_weight.py",
           "fp8_cast(self._tensor, scale)", "fp8_cast(self._tensor, dequant_scale)",
           ("tests/modules/test_fp8_weight.py::test_a_precomputed_scale_is_used_only_while_the_weight_is_unchanged",),
           "precompute_fp8_scales: a gather multiplies by the reciprocal of the scale it sends along"),
    Mutant("fp8-precomputed-scale-of-the-shard", "mxrewrite/modules/fp8_weight.py",
           "\n    _all_reduce_max(amax, mesh)\n", "\n",
           ("tests/distributed/test_fsdp_tp.py::test_fsdp2_after_optimize[fsdp_torchtitan_llama_fp8_all_gather_precomputed]",),
           "precompute_fp8_scales: each rank's scales from its own shards (the ranks cast with different scales)"),
    Mutant("fp8-precomputed-over-the-parameter-mesh", "mxrewrite/modules/fp8_weight.py",
           "mesh = p.device_mesh if p.device_mesh.ndim == 1 else p._local_tensor._gather_mesh", "mesh = p.device_mesh",
           ("tests/distributed/test_fsdp_tp.py::test_fsdp2_with_tensor_parallel_after_optimize",),
           "precompute_fp8_scales under FSDP2 + TP: the amax all-reduced over the TP ranks too (not the gather's)"),
    Mutant("fp8-precomputed-scale-copied", "mxrewrite/modules/fp8_weight.py",
           "        self._precomputed = self._gather_mesh = None\n", "        pass\n",
           ("tests/modules/test_fp8_weight.py::test_precompute_covers_a_weight_this_rank_holds_no_rows_of",),
           "a deep copy of an FP8-gathered weight keeps its original's precomputed scale (and version check)"),
)



# ---------------------------------------------------------------------------
# running one mutant

GUARD = '''"""pytest plugin written by scripts/mutants.py: the code under test must be the scratch copy's."""
import os
from pathlib import Path

import pytest
from hypothesis import Phase, settings

ROOT = Path(__file__).resolve().parent
# no shrinking (a failing example is all a mutant needs) and the same examples on every run
settings.register_profile("mutants", phases=[Phase.explicit, Phase.generate], derandomize=True)
settings.load_profile("mutants")


def pytest_collection_finish(session):
    import mxrewrite
    import tests

    found = {m.__name__: Path(m.__file__).resolve() for m in (mxrewrite, tests)}
    wrong = {n: str(p) for n, p in found.items() if ROOT not in p.parents}
    Path(os.environ["MUTANT_GUARD_OUT"]).write_text(repr({n: str(p) for n, p in found.items()}))
    if wrong:
        raise pytest.UsageError(f"mutants.py guard: imported from outside the scratch copy {ROOT}: {wrong}")
'''


@dataclass
class Result:
    mutant: Mutant | None
    outcome: str            # killed | survived | stale | error | timeout | passed | failed (baseline)
    seconds: float
    killed_by: str = ""
    detail: str = ""


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def snapshot(files: list[str]) -> Path:
    """The repository's files as they are now, and the guard plugin, in a new directory (taken once per run,
    so edits made while the mutants run do not reach them)."""
    root = Path(tempfile.mkdtemp(prefix="mxrewrite-mutants-"))
    for f in files:
        dest = root / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest)
    (root / "_mutant_guard.py").write_text(GUARD)
    return root


def scratch_copy(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="mxrewrite-mutant-"))
    shutil.copytree(base, root, dirs_exist_ok=True)
    return root


def mutated(mutant: Mutant, root: Path) -> tuple[str | None, str, str]:
    """``(the mutated text of mutant.file under root, "", "")``, or ``(None, outcome, why)``: ``stale`` when the
    file or the snippet is gone, ``error`` when the snippet occurs more than once (the mutant is ambiguous) or
    the mutated Python does not compile (a test would "kill" it by failing to import)."""
    path = root / mutant.file
    if not path.is_file():
        return None, "stale", f"{mutant.file} does not exist"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return None, "stale" if count == 0 else "error", (
            f"the snippet occurs {count} times in {mutant.file} (must be exactly once): {mutant.old!r}")
    text = text.replace(mutant.old, mutant.new)
    if mutant.file.endswith(".py"):
        try:
            compile(text, mutant.file, "exec")
        except SyntaxError as exc:
            return None, "error", f"the mutated {mutant.file} does not compile: {exc}"
    return text, "", ""


def run_tests(tests: tuple[str, ...], root: Path, threads: int | None, timeout: float):
    """``(returncode or None on timeout, output, seconds)`` of pytest on ``tests`` inside ``root``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                        if p]),
               MUTANT_GUARD_OUT=str(root / "_mutant_guard.out"), PYTHONDONTWRITEBYTECODE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutant_guard", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode in (0, 1) and not (root / "_mutant_guard.out").is_file():
        return 99, out + "\nmutants.py: the guard plugin did not run", time.perf_counter() - start
    return proc.returncode, out, time.perf_counter() - start


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.MULTILINE)
    return m.group(1) if m else "?"


def tail(output: str, lines: int = 25) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def run_mutant(mutant: Mutant, base: Path, threads: int | None, timeout: float, keep: bool) -> Result:
    text, outcome, why = mutated(mutant, base)
    if text is None:
        return Result(mutant, outcome, 0.0, detail=why)
    root = scratch_copy(base)
    try:
        (root / mutant.file).write_text(text)
        code, out, seconds = run_tests(mutant.tests, root, threads, timeout)
        if code is None:
            return Result(mutant, "timeout", seconds, detail=tail(out))
        if code == 1:
            return Result(mutant, "killed", seconds, killed_by=first_failure(out))
        if code == 0:
            return Result(mutant, "survived", seconds, detail=tail(out, 3))
        return Result(mutant, "error", seconds, detail=f"pytest exit code {code}:\n{tail(out)}")
    finally:
        if keep:
            print(f"kept {mutant.name}: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_baseline(mutants: list[Mutant], base: Path, timeout: float) -> Result:
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    root = scratch_copy(base)
    try:
        code, out, seconds = run_tests(tests, root, None, timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if code == 0:
        return Result(None, "passed", seconds)
    return Result(None, "failed", seconds, detail=f"pytest exit code {code}:\n{tail(out)}")


# ---------------------------------------------------------------------------

def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(n in m.name for n in names)]
    if not chosen:
        raise SystemExit(f"no mutant matches {names}; --list shows them")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet applies")
    parser.add_argument("-k", action="append", metavar="NAME", help="run the mutants whose name contains NAME")
    parser.add_argument("-j", type=int, default=1, help="mutants run at a time (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (paths on stderr)")
    args = parser.parse_args(argv)
    mutants = select(args.k)

    if args.list:
        rows = [(m.name, m.file, m.what, "\n".join(m.tests)) for m in mutants]
        print(tabulate(rows, headers=["mutant", "file", "bug", "tests that must kill it"], tablefmt="simple"))
        return 0

    if args.check:
        checks = [(m, mutated(m, REPO)) for m in mutants]
        rows = [(m.name, m.file, "applies" if text is not None else f"{outcome}: {why}")
                for m, (text, outcome, why) in checks]
        print(tabulate(rows, headers=["mutant", "file", "snippet"]))
        outcomes = {outcome for _, (_, outcome, _) in checks}
        return 1 if "error" in outcomes else 3 if "stale" in outcomes else 0

    start = time.perf_counter()
    base = snapshot(repo_files())
    try:
        if not args.no_baseline:
            baseline = run_baseline(mutants, base, args.timeout)
            print(f"baseline (the mutants' tests on unmutated code): {baseline.outcome} in {baseline.seconds:.0f} s",
                  flush=True)
            if baseline.outcome != "passed":
                print(baseline.detail)
                return 1
        threads = max(1, (os.cpu_count() or 1) // args.j) if args.j > 1 else None
        with ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
            futures = [pool.submit(run_mutant, m, base, threads, args.timeout, args.keep) for m in mutants]
            results = []
            for f in futures:
                r = f.result()
                results.append(r)
                print(f"  {r.mutant.name}: {r.outcome} ({r.seconds:.1f} s)", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = [(r.mutant.name, r.mutant.file, r.outcome, r.killed_by or "-", r.seconds) for r in results]
    print()
    print(tabulate(rows, headers=["mutant", "file", "outcome", "killed by", "seconds"], floatfmt=".1f"))
    counts = {o: sum(r.outcome == o for r in results) for o in ("killed", "survived", "stale", "error", "timeout")}
    print(f"\n{len(results)} mutants: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n)
          + f"; {time.perf_counter() - start:.0f} s in all")
    for r in results:
        if r.outcome != "killed":
            print(f"\n--- {r.mutant.name} ({r.outcome}): {r.mutant.what}\n{r.detail}")
    if counts["survived"] or counts["error"] or counts["timeout"]:
        return 1
    return 3 if counts["stale"] else 0


if __name__ == "__main__":
    sys.exit(main())
