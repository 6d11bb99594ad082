"""A run on disk: its checkpoints, its specification, and loading its parameters for use."""
