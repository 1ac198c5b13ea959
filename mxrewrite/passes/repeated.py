"""Repeated blocks: capture one block of each structure, then map what was found onto its copies.

A 32-layer transformer holds 32 blocks of one structure. Analysing each costs 32
times one block, for 32 identical answers. :func:`representatives` shortens every
``nn.ModuleList``/``nn.ModuleDict`` of blocks, while the model is captured, to the
shortest prefix that still holds one block of each structure; :func:`block_copies`
names the copies of a site found in a representative to every block of the same structure.

A block's structure is its module tree: each submodule's class, its parameters' and
buffers' names, shapes and dtypes, and its float, bool and string attributes (eps,
dropout, attention type), alone or in lists. Integer attributes are left out on purpose: they are
counters such as ``layer_idx`` that differ between otherwise identical layers.
Only containers of blocks (modules with children) are shortened: a list of leaf
modules (experts, heads) costs little to capture and is often indexed by count.
The forward code is the class's, so blocks of one structure compute the same
thing; what runs after the rewrite is still each block's own forward.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

log = logging.getLogger(__name__)

__all__ = ["BlockGroups", "block_copies", "rebase", "representatives"]


def _is_setting(value) -> bool:
    """A float, bool or string, or a list/tuple of them: settings that may change what a forward does."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (float, bool, str)) for v in value)
    return isinstance(value, (float, bool, str))


def _signature(block: nn.Module) -> tuple:
    parts = []
    for name, sub in block.named_modules():
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in sub.named_parameters(recurse=False))
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in sub.named_buffers(recurse=False))
        attrs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(sub).items()
                             if not k.startswith("_") and _is_setting(v)))
        parts.append((name, type(sub).__qualname__, params, buffers, attrs))
    return tuple(parts)


@dataclass(frozen=True)
class BlockGroups:
    """For each shortened container (by qualified name): member key -> its representative's key."""

    containers: dict[str, dict[str, str]]



def _containers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) >= 2 and name:
            yield name, module


@contextlib.contextmanager
def representatives(model: nn.Module) -> Iterator[BlockGroups]:
    """Shorten every container of repeated blocks of ``model`` while the block is active (restored after)."""
    saved: dict[nn.Module, OrderedDict] = {}
    groups: dict[str, dict[str, str]] = {}
    try:
        for name, container in list(_containers(model)):
            if any(name.startswith(outer + ".") for outer in groups):
                continue  # inside a block that is itself shortened: its own copies are analysed with it
            if not all(any(True for _ in block.children()) for block in container.children()):
                continue  # a list of leaf modules (experts, heads) costs little and is often indexed by count
            first: dict[tuple, str] = {}
            members: dict[str, str] = {}
            keys = list(container._modules)
            for key in keys:
                members[key] = first.setdefault(_signature(container._modules[key]), key)
            keep = max(keys.index(k) for k in first.values()) + 1
            if keep == len(keys):
                continue
            saved[container] = container._modules
            container._modules = OrderedDict((k, container._modules[k]) for k in keys[:keep])
            groups[name] = members
            log.debug("capturing %d of the %d blocks of %s", keep, len(keys), name)
        yield BlockGroups(groups)
    finally:
        for container, modules in saved.items():
            container._modules = modules


def block_copies(name: str, groups: BlockGroups) -> tuple[str, tuple[str, ...]]:
    """For a name inside a representative block: that block's prefix and the prefixes of every block of its
    structure (itself first); ``("", ())`` for a name outside every shortened container."""
    for container, members in groups.containers.items():
        for member, rep in members.items():
            if member == rep and f"{name}.".startswith(f"{container}.{rep}."):
                return f"{container}.{rep}.", tuple(f"{container}.{m}." for m, r in members.items() if r == rep)
    return "", ()


def rebase(name: str, old: str, new: str) -> str:
    """``name`` with the module prefix ``old`` (ending in ".") replaced by ``new``; the prefix's own module too."""
    if name.startswith(old):
        return new + name[len(old):]
    return new[:-1] if f"{name}." == old else name
