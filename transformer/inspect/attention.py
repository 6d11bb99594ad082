"""What a trained translation model attends to: every layer's attention maps for a sentence.

`collect_attention` runs the model once, teacher-forced on (source, BOS + translation), with every
`MultiHeadAttention` sowing its softmax weights, and returns them per kind and layer: encoder
self-attention [B, N, S, S], decoder masked self-attention [B, N, T, T] and encoder-decoder
attention [B, N, T, S]. `prepare_sentence` translates a sentence and keeps the SentencePiece
pieces that label the maps' axes (`transformer.inspect.figures` draws them). Layers are
numbered from 1 in every figure, file and JSON key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

from transformer.data.pipeline import padded
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.decode.batch import padded_length, translate_ids
from transformer.decode.config import PAPER_SEARCH, DecodeConfig
from transformer.errors import UserError
from transformer.model.attention import MultiHeadAttention
from transformer.model.transformer import EncoderDecoder

KINDS = ("encoder_self", "decoder_self", "cross")
KIND_TITLES = {
  "encoder_self": "encoder self-attention",
  "decoder_self": "decoder masked self-attention",
  "cross": "encoder-decoder attention",
}
# What a map's rows and columns are; a decoder row t holds the input piece t and predicts t + 1.
AXES_NOTES = {
  "encoder_self": "rows: source queries, columns: source keys",
  "decoder_self": "rows: decoder input (row t predicts piece t+1), columns: keys",
  "cross": "rows: decoder input (row t predicts piece t+1), columns: source",
}
WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word
SPECIAL_PIECES = ("<s>", "</s>", "<pad>")


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  """Softmax weights of every attention layer (float32), indexed [layer][b, head, query, key]."""

  encoder_self: list[np.ndarray]  # L x [B, N, S, S]
  decoder_self: list[np.ndarray]  # L x [B, N, T, T]
  cross: list[np.ndarray]  # L x [B, N, T, S]

  def of(self, kind: str) -> list[np.ndarray]:
    return getattr(self, kind)


def set_sow_attention_weights(model: nnx.Module, enabled: bool) -> None:
  """Turns the `sow_weights` hook of every MultiHeadAttention in `model` on or off."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MultiHeadAttention):
      module.sow_weights = enabled


@nnx.jit
def _forward_sowing(model, src_ids_BS, tgt_in_BT):
  return nnx.capture(model, nnx.Intermediate)(src_ids_BS, tgt_in_BT)


def collect_attention(
  model: EncoderDecoder, src_ids_BS: Int[ArrayLike, "B S"], tgt_in_BT: Int[ArrayLike, "B T"]
) -> tuple[np.ndarray, AttentionMaps]:
  """One teacher-forced pass of an encoder-decoder, returning (logits [B, T, V], all weights).

  Args:
    model: in eval mode (dropout would make the weights random); its hook is off again after.
    src_ids_BS: source ids [B, S], EOS-terminated, PAD-padded.
    tgt_in_BT: decoder input [B, T]: BOS + target pieces, PAD-padded.
  """
  set_sow_attention_weights(model, True)
  try:
    logits_BTV, sown = _forward_sowing(
      model, jnp.asarray(src_ids_BS, jnp.int32), jnp.asarray(tgt_in_BT, jnp.int32)
    )
  finally:
    set_sow_attention_weights(model, False)
  by_kind: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in KINDS}
  for path, variable in nnx.to_flat_state(sown):
    # e.g. ("decoder", "layers", 0, "cross_attention", "attention_weights")
    stack, _, layer, module, _ = path
    kind = (
      "encoder_self"
      if stack == "encoder"
      else "cross"
      if module == "cross_attention"
      else "decoder_self"
    )
    (weights_BNTS,) = variable.get_value()  # each module runs once in a teacher-forced pass
    by_kind[kind][int(str(layer))] = np.asarray(weights_BNTS)
  maps = AttentionMaps(
    **{kind: [layers[i] for i in sorted(layers)] for kind, layers in by_kind.items()}
  )
  return np.asarray(logits_BTV), maps


@nnx.jit
def encoder_states(
  model: EncoderDecoder, src_ids_BS: Int[Array, "B S"]
) -> list[Float[Array, "B S D"]]:
  """The encoder's residual stream (`Encoder.residual_stream`): its input, sqrt(D) * embedding +
  positions, and the output of each of its L layers; call it in eval mode (no dropout)."""
  return model.encoder.residual_stream(src_ids_BS)


# ------------------------------------------------------------------------------------------------
# Sentences: ids, pieces, words
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sentence:
  """A source sentence and its translation as the model sees them."""

  text: str
  translation: str
  src_ids: list[int]  # pieces + EOS: the encoder's input, the keys of cross-attention
  tgt_in_ids: list[int]  # BOS + translation pieces: the decoder's input, its queries
  src_pieces: list[str]
  tgt_pieces: list[str]


def pieces_of(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
  """The piece of each id, e.g. ["\u2581apple", "\u2581un", "ve", "</s>"]."""
  return tokenizer.pieces(ids)


def source_ids(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
  """Ids of `text` + EOS; an empty or over-long sentence is an error, never silently cut."""
  if not text.strip():
    raise UserError("the sentence is empty: give one non-empty sentence to visualise")
  ids = tokenizer.encode([text])[0] + [EOS_ID]
  if len(ids) > max_tokens:
    raise UserError(
      f"the sentence has {len(ids) - 1} pieces and the model takes at most "
      f"{max_tokens - 1}: shorten it"
    )
  return ids


def prepare_sentence(
  model: EncoderDecoder,
  tokenizer: Tokenizer,
  text: str,
  *,
  max_source_tokens: int,
  search: DecodeConfig = PAPER_SEARCH,
) -> Sentence:
  """Translates `text` with the `search` settings (a `Translator`'s are the run's; beam size 1
  is greedy) and keeps the ids and pieces."""
  max_len = model.config.max_len
  src_ids = source_ids(tokenizer, text, min(max_source_tokens, max_len))
  # Padded as `Translator.encode` pads: fewer shapes to compile, never past max_len.
  src_1S = jnp.asarray(padded([src_ids], padded_length(len(src_ids), max_len)))
  tokens = [
    int(i)
    for i in np.asarray(
      translate_ids(
        model,
        src_1S,
        beam_size=search.beam_size,
        alpha=search.alpha,
        max_extra_tokens=search.max_extra_tokens,
        stop=search.stop,
      )
    )[0]
  ]
  tokens = tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
  # BOS + pieces must fit the positional encodings (an unfinished beam can fill them all).
  tgt_in_ids = [BOS_ID] + [i for i in tokens if i != PAD_ID][: max_len - 1]
  return Sentence(
    text=text,
    translation=tokenizer.decode([tgt_in_ids])[0],
    src_ids=src_ids,
    tgt_in_ids=tgt_in_ids,
    src_pieces=pieces_of(tokenizer, src_ids),
    tgt_pieces=pieces_of(tokenizer, tgt_in_ids),
  )


def word_groups(pieces: Sequence[str]) -> list[tuple[str, list[int]]]:
  """(word, piece indices) for each whitespace word; special pieces stand alone.

  A piece starting with the word mark opens a word, any other continues it: "unveiled" ->
  ["\u2581un", "ve", "il", "ed"] is one group.
  """
  groups: list[tuple[str, list[int]]] = []
  for i, piece in enumerate(pieces):
    if (
      piece in SPECIAL_PIECES
      or piece.startswith(WORD_START)
      or not groups
      or groups[-1][0] in SPECIAL_PIECES
    ):
      groups.append((piece.lstrip(WORD_START), [i]))
    else:
      groups[-1] = (groups[-1][0] + piece, groups[-1][1] + [i])
  return groups


def word_piece_indices(pieces: Sequence[str], word: str) -> list[int]:
  """Indices of the pieces spelling the first occurrence of `word` (case-insensitive).

  Pieces without a letter or digit ("." after "orange") are not part of the word's vector.
  """
  for _, indices in word_groups(pieces):
    letters = [
      i for i in indices if pieces[i] not in SPECIAL_PIECES and any(c.isalnum() for c in pieces[i])
    ]
    if "".join(pieces[i] for i in letters).lstrip(WORD_START).lower() == word.lower():
      return letters
  raise UserError(f"{word!r} is not a word of the sentence (its pieces: {' '.join(pieces)})")


def cosine(a_D: np.ndarray, b_D: np.ndarray) -> float:
  return float(a_D @ b_D / (np.linalg.norm(a_D) * np.linalg.norm(b_D)))


def attention_maps(
  translator, text: str, *, search: DecodeConfig | None = None
) -> tuple[Sentence, AttentionMaps]:
  """A translation run's attention for one sentence: it is translated (as the run was scored,
  or with `search`, e.g. `translator.search.overridden(beam_size=1)`), then the model is run
  once on (source, BOS + translation) and every layer's weights are kept.

  `translator` is a `transformer.Translator` of a translation run. Returns the sentence (ids,
  pieces, translation) and the maps: `maps.cross[l][0]` is layer l+1's encoder-decoder attention
  [N, T, S] (rows: the translation's pieces, columns: the source's).
  """
  model = translator.encoder_decoder
  sentence = prepare_sentence(
    model,
    translator.tokenizer,
    text,
    max_source_tokens=translator.max_source_tokens,
    search=search or translator.search,
  )
  _, maps = collect_attention(
    model, np.array([sentence.src_ids], np.int32), np.array([sentence.tgt_in_ids], np.int32)
  )
  return sentence, maps
