"""Benchmarks of the Transformer package: one script per question, shared tools in `common`."""
