"""Watch modules while a model runs: the one hook mechanism calibration, partial capture and verify share.

:func:`run_watching` runs the model (without gradients) on each set of inputs and
calls ``on_call(name, args, kwargs, output)`` for every call of every watched
module (``output`` is None when watching inputs, ``before=True``); the hooks are
removed afterwards, also when the model raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["run_watching"]

OnCall = Callable[[str, tuple, dict, Any], None]


def run_watching(model: nn.Module, inputs: Iterable[tuple[tuple, dict]], modules: Iterable[tuple[str, nn.Module]],
                 on_call: OnCall, *, before: bool = False) -> None:
    """Run ``model(*args, **kwargs)`` for each of ``inputs`` under ``torch.no_grad``, reporting each call of
    ``modules`` (``(name, module)`` pairs) to ``on_call``: its inputs (``before=True``) or inputs and output."""
    handles = []
    for name, module in modules:
        if before:
            def pre_hook(_, args, kwargs, name=name):
                on_call(name, args, kwargs, None)
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(_, args, kwargs, output, name=name):
                on_call(name, args, kwargs, output)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
