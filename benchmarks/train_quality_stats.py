"""What the MXNorm estimator reads during training, and the rescale constants in use.

Two measurements per evaluation point, on a few held-out rows, with the model's
current weights:

* ``verify``: :func:`mxrewrite.verify` of the trained network against the original
  model (the same parameters, the exact norms): per rewritten site the ratio
  ``r / RMS(x)`` of the estimate in use (its constant included; 1 for the exact
  norm) over every row - mean, sd, range - and the relative error of the cast
  activation against the exact normalised one; and the relative error of the
  logits. Where verify fails (it reads MX block scales, which ``format="fp8"``
  has not), the ratio comes from the ``rho`` each rewritten norm returned instead,
  and the error is kept.
* ``probe``: on every arm, the bf16 one too, the ratio that MXNorm p = 2 with the
  Gaussian constant *would* read on that site's actual input, for blocks of 32
  (MXFP8's K = D / 32) and of 16 (NVFP4's K = D / 16): mean over rows and the
  row-to-row sd. A calibrated constant removes the mean's bias; the sd is what
  no constant removes, and the estimator theory has it shrink like 1 / sqrt(K).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch
from torch import nn

SITE_SUFFIXES = ("attention_norm", "ffn_norm")  # the benchmark model's rewrite sites (not the final norm)
PROBE_BLOCKS = (32, 16)


def autocast_context(device: str, dtype: torch.dtype | None):
    """The training forward's autocast (none on CPU)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def rescale_constants(net: nn.Module) -> dict[str, float]:
    """Rescale constant of every rewritten site, from the rewrite report (empty without a rewrite)."""
    report = getattr(net, "mx_report", None)
    if report is None:
        return {}
    return {site.norm: site.rescale for site in report.sites if site.status == "rewritten"}


def _ratio_summary(ratio: torch.Tensor) -> dict:
    ratio = ratio[torch.isfinite(ratio)]
    if ratio.numel() == 0:
        return {"rows": 0}
    return {"rows": int(ratio.numel()), "mean": ratio.mean().item(),
            "sd": ratio.std().item() if ratio.numel() > 1 else 0.0,
            "min": ratio.min().item(), "max": ratio.max().item()}


def gaussian_estimate_ratio(x: torch.Tensor, block_size: int, p: int = 2) -> torch.Tensor:
    """``c'(p, B) * M_p(x) / RMS(x)`` per row (float64): MXNorm's Gaussian-constant estimate over the truth."""
    from mxrewrite.formats.mx import block_amax
    from mxrewrite.ops.mxnorm_constants import gaussian_correction

    rows = x.detach().double().reshape(-1, x.shape[-1])
    amax = block_amax(rows, block_size).double()
    power_mean = amax.mean(-1) if p == 1 else amax.pow(2).mean(-1).sqrt()
    return gaussian_correction(p, block_size) * power_mean / rows.pow(2).mean(-1).sqrt()


def _site_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in net.named_modules() if name.endswith(SITE_SUFFIXES)]


def probe_sites(net: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """Per site of ``net`` (rewritten or not): the Gaussian p = 2 estimate's ratio on its actual input."""
    from mxrewrite.recording import run_watching

    seen: dict[str, torch.Tensor] = {}
    run_watching(net, [((inputs,), {})], _site_modules(net),
                 lambda name, args, kwargs, _: seen.setdefault(name, args[0].detach()), before=True)
    out = []
    for name, x in seen.items():
        row = {"norm": name}
        for block in PROBE_BLOCKS:
            if x.shape[-1] % block == 0:
                summary = _ratio_summary(gaussian_estimate_ratio(x, block))
                row[f"b{block}_mean"], row[f"b{block}_sd"] = summary.get("mean"), summary.get("sd")
        out.append(row)
    return out


def ratios_from_rho(net: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """``r / RMS(x)`` of the estimate each rewritten norm used, read from the ``rho`` it returned."""
    from mxrewrite.modules import MXRMSNorm
    from mxrewrite.recording import run_watching

    seen: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple, kwargs: dict, output) -> None:
        x = output.x.detach().double().reshape(-1, output.x.shape[-1])
        seen.setdefault(name, (1.0 / output.rho.detach().double().reshape(-1)) / x.pow(2).mean(-1).sqrt())

    norms = [(n, m) for n, m in net.named_modules() if isinstance(m, MXRMSNorm)]
    run_watching(net, [((inputs,), {})], norms, record)
    out = []
    for name, ratio in seen.items():
        summary = _ratio_summary(ratio)
        out.append({"norm": name, "ratio_mean": summary.get("mean"), "ratio_std": summary.get("sd"),
                    "ratio_min": summary.get("min"), "ratio_max": summary.get("max")})
    return out


def verify_sites(model: nn.Module, net: nn.Module, inputs: torch.Tensor) -> dict:
    """mxrewrite.verify's site statistics and output error; on failure the ``rho`` ratios and the error."""
    import mxrewrite

    try:
        result = mxrewrite.verify(model, net, (inputs,), baseline=False)
    except Exception as exc:  # noqa: BLE001 - recorded, and the ratios come from rho instead
        return {"source": "rho", "error": f"{type(exc).__name__}: {exc}"[:300],
                "sites": ratios_from_rho(net, inputs)}
    output = result.outputs[0] if result.outputs else None
    return {"source": "verify", "sites": [asdict(site) for site in result.sites],
            "output_rel_l2": output.rel_l2 if output else None, "output_cosine": output.cosine if output else None}


def estimator_stats(step: int, model: nn.Module, net: nn.Module, inputs: torch.Tensor, device: str,
                    autocast_dtype: torch.dtype | None) -> dict:
    """Both measurements at one training step, in the training forward's precision, run eagerly."""
    # eager: a block compiled for training would compile again for this no-grad forward
    with autocast_context(device, autocast_dtype), torch.compiler.set_stance("force_eager"):
        stats = {"step": step, "probe": probe_sites(net, inputs)}
        if getattr(net, "mx_report", None) is not None:
            stats["verify"] = verify_sites(model, net, inputs)
    return stats
