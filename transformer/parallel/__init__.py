"""Parallelism: logical axes, meshes and sharded steps."""
