"""Prints the numbers of docs/tutorial.md: one sentence through the first encoder layer.

  python docs/walkthrough.py --workdir runs/default ["A dog runs on the grass."] [--images DIR]

Each step is computed by hand from the model's parameters and checked against the library's
own module, so the printed numbers are the ones the model computes. `--images` also writes the
tutorial's figures (the sentence's maps and the "apple" contrast), reduced to a 128-colour
palette so that they stay small enough to keep in git.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from transformer.inspect import figures
from transformer.inspect.attention import encoder_states, pieces_of, prepare_sentence, source_ids
from transformer.inspect.contrast import contrast_word
from transformer.model.attention import attention_logits, attention_weights
from transformer.model.layers import sinusoidal_position_encoding
from transformer.model.masks import padding_mask
from transformer.visualize import load_translator

COLUMNS = 4  # dimensions shown of each D- or H-wide vector


def show(name: str, array, rows: list[str] | None = None) -> None:
  array = np.asarray(array)
  print(f"\n{name}  shape {list(array.shape)}")
  if array.ndim == 1:
    print("  " + np.array2string(array, precision=3, suppress_small=True, max_line_width=100))
    return
  for i, row in enumerate(array):
    label = rows[i] if rows else str(i)
    print(
      f"  {label:>12} " + np.array2string(row, precision=3, suppress_small=True, max_line_width=120)
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("text", nargs="?", default="A dog runs on the grass.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--head", type=int, default=0, help="the head followed in detail")
  parser.add_argument("--images", help="also write the tutorial's figures into this directory")
  args = parser.parse_args()
  translator = load_translator(args.workdir)
  model, config = translator.model, translator.model.config
  if config.norm != "post" or config.position != "sinusoidal":
    raise SystemExit("this walk-through follows the paper's model: post-LN, sinusoidal positions")
  d, n, h, i = config.d_model, config.num_heads, config.head_dim, args.head
  print(
    f"d_model D={d}, heads h=N={n}, d_k=d_v=H={h}, layers L={config.num_encoder_layers}, "
    f"V={config.vocab_size}"
  )

  # 1. Tokens: SentencePiece pieces, then EOS.
  ids = source_ids(translator.tokenizer, args.text, translator.max_source_tokens)
  pieces = pieces_of(translator.tokenizer, ids)
  print(f"\n1. tokens: {list(zip(pieces, ids))}")
  src_1S = jnp.asarray([ids], jnp.int32)

  # 2. Embedding: the table row times sqrt(d_model) (Section 3.4).
  table_VD = np.asarray(model.source_embed.table[...])
  emb_SD = table_VD[ids] * math.sqrt(d)
  assert np.allclose(emb_SD, model.source_embed(src_1S)[0], atol=1e-5)
  show(
    f"2. embedding x sqrt(d_model) = x {math.sqrt(d):.2f}, first {COLUMNS} dims",
    emb_SD[:, :COLUMNS],
    pieces,
  )
  print(
    f"   row norms: table {np.linalg.norm(table_VD[ids], axis=1).round(2)}, "
    f"scaled {np.linalg.norm(emb_SD, axis=1).round(2)}"
  )

  # 3. Positional encodings PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
  pe_SD = np.asarray(sinusoidal_position_encoding(len(ids), d))
  show(
    f"3. positional encoding, first {COLUMNS} dims (sin, cos, sin, cos)", pe_SD[:, :COLUMNS], pieces
  )
  x_SD = emb_SD + pe_SD
  states = encoder_states(model, src_1S)
  assert np.allclose(x_SD, states[0][0], atol=1e-4)
  show("   encoder input = embedding + PE", x_SD[:, :COLUMNS], pieces)

  # 4. Q, K, V of one head: x W_i^Q + b (W_i^Q is the [D, H] slice of the [D, N, H] kernel).
  attention = model.encoder.layers[0].self_attention
  project = lambda kernel, bias: x_SD @ np.asarray(kernel[...])[:, i] + np.asarray(bias[...])[i]
  q_SH = project(attention.query, attention.query_bias)
  k_SH = project(attention.key, attention.key_bias)
  v_SH = project(attention.value, attention.value_bias)
  for name, value in (("Q", q_SH), ("K", k_SH), ("V", v_SH)):
    show(
      f"4. {name} = x W_{i + 1}^{name} + b, head {i + 1}, first {COLUMNS} of d_k={h} dims",
      value[:, :COLUMNS],
      pieces,
    )

  # 5. Scaled scores Q K^T / sqrt(d_k), and 6. their softmax over keys.
  scores_SS = q_SH @ k_SH.T / math.sqrt(h)
  show(
    f"5. scores Q K^T / sqrt({h}) = / {math.sqrt(h):.2f}  (rows: queries, columns: keys {pieces})",
    scores_SS,
    pieces,
  )
  weights_SS = np.exp(scores_SS - scores_SS.max(1, keepdims=True))
  weights_SS /= weights_SS.sum(1, keepdims=True)
  show("6. softmax weights (each row sums to 1)", weights_SS, pieces)

  # The library's own functions on all heads at once give the same numbers.
  all_heads = lambda kernel, bias: (
    jnp.einsum("BSD,DNH->BSNH", x_SD[None], kernel[...]) + bias[...][None, None]
  )
  q_1SNH = all_heads(attention.query, attention.query_bias)
  k_1SNH = all_heads(attention.key, attention.key_bias)
  assert np.allclose(attention_logits(q_1SNH, k_1SNH)[0, i], scores_SS, atol=1e-3)
  library_1NSS = attention_weights(q_1SNH, k_1SNH, mask=padding_mask(src_1S, config.pad_id))
  assert np.allclose(library_1NSS[0, i], weights_SS, atol=1e-5)

  # 7. Per-head output: softmax(...) V, then 8. Concat(head_1..head_h) W^O + b.
  head_SH = weights_SS @ v_SH
  show(f"7. head {i + 1} = weights V, first {COLUMNS} dims", head_SH[:, :COLUMNS], pieces)
  kernel_NHD = np.asarray(attention.out[...])
  heads = []
  for j in range(n):
    w_SS = np.asarray(library_1NSS[0, j])
    heads.append(
      w_SS
      @ (x_SD @ np.asarray(attention.value[...])[:, j] + np.asarray(attention.value_bias[...])[j])
    )
  concat_SD = np.concatenate(heads, axis=1)  # [S, N * H] = [S, D]
  w_o_DD = kernel_NHD.reshape(n * h, d)
  y_SD = concat_SD @ w_o_DD + np.asarray(attention.out_bias[...])
  print(f"\n8. Concat(head_1..head_{n}): [{len(ids)}, {n} x {h} = {n * h}]; W^O: [{n * h}, {d}]")
  show(f"   MultiHead(x) = Concat W^O + b, first {COLUMNS} dims", y_SD[:, :COLUMNS], pieces)
  module_SD = attention(jnp.asarray(x_SD[None]), mask=padding_mask(src_1S, config.pad_id))[0]
  attention_error = np.abs(y_SD - np.asarray(module_SD)).max()
  print(f"   max |by hand - MultiHeadAttention module| = {attention_error:.2e}")
  assert attention_error < 1e-4, attention_error

  # 9. Add & Norm, the feed-forward network, Add & Norm: the layer's output.
  layer = model.encoder.layers[0]
  after_attention_SD = np.asarray(layer.attention_block.norm(jnp.asarray((x_SD + y_SD)[None]))[0])
  ffn_SD = np.asarray(layer.feed_forward(jnp.asarray(after_attention_SD[None]))[0])
  out_SD = np.asarray(
    layer.feed_forward_block.norm(jnp.asarray((after_attention_SD + ffn_SD)[None]))[0]
  )
  show(
    f"9. LayerNorm(x + MultiHead(x)), first {COLUMNS} dims", after_attention_SD[:, :COLUMNS], pieces
  )
  show(
    f"   encoder layer 1 output = LayerNorm(. + FFN(.)), first {COLUMNS} dims",
    out_SD[:, :COLUMNS],
    pieces,
  )
  error = np.abs(out_SD - np.asarray(states[1][0])).max()
  print(f"   max |by hand - encoder layer 1| = {error:.2e}")
  assert error < 1e-4, error
  print(
    f"\n10. after all {config.num_encoder_layers} layers the memory is [{len(ids)}, {d}]; "
    f"translation (beam 4): {translator.translate([args.text])[0]!r}"
  )
  if args.images:
    write_images(translator, args.text, Path(args.images))


def write_images(translator, text: str, out_dir: Path) -> None:
  """The overview and last-layer maps of `text`, and the apple contrast, as palette PNGs."""
  from PIL import Image

  model, tokenizer = translator.model, translator.tokenizer
  sentence = prepare_sentence(
    model, tokenizer, text, max_source_tokens=translator.max_source_tokens
  )
  paths = figures.write_attention_figures(model, sentence, out_dir)
  report = contrast_word(model, tokenizer, max_source_tokens=translator.max_source_tokens)
  paths += figures.write_contrast(report, out_dir)
  last = model.config.num_encoder_layers
  keep = {
    "overview.png",
    f"encoder_self_layer{last}.png",
    f"cross_layer{last}.png",
    "contrast_attention.png",
    "contrast_similarity.png",
    "contrast.json",
  }
  for path in paths:
    if path.name not in keep:
      path.unlink()
    elif path.suffix == ".png":
      Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
      print(f"{path}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
  main()
