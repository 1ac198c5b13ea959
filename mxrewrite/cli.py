"""Command line: ``python -m mxrewrite report|verify|bench MODULE:FACTORY [options]``.

``FACTORY`` is a callable in an importable module (or a ``path/to/file.py``)
that returns ``(model, example_inputs)``; example inputs take any form
:func:`mxrewrite.optimize` accepts. Examples::

    python -m mxrewrite report examples/llama_report.py:build --format nvfp4
    python -m mxrewrite verify examples/llama_report.py:build --grads
    python -m mxrewrite bench examples/llama_report.py:build --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from mxrewrite.api import get_report, optimize, split_inputs
from mxrewrite.config import RewriteConfig
from mxrewrite.errors import MXRewriteError
from mxrewrite.ops.mx_linear import GRAD_CASTS
from mxrewrite.verify import verify


def load_factory(spec: str):
    """Resolve ``module.path:callable`` or ``file.py:callable``."""
    if ":" not in spec:
        raise MXRewriteError(f"model spec {spec!r} must look like 'package.module:factory' or 'file.py:factory'")
    module_name, attr = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise MXRewriteError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise MXRewriteError(f"{module_name} has no attribute {attr!r}") from None


def _config_from_args(args) -> RewriteConfig:
    fields = {f.name for f in dataclasses.fields(RewriteConfig)}
    return RewriteConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def _move(inputs, device):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def _build(args):
    model, inputs = load_factory(args.model)()
    model, inputs = model.to(args.device), _move(inputs, args.device)
    return model, inputs, optimize(model, inputs, config=_config_from_args(args), progress=True)


def _time(fn, iters: int, device: str) -> float:
    """Median seconds of ``fn`` after warm-up (synchronising CUDA)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cmd_report(args) -> int:
    _, _, opt = _build(args)
    report = get_report(opt)
    print(report.to_json() if args.json else report.to_markdown() if args.markdown else report)
    return 0


def cmd_verify(args) -> int:
    model, inputs, opt = _build(args)
    result = verify(model, opt, inputs, grads=args.grads)
    print(result)
    return 0 if result.ok else 1


def cmd_bench(args) -> int:
    model, inputs, opt = _build(args)
    pos, kw = split_inputs(inputs)
    rows = []
    for name, module in (("original", model), ("optimized", opt)):
        run = torch.compile(module) if args.compile else module

        def forward():
            with torch.no_grad():
                run(*pos, **kw)

        def train_step():
            out = run(*pos, **kw)
            loss = sum(t.float().pow(2).mean() for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.is_floating_point())
            loss.backward()

        rows.append([name, 1e3 * _time(forward, args.iters, args.device),
                     1e3 * _time(train_step, args.iters, args.device)])
        model.zero_grad(set_to_none=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device_name}, torch {torch.__version__}, compile={args.compile}, median of {args.iters}")
    print(tabulate(rows, ["model", "forward ms", "forward+backward ms"], floatfmt=".3f"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mxrewrite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="MODULE:FACTORY returning (model, example_inputs)")
    common.add_argument("--format", choices=["mxfp8", "nvfp4", "fp8"])
    common.add_argument("--norm", choices=["mxnorm", "rmsnorm"])
    common.add_argument("--p", type=int, choices=[1, 2])
    common.add_argument("--scale-mode", dest="scale_mode", choices=["rceil", "floor"])
    common.add_argument("--rescale", choices=["gaussian", "calibrated", "none"])
    common.add_argument("--include-head", dest="include_head", action="store_true", default=None)
    common.add_argument("--grad-cast", dest="grad_cast", choices=list(GRAD_CASTS))
    common.add_argument("--linears", choices=["norm-fed", "all"])
    common.add_argument("--fsdp-fp8-all-gather", dest="fsdp_fp8_all_gather", action="store_true", default=None,
                        help="format fp8: FSDP2 gathers the weights' FP8 casts (the norms apply their gains)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("-v", "--verbose", action="store_true")
    report = sub.add_parser("report", parents=[common], help="print the rewrite report")
    report.add_argument("--json", action="store_true")
    report.add_argument("--markdown", action="store_true")
    report.set_defaults(func=cmd_report)
    ver = sub.add_parser("verify", parents=[common], help="compare numerics with the original model")
    ver.add_argument("--grads", action="store_true", help="also compare parameter gradients")
    ver.set_defaults(func=cmd_verify)
    bench = sub.add_parser("bench", parents=[common], help="time original vs optimized")
    bench.add_argument("--compile", action="store_true", help="torch.compile both models")
    bench.add_argument("--iters", type=int, default=20)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MXRewriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
