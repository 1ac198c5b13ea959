"""Helpers shared by the GPU benchmark scripts (bench_layer, bench_train, bench_mx_gemm).

* the run's environment (:func:`environment`) and its one-line summary (:func:`env_line`);
* the arms: :class:`NotAvailable`, the recipe builders (:func:`torchao_float8`, :func:`build_mxrewrite`)
  with their availability checks, the ``--arms`` filter (:func:`select_arms`) and the result row of an
  arm that did not run (:func:`arm_not_run`);
* timing: :func:`bench_ms`.

The scripts are run as ``python benchmarks/<script>.py`` and imported by the tests; either way they
put this folder on ``sys.path`` and import this module as ``bench_common``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

import torch

# ---------------------------------------------------------------------------------------------
# Environment


def environment(cpu: str | None = None) -> dict:
    """Date, versions (torch, Python, triton, torchao, transformers), device and the command line of this run.

    ``cpu``: how a CPU device is described (default ``platform.machine()``)."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = "sm_" + "".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({cpu or platform.machine()}, {os.cpu_count()} cores)"
    for pkg in ("triton", "torchao", "transformers"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001
            env[pkg] = "not installed"
    return env


def env_line(env: dict, packages: tuple[str, ...] = ("triton", "torchao")) -> str:
    """One line of :func:`environment`: device (capability), date, torch, ``packages``, Python."""
    dev = env["device"] + (f" ({env['capability']})" if "capability" in env else "")
    versions = "".join(f", {pkg} {env[pkg]}" for pkg in packages)
    return f"{dev}, {env['date_utc']} UTC, torch {env['torch']}{versions}, Python {env['python']}"


# ---------------------------------------------------------------------------------------------
# Arms


class NotAvailable(Exception):
    """The API an arm needs is not there (yet): the arm is reported, not failed."""


def fp8_api_missing() -> str | None:
    """Why ``optimize(format="fp8", linears="all")`` cannot be called, or None when it can."""
    import dataclasses

    import mxrewrite

    fields = {f.name for f in dataclasses.fields(mxrewrite.RewriteConfig)}
    if "linears" not in fields:
        return "mxrewrite.RewriteConfig has no 'linears' field yet"
    try:
        mxrewrite.RewriteConfig(format="fp8", linears="all")
    except Exception as exc:  # noqa: BLE001 - any refusal means the format is not there
        return f"RewriteConfig(format='fp8', linears='all') refused: {exc}"
    return None


def torchao_missing() -> str | None:
    """Why ``torchao.float8`` cannot be imported, or None when it can."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"torchao.float8 cannot be imported: {exc!r}"
    return None


def torchao_float8(model: torch.nn.Module, recipe: str, **kwargs) -> torch.nn.Module:
    """``convert_to_float8_training`` (in place) with ``Float8LinearConfig.from_recipe_name(recipe)``;
    ``kwargs`` go to it (e.g. ``module_filter_fn``). :class:`NotAvailable` without ``torchao.float8``."""
    missing = torchao_missing()
    if missing:
        raise NotAvailable(missing)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    return convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), **kwargs)


def build_mxrewrite(needs_fp8: bool, **kwargs):
    """An arm's builder ``(model, example) -> mxrewrite.optimize(model, (example,), **kwargs)``;
    ``needs_fp8``: :class:`NotAvailable` while :func:`fp8_api_missing` says why not."""

    def build(model, example):
        import mxrewrite

        if needs_fp8:
            missing = fp8_api_missing()
            if missing:
                raise NotAvailable(missing)
        return mxrewrite.optimize(model, (example,), progress=False, **kwargs)

    return build


def select_arms(arms: list, spec: str) -> list:
    """The arms named by ``--arms``: comma-separated substrings of their names (all arms when empty);
    the ``bf16`` arm (the reference) always."""
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    return [a for a in arms if a.kind == "bf16" or not wanted or any(w in a.name for w in wanted)]


def arm_not_run(arm, exc: Exception, device: str) -> dict:
    """The result row of an arm that raised ``exc``: "not available" (:class:`NotAvailable`), else the
    error (its traceback printed): "skipped on CPU" on CPU, "FAILED" on a GPU."""
    if isinstance(exc, NotAvailable):
        return dict(arm=arm.name, kind=arm.kind, status=f"not available: {exc}")
    traceback.print_exception(exc)
    where = "skipped on CPU" if device == "cpu" else "FAILED"
    return dict(arm=arm.name, kind=arm.kind, status=f"{where}: {type(exc).__name__}: {exc}"[:400])


# ---------------------------------------------------------------------------------------------
# Timing


def bench_ms(fn, warmup_ms: int, rep_ms: int, cpu_runs: int = 3) -> float:
    """Median ms of ``fn``: triton's do_bench on a GPU; on CPU (smoke runs only) one untimed call, then
    the wall-clock median of ``cpu_runs`` calls."""
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(cpu_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
