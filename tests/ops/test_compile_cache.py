"""torch.compile's caches are keyed on a hash of the ops' sources (stale artifacts cannot replay)."""

from __future__ import annotations

import torch

import mxrewrite.ops  # noqa: F401  (tags the caches on import)
from mxrewrite.ops import compile_cache


def test_import_tags_the_compile_cache_key():
    assert f"mxrewrite-{compile_cache.ops_source_hash()}" in torch.compiler.config.cache_key_tag.split("|")


def test_tag_keeps_the_users_tag_and_is_added_once():
    with torch.compiler.config.patch(cache_key_tag="mine"):
        compile_cache.tag_compile_caches()
        compile_cache.tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == f"mine|mxrewrite-{compile_cache.ops_source_hash()}"


def test_hash_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "op.py").write_text("x = 1\n")
    monkeypatch.setattr(compile_cache, "_OPS_DIR", tmp_path)
    before = compile_cache.ops_source_hash()
    (tmp_path / "op.py").write_text("x = 2\n")
    assert compile_cache.ops_source_hash() != before
