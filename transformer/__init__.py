"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) in JAX and Flax NNX.

Dimension key, used in every shape comment, tensor suffix and einsum string:
  B batch, S source length, T target length, D d_model, N heads, H head width (the paper's d_k),
  F d_ff, V vocabulary, L layers, K attention block, C classes, W beam width (R = B W rows),
  n a count of pairs or windows.

Using a trained run:

    from transformer import Translator, attention_maps
    translator = Translator("runs/default")                 # the run's exported model
    translator.translate(["A dog runs on the beach."])      # -> ["Ein Hund rennt am Strand."]
    sentence, maps = attention_maps(translator, "A dog runs on the beach.")
    maps.cross[-1][0]                                       # last layer's [N, T, S] weights

Training from Python: `transformer.train.loop.run(transformer.configs.default.get_config(),
"runs/NAME")`.
"""

from transformer import startup

startup.stop_until_started()  # before the imports below, which take a second or two
startup.import_jax()  # a JAX_* variable that JAX refuses is one line

from transformer.model import (  # noqa: E402
  DecoderOnly,
  EncoderDecoder,
  EncoderOnly,
  MultiHeadAttention,
  TransformerConfig,
  dot_product_attention,
  sinusoidal_position_encoding,
)

__all__ = [
  "DecoderOnly",
  "EncoderDecoder",
  "EncoderOnly",
  "MultiHeadAttention",
  "TransformerConfig",
  "Translator",
  "attention_maps",
  "dot_product_attention",
  "sinusoidal_position_encoding",
]
__version__ = "0.2.0"


def __getattr__(name: str):
  # Loaded on first use: `import transformer` stays as light as the model.
  if name == "Translator":
    from transformer.runs.translator import Translator

    return Translator
  if name == "attention_maps":
    from transformer.inspect.attention import attention_maps

    return attention_maps
  raise AttributeError(f"module 'transformer' has no attribute {name!r}")
