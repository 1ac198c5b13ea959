"""Helpers shared by the GPU benchmark scripts (bench_layer, bench_train, bench_mx_gemm).

* the run's environment (:func:`environment`), its one-line summary (:func:`env_line`) and the
  ``.json`` + ``.md`` report of a kernel benchmark (:func:`write_report`);
* the transformers Llama of the training benchmarks (:data:`LLAMA_PRESETS`, :func:`llama_for_causal_lm`);
* the arms: :class:`NotAvailable`, the recipe builders (:func:`torchao_float8`, :func:`build_mxrewrite`)
  with their availability checks, the ``--arms`` filter (:func:`select_arms`) and the result row of an
  arm that did not run (:func:`arm_not_run`);
* timing: :func:`bench_ms`.

The scripts are run as ``python benchmarks/<script>.py`` and imported by the tests; either way they
put this folder on ``sys.path`` and import this module as ``bench_common``.
"""

from __future__ import annotations

import datetime
import json
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


def write_report(out_dir: str, stem: str, payload: dict, header: str, table: str) -> None:
    """``<stem>.json`` (``payload``) and ``<stem>.md`` (``header``, then ``table``) in ``out_dir``; the table
    printed too."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    print("\n" + table)


# ---------------------------------------------------------------------------------------------
# The transformers Llama of bench_train and bench_distributed

LLAMA_PRESETS = {
    # ~1.10B parameters (0.97B in the decoder layers)
    "1b": dict(vocab=32000, hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8),
    # ~3.2B parameters: Llama-3.2-3B's layer shapes
    "3b": dict(vocab=32000, hidden=3072, layers=28, ffn=8192, heads=24, kv_heads=8),
    # Llama-3-8B's layer shapes, 8 layers (~1.9B parameters)
    "8b-layers": dict(vocab=32000, hidden=4096, layers=8, ffn=14336, heads=32, kv_heads=8),
    "smoke": dict(vocab=512, hidden=128, layers=2, ffn=256, heads=4, kv_heads=2),
}


def llama_for_causal_lm(preset: dict, seq: int, device, seed: int) -> torch.nn.Module:
    """A float32 ``LlamaForCausalLM`` with random weights from ``seed``, built on ``device``: untied head,
    SDPA attention, no KV cache, rope theta 500000."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["ffn"],
        num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"], max_position_embeddings=max(seq, 128), rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


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


def torchao_float8(model: torch.nn.Module, recipe: str, config_overrides: dict | None = None,
                   **kwargs) -> torch.nn.Module:
    """``convert_to_float8_training`` (in place) with ``Float8LinearConfig.from_recipe_name(recipe)``, its
    fields replaced by ``config_overrides``; ``kwargs`` go to it (e.g. ``module_filter_fn``).
    :class:`NotAvailable` without ``torchao.float8``."""
    missing = torchao_missing()
    if missing:
        raise NotAvailable(missing)
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), **(config_overrides or {}))
    return convert_to_float8_training(model, config=config, **kwargs)


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


def converted_linears(module: torch.nn.Module) -> tuple[int, int]:
    """(linears the recipe replaced, all linears): a replaced one is an ``nn.Linear`` of another class."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return sum(1 for m in linears if type(m) is not torch.nn.Linear), len(linears)


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


def sync(device) -> None:
    """Wait for ``device`` (a ``torch.device`` or its type name) when it is a GPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def allow_recompiles(limit: int = 64) -> None:
    """Let dynamo keep ``limit`` graphs per frame (per-layer compile of several arms in one process would
    otherwise fall back to eager silently): ``recompile_limit``, ``cache_size_limit`` on older torch."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, limit)


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
