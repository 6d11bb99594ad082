"""Looking inside a trained translation model: attention maps, one word in two contexts, and
their figures."""
