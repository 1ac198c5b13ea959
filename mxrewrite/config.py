"""``RewriteConfig``: what ``optimize`` rewrites RMSNorm -> Linear sites into."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mxrewrite.errors import ConfigError
from mxrewrite.formats import FORMATS, get_format
from mxrewrite.formats.e8m0 import SCALE_MODES
from mxrewrite.ops.mx_linear import GRAD_CASTS
from mxrewrite.ops.mxnorm_constants import POWERS, gaussian_correction
from mxrewrite.ops.reference import NORMS

RESCALES = ("gaussian", "calibrated", "none")
LINEARS = ("norm-fed", "all")


@dataclass(frozen=True)
class RewriteConfig:
    """How each site is rewritten.

    Attributes:
        format: ``"mxfp8"`` (e4m3 elements, blocks of 32, E8M0 scales), ``"nvfp4"``
            (e2m1 elements, blocks of 16, e4m3 scales and a per-tensor scale), or
            ``"fp8"``: e4m3 with one float32 scale per tensor, Hopper's native FP8
            (the MX formats need Blackwell's tensor cores and are emulated on Hopper).
            Under ``"fp8"`` the norm's output is cast with a static scale its bound
            gives, so the norm and the cast stay one pass; MXNorm takes its estimate
            from blocks of 32.
        norm: ``"mxnorm"`` estimates the RMS from the cast's block maxima;
            ``"rmsnorm"`` keeps the exact norm, fused with the same cast (the baseline).
        p: MXNorm power mean, 1 or 2 (2 is the paper's stable default).
        scale_mode: E8M0 rounding of MXFP8 block scales, ``"rceil"`` or ``"floor"``.
        rescale: MXNorm's correction constant: ``"gaussian"`` uses c'(p, B);
            ``"calibrated"`` measures RMS / estimate per site on calibration
            inputs (a buffer of the norm, so one compiled graph serves every
            layer); ``"none"`` uses the bare estimate (output scale c' instead of 1).
        include_head: also rewrite a norm whose only consumer is the model's
            output head (the paper keeps the head in high precision).
        grad_cast: ``"mx"`` casts the backward GEMMs' operands to low precision as the
            format's training recipe does (MXFP8 with e5m2 gradients; under ``"fp8"``,
            e5m2 gradients and e4m3 operands with per-tensor scales); ``"e4m3"`` the
            same with e4m3 gradients (one more mantissa bit, 2**8 less range: on a
            unit-scale layer under FP8 the gradients' error drops by about a quarter, and
            a 25M model trained within seed noise of e5m2's and bf16's: benchmarks/RESULTS.md);
            ``"hp"`` keeps them in high precision.
        linears: ``"norm-fed"`` converts the linears a rewritten norm feeds; ``"all"``
            also converts every other ``nn.Linear`` (attention output, MLP down), each
            casting its own input: one call makes a complete low-precision recipe.
            Output heads (unless ``include_head``), MoE routers and linears computed in
            float32 on purpose stay in high precision.
        fsdp_fp8_all_gather: under ``"fp8"``, FSDP2 gathers the converted linears'
            weights in FP8, cast on each rank's shard with the whole weight's scale (one
            byte per element instead of two: torchao's float8 all-gather). Without
            FSDP2 the weights behave as before. Needs ``grad_cast`` other than ``"hp"``.
    """

    format: str = "mxfp8"
    norm: str = "mxnorm"
    p: int = 2
    scale_mode: str = "rceil"
    rescale: str = "gaussian"
    include_head: bool = False
    grad_cast: str = "mx"
    linears: str = "norm-fed"
    fsdp_fp8_all_gather: bool = False

    def __post_init__(self) -> None:
        _check_choice("format", self.format, tuple(FORMATS))
        _check_choice("norm", self.norm, NORMS)
        _check_choice("p", self.p, POWERS)
        _check_choice("scale_mode", self.scale_mode, SCALE_MODES)
        _check_choice("rescale", self.rescale, RESCALES)
        _check_choice("grad_cast", self.grad_cast, GRAD_CASTS)
        _check_choice("linears", self.linears, LINEARS)
        for name in ("include_head", "fsdp_fp8_all_gather"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fsdp_fp8_all_gather and (self.format != "fp8" or self.grad_cast == "hp"):
            raise ConfigError(f"fsdp_fp8_all_gather=True needs format='fp8' and grad_cast 'mx' or 'e4m3' (got "
                              f"format={self.format!r}, grad_cast={self.grad_cast!r}): FSDP2 gathers the FP8 cast "
                              f"of the weights that the FP8 GEMMs read")

    @property
    def block_size(self) -> int:
        return get_format(self.format).block_size

    def default_correction(self) -> float:
        """The rescale constant before calibration: c'(p, B), or 1.0 for the bare estimate / exact norm."""
        if self.norm == "rmsnorm" or self.rescale == "none":
            return 1.0
        return gaussian_correction(self.p, self.block_size)

    def replace(self, **overrides) -> "RewriteConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown RewriteConfig option(s) {sorted(unknown)}; valid options: "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"RewriteConfig.{name}={value!r} is not supported; use one of {choices}")
