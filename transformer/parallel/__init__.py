"""Parallelism: logical axes and their mesh rules, meshes, sharding, the two train-step strategies,
and multi-host start-up. It imports nothing else of the package."""
