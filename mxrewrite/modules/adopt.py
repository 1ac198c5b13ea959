"""Take over a module's place in the tree without copying it: same parameters, buffers and children."""

from __future__ import annotations

import torch.nn as nn


def adopt_state(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the parameters, buffers, submodules and plain attributes of ``old``, as the same objects.

    The dicts are new (so registering on one module never changes the other) but
    hold the same ``Parameter`` and buffer objects, under the same names: an
    optimizer, ``state_dict``, FSDP2 or tensor parallelism sees the tensors of the
    module that was replaced. Hooks stay with ``old``.
    """
    new._parameters = dict(old._parameters)
    new._buffers = dict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new._modules = dict(old._modules)
    for key, value in vars(old).items():
        if not key.startswith("_") and key not in vars(new):
            setattr(new, key, value)
    new.training = old.training
