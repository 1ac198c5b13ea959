"""The pipeline, one stage per module: capture -> match -> plan -> rewrite (see shared DESIGN.md)."""
