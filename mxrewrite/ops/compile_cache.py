"""Tie torch.compile's on-disk caches to this version of the ops.

Inductor and AOTAutograd key their caches on the captured graph, which names our
ops (``mxrewrite.mx_linear``, ...) but not their Python bodies: after the ops
change (an upgrade, or an edit in a checkout), a cached artifact can replay the
old decomposition, calling ops that no longer exist or running old kernels. On
import we append a hash of the ops' source files to
``torch.compiler.config.cache_key_tag`` (the tag torch provides "to break
caches"), keeping whatever tag the user set.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_OPS_DIR = Path(__file__).parent


def ops_source_hash() -> str:
    """A short hash of every Python file under ``mxrewrite/ops`` (kernels included)."""
    digest = hashlib.sha256()
    for path in sorted(_OPS_DIR.rglob("*.py")):
        digest.update(path.relative_to(_OPS_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_caches() -> None:
    """Add ``mxrewrite-<hash>`` to torch.compile's cache key tag (once; no-op on a torch without it)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        log.debug("torch.compiler.config.cache_key_tag is missing: compile caches are not tied to mxrewrite's ops")
        return
    tag = f"mxrewrite-{ops_source_hash()}"
    current = config.cache_key_tag or ""
    if tag not in current.split("|"):
        config.cache_key_tag = f"{current}|{tag}" if current else tag
