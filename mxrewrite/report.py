"""The rewrite report: what was rewritten, what was left alone and why, and what it saves.

Savings are per row (token) of each site and come from a simple traffic model
(DESIGN.md, "Performance model"):

* before - what an MX-linear model runs without the rewrite: RMSNorm reads x and
  writes its output, then every MX linear casts that output itself (reads it,
  writes elements + scales);
* after - one fused pass: read x once, write one cast (+ 4 bytes of rho) shared
  by all the site's linears. If the exact norm is kept for other consumers, its
  read and write count on both sides.

The reduction column is the number of values reduced per row to normalise:
``D`` for RMSNorm, ``D / B`` for MXNorm.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate

from mxrewrite.formats import get_format
from mxrewrite.config import RewriteConfig
from mxrewrite.passes.linear_plan import LinearChoice
from mxrewrite.passes.match import RejectedCandidate
from mxrewrite.passes.module_plan import ModuleSite


@dataclass(frozen=True)
class Savings:
    reduction_elems_before: int
    reduction_elems_after: int
    bytes_per_token_before: float
    bytes_per_token_after: float

    @property
    def bytes_saved_fraction(self) -> float:
        before = self.bytes_per_token_before
        return 1.0 - self.bytes_per_token_after / before if before else 0.0


@dataclass(frozen=True)
class Site:
    """One RMSNorm found in the model and what became of it."""

    norm: str
    consumers: tuple[str, ...]
    status: str  # "rewritten" | "skipped"
    reason: str
    hidden_size: int
    format: str
    spelling: str
    rescale: float | None = None
    kept_consumers: tuple[str, ...] = ()
    savings: Savings | None = None


@dataclass(frozen=True)
class Rejected:
    """A norm-like computation that is not RMSNorm (left untouched)."""

    name: str
    reason: str


@dataclass(frozen=True)
class LinearRow:
    """One linear layer under ``linears="all"``: how it is fed ("fused cast" from a norm, "own cast") or
    "kept" in high precision, and why."""

    name: str
    status: str
    note: str


@dataclass(frozen=True)
class Report:
    format: str
    norm: str
    p: int
    rescale_mode: str
    sites: tuple[Site, ...]
    rejected: tuple[Rejected, ...] = field(default=())
    linears: tuple[LinearRow, ...] = field(default=())
    grad_cast: str = "mx"
    fsdp_fp8_all_gather: bool = False

    @property
    def rewritten(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.status == "rewritten")

    @property
    def skipped(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.status == "skipped")

    def totals(self) -> dict:
        savings = [s.savings for s in self.rewritten if s.savings]
        before = sum(s.bytes_per_token_before for s in savings)
        after = sum(s.bytes_per_token_after for s in savings)
        return {
            "sites_rewritten": len(self.rewritten),
            "sites_skipped": len(self.skipped),
            "linears_rewritten": sum(len(s.consumers) for s in self.rewritten),
            "reduction_elems_per_token_before": sum(s.reduction_elems_before for s in savings),
            "reduction_elems_per_token_after": sum(s.reduction_elems_after for s in savings),
            "bytes_per_token_before": before,
            "bytes_per_token_after": after,
            "bytes_saved_fraction": 1.0 - after / before if before else 0.0,
        }

    def _rewritten_rows(self) -> list[list]:
        rows = []
        for s in self.rewritten:
            sv = s.savings
            rows.append([s.norm, ", ".join(_relative_to_parent(c, s.norm) for c in s.consumers), s.format,
                         s.hidden_size,
                         f"{sv.reduction_elems_before} -> {sv.reduction_elems_after}",
                         f"{sv.bytes_per_token_before:,.0f} -> {sv.bytes_per_token_after:,.0f}",
                         f"{s.rescale:.4f}", s.reason or ""])
        return rows

    _REWRITTEN_HEADERS = ["norm", "consumers (next to the norm)", "format", "D", "reduce/row", "bytes/token", "rescale", "note"]

    def _tables(self, tablefmt: str) -> list[tuple[str, str]]:
        title = (f"mxrewrite report: format={self.format} norm={self.norm}"
                 + (f" p={self.p} rescale={self.rescale_mode}" if self.norm == "mxnorm" else "")
                 + f" grad_cast={self.grad_cast}"
                 + (" fsdp_fp8_all_gather (gains applied in the norms' casts)" if self.fsdp_fp8_all_gather else ""))
        tables = [(title, "")]
        if self.rewritten:
            tables.append((f"Rewritten sites ({len(self.rewritten)})",
                           tabulate(self._rewritten_rows(), self._REWRITTEN_HEADERS, tablefmt=tablefmt)))
        if self.skipped:
            rows = [[s.norm, s.hidden_size, s.reason] for s in self.skipped]
            tables.append((f"Skipped RMSNorms ({len(self.skipped)})",
                           tabulate(rows, ["norm", "D", "reason"], tablefmt=tablefmt)))
        if self.linears:
            converted = sum(row.status != "kept" for row in self.linears)
            tables.append((f"Linears ({converted} of {len(self.linears)} in {self.format})",
                           tabulate([[r.name, r.status, r.note] for r in self.linears], ["linear", "input", "note"],
                                    tablefmt=tablefmt)))
        if self.rejected:
            rows = [[r.name, r.reason] for r in self.rejected]
            tables.append((f"Not RMSNorm, left untouched ({len(self.rejected)})",
                           tabulate(rows, ["candidate", "reason"], tablefmt=tablefmt)))
        t = self.totals()
        totals = [["sites rewritten / skipped", f"{t['sites_rewritten']} / {t['sites_skipped']}"],
                  ["linears fed by fused casts", t["linears_rewritten"]],
                  ["reduced values per token", f"{t['reduction_elems_per_token_before']:,} -> "
                                               f"{t['reduction_elems_per_token_after']:,}"],
                  ["norm+cast bytes per token", f"{t['bytes_per_token_before']:,.0f} -> "
                                                f"{t['bytes_per_token_after']:,.0f} "
                                                f"({100 * t['bytes_saved_fraction']:.0f}% less)"]]
        tables.append(("Totals", tabulate(totals, tablefmt=tablefmt)))
        return tables

    def __str__(self) -> str:
        parts = []
        for title, table in self._tables("simple"):
            parts.append(title if not table else f"\n{title}\n{table}")
        return "\n".join(parts)

    def to_markdown(self) -> str:
        parts = []
        for i, (title, table) in enumerate(self._tables("github")):
            parts.append(f"## {title}" if i == 0 else f"\n### {title}\n\n{table}")
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict:
        return {**asdict(self), "totals": self.totals()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _relative_to_parent(name: str, norm: str) -> str:
    """``model.layers.0.self_attn.q_proj`` next to ``model.layers.0.input_layernorm`` -> ``self_attn.q_proj``."""
    parent = norm.rpartition(".")[0]
    return name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name


def site_savings(site: ModuleSite, fmt: str, norm: str) -> Savings:
    """The traffic model of the module docstring for one rewritten site."""
    spec = get_format(fmt)
    hidden = site.hidden_size
    cast_bytes = spec.bytes_per_row(hidden)
    exact_norm = hidden * (site.input_bytes + site.output_bytes)
    before = exact_norm + len(site.linears) * (hidden * site.output_bytes + cast_bytes)
    after = hidden * site.input_bytes + cast_bytes + torch.float32.itemsize + (exact_norm if site.kept else 0)
    reduce_after = hidden // spec.block_size if norm == "mxnorm" else hidden
    return Savings(hidden, reduce_after, float(before), float(after))


def _linear_rows(sites: list[ModuleSite], linears: list[LinearChoice]) -> tuple[LinearRow, ...]:
    rows = [LinearRow(name, "fused cast", f"from {s.norm}") for s in sites if s.rewritten for name in s.linears]
    rows += [LinearRow(c.name, "own cast" if c.converted else "kept", "" if c.converted else c.reason)
             for c in linears]
    return tuple(dict((r.name, r) for r in rows).values())


def build_report(config: RewriteConfig, sites: list[ModuleSite], rejected: list[RejectedCandidate],
                 linears: list[LinearChoice] = ()) -> Report:
    """The report of the module-level sites, the norm-like candidates that were not RMSNorms and, under
    ``linears="all"``, every linear."""
    rows = []
    for site in sites:
        common = dict(norm=site.norm, hidden_size=site.hidden_size, format=config.format, spelling=site.spelling,
                      kept_consumers=site.kept, status=site.status, reason=site.reason)
        if site.rewritten:
            rows.append(Site(consumers=site.linears, rescale=site.constants.correction,
                             savings=site_savings(site, config.format, config.norm), **common))
        else:
            rows.append(Site(consumers=(), **common))
    return Report(config.format, config.norm, config.p, config.rescale, tuple(rows),
                  tuple(Rejected(r.name, r.reason) for r in rejected),
                  _linear_rows(sites, linears) if config.linears == "all" else (), config.grad_cast,
                  config.fsdp_fp8_all_gather)
