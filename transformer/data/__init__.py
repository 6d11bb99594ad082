"""Input: text (tfds) -> SentencePiece ids, cached once -> planned, padded or packed batches.

Dimension key (as in the package docstring): B batch, S source length, T target length,
V vocabulary size; n counts pairs or windows.
"""
