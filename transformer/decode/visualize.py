"""Attention maps and contextual embeddings of a trained translation model, drawn as PNG.

`collect_attention` runs the model once, teacher-forced on (source, BOS + translation), with every
`MultiHeadAttention` sowing its softmax weights, and returns them per kind and layer: encoder
self-attention [B, N, S, S], decoder masked self-attention [B, N, T, T] and encoder-decoder
attention [B, N, T, S]. `write_attention_figures` draws them with the SentencePiece pieces on the
axes. `contrast_word` follows one word ("apple") through the encoder in two contexts: where its
attention goes, and how its vector moves towards the words around it.

CLI: `python -m transformer.visualize --workdir DIR "apple unveiled the new phone" [--contrast]`.
Layers are numbered from 1 in every figure, file and JSON key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx
from jaxtyping import Array, Float, Int
# The object-oriented API renders with Agg whatever backend pyplot would pick: no display needed.
from matplotlib.figure import Figure

from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.decode.batch import padded_length, translate_ids
from transformer.model.attention import MultiHeadAttention
from transformer.model.masks import padding_mask
from transformer.model.transformer import EncoderDecoder

KINDS = ("encoder_self", "decoder_self", "cross")
KIND_TITLES = {"encoder_self": "encoder self-attention",
               "decoder_self": "decoder masked self-attention",
               "cross": "encoder-decoder attention"}
# What a map's rows and columns are; a decoder row t holds the input piece t and predicts t + 1.
AXES_NOTES = {"encoder_self": "rows: source queries, columns: source keys",
              "decoder_self": "rows: decoder input (row t predicts piece t+1), columns: keys",
              "cross": "rows: decoder input (row t predicts piece t+1), columns: source"}
WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word
SPECIAL_PIECES = ("<s>", "</s>", "<pad>")

DEFAULT_CONTEXTS = (("please buy an apple and an orange", "orange"),
                    ("apple unveiled the new phone", "phone"))


# ------------------------------------------------------------------------------------------------
# Collecting the weights
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  """Softmax weights of every attention layer (float32), indexed [layer][b, head, query, key]."""

  encoder_self: list[np.ndarray]  # L x [B, N, S, S]
  decoder_self: list[np.ndarray]  # L x [B, N, T, T]
  cross: list[np.ndarray]         # L x [B, N, T, S]

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


def collect_attention(model: EncoderDecoder, src_ids_BS: Int[Array, "B S"],
                      tgt_in_BT: Int[Array, "B T"]) -> tuple[np.ndarray, AttentionMaps]:
  """One teacher-forced pass of an encoder-decoder, returning (logits [B, T, V], all weights).

  Args:
    model: in eval mode (dropout would make the weights random); its hook is off again after.
    src_ids_BS: source ids [B, S], EOS-terminated, PAD-padded.
    tgt_in_BT: decoder input [B, T]: BOS + target pieces, PAD-padded.
  """
  set_sow_attention_weights(model, True)
  try:
    logits_BTV, sown = _forward_sowing(model, jnp.asarray(src_ids_BS, jnp.int32),
                                       jnp.asarray(tgt_in_BT, jnp.int32))
  finally:
    set_sow_attention_weights(model, False)
  by_kind: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in KINDS}
  for path, variable in nnx.to_flat_state(sown):
    # e.g. ("decoder", "layers", 0, "cross_attention", "attention_weights")
    stack, _, layer, module, _ = path
    kind = ("encoder_self" if stack == "encoder"
            else "cross" if module == "cross_attention" else "decoder_self")
    (weights_BNTS,) = variable.get_value()  # each module runs once in a teacher-forced pass
    by_kind[kind][int(layer)] = np.asarray(weights_BNTS)
  maps = AttentionMaps(**{kind: [layers[i] for i in sorted(layers)]
                          for kind, layers in by_kind.items()})
  return np.asarray(logits_BTV), maps


@nnx.jit
def encoder_states(model: EncoderDecoder,
                   src_ids_BS: Int[Array, "B S"]) -> list[Float[Array, "B S D"]]:
  """The encoder's residual stream: its input and the output of each of its L layers.

  states[0] = sqrt(D) * embedding + positions; states[l] = output of layer l, the last one after
  the final LayerNorm of a pre-LN model, so states[-1] == model.encode(src). Mirrors
  `Encoder.__call__` without dropout (call it in eval mode).
  """
  encoder = model.encoder
  positions_BS = jnp.broadcast_to(jnp.arange(src_ids_BS.shape[1]), src_ids_BS.shape)
  mask_B11S = padding_mask(src_ids_BS, model.config.pad_id)
  x_BSD = encoder.positions(encoder.embed(src_ids_BS), positions_BS)
  states = [x_BSD]
  for layer in encoder.layers:
    x_BSD = layer(x_BSD, mask_B11S, positions_BS)
    states.append(x_BSD)
  if encoder.final_norm is not None:
    states[-1] = encoder.final_norm(states[-1])
  return states


# ------------------------------------------------------------------------------------------------
# Sentences: ids, pieces, words
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sentence:
  """A source sentence and its translation as the model sees them."""

  text: str
  translation: str
  src_ids: list[int]     # pieces + EOS: the encoder's input, the keys of cross-attention
  tgt_in_ids: list[int]  # BOS + translation pieces: the decoder's input, its queries
  src_pieces: list[str]
  tgt_pieces: list[str]


def pieces_of(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
  """The SentencePiece piece of each id, e.g. ["\u2581apple", "\u2581un", "ve", "</s>"]."""
  processor = spm.SentencePieceProcessor(model_file=os.fspath(tokenizer.model_path))
  return [processor.id_to_piece(int(i)) for i in ids]


def source_ids(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
  """Ids of `text` + EOS; an empty or over-long sentence is an error, never silently cut."""
  if not text.strip():
    raise ValueError("the sentence is empty: give one non-empty sentence to visualise")
  ids = tokenizer.encode([text])[0] + [EOS_ID]
  if len(ids) > max_tokens:
    raise ValueError(f"the sentence has {len(ids) - 1} pieces and the model takes at most "
                     f"{max_tokens - 1}: shorten it")
  return ids


def prepare_sentence(model: EncoderDecoder, tokenizer: Tokenizer, text: str, *,
                     max_source_tokens: int, beam_size: int = 4, alpha: float = 0.6) -> Sentence:
  """Translates `text` (beam search; greedy for beam_size 1) and keeps the ids and pieces."""
  max_len = model.config.max_len
  src_ids = source_ids(tokenizer, text, min(max_source_tokens, max_len))
  # Padded as `Translator.encode` pads: fewer shapes to compile, never past max_len.
  length = padded_length(len(src_ids), max_len)
  src_1S = jnp.asarray([src_ids + [PAD_ID] * (length - len(src_ids))], jnp.int32)
  tokens = [int(i) for i in np.asarray(translate_ids(model, src_1S, beam_size=beam_size,
                                                     alpha=alpha, max_extra_length=50))[0]]
  tokens = tokens[:tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
  # BOS + pieces must fit the positional encodings (an unfinished beam can fill them all).
  tgt_in_ids = [BOS_ID] + [i for i in tokens if i != PAD_ID][:max_len - 1]
  return Sentence(text=text, translation=tokenizer.decode([tgt_in_ids])[0], src_ids=src_ids,
                  tgt_in_ids=tgt_in_ids, src_pieces=pieces_of(tokenizer, src_ids),
                  tgt_pieces=pieces_of(tokenizer, tgt_in_ids))


def pad_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
  """Rows of ids as one PAD-padded [B, length] int32 array."""
  length = max(len(row) for row in rows)
  return np.array([list(row) + [PAD_ID] * (length - len(row)) for row in rows], np.int32)


def word_groups(pieces: Sequence[str]) -> list[tuple[str, list[int]]]:
  """(word, piece indices) for each whitespace word; special pieces stand alone.

  A piece starting with the word mark opens a word, any other continues it: "unveiled" ->
  ["\u2581un", "ve", "il", "ed"] is one group.
  """
  groups: list[tuple[str, list[int]]] = []
  for i, piece in enumerate(pieces):
    if piece in SPECIAL_PIECES or piece.startswith(WORD_START) or not groups \
        or groups[-1][0] in SPECIAL_PIECES:
      groups.append((piece.lstrip(WORD_START), [i]))
    else:
      groups[-1] = (groups[-1][0] + piece, groups[-1][1] + [i])
  return groups


def word_piece_indices(pieces: Sequence[str], word: str) -> list[int]:
  """Indices of the pieces spelling the first occurrence of `word` (case-insensitive).

  Pieces without a letter or digit ("." after "orange") are not part of the word's vector.
  """
  for _, indices in word_groups(pieces):
    letters = [i for i in indices if pieces[i] not in SPECIAL_PIECES
               and any(c.isalnum() for c in pieces[i])]
    if "".join(pieces[i] for i in letters).lstrip(WORD_START).lower() == word.lower():
      return letters
  raise ValueError(f"{word!r} is not a word of the sentence (its pieces: {' '.join(pieces)})")


def cosine(a_D: np.ndarray, b_D: np.ndarray) -> float:
  return float(a_D @ b_D / (np.linalg.norm(a_D) * np.linalg.norm(b_D)))


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

CELL_INCHES = 0.3  # one token's row or column: room for an 8-point label


def _heatmap(ax, weights_QK: np.ndarray, query_labels: Sequence[str],
             key_labels: Sequence[str], title: str, *, vmax: float = 1.0, fontsize: int = 8):
  image = ax.imshow(weights_QK, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
  ax.set_xticks(range(len(key_labels)), labels=key_labels, rotation=90, fontsize=fontsize)
  ax.set_yticks(range(len(query_labels)), labels=query_labels, fontsize=fontsize)
  ax.set_title(title, fontsize=fontsize + 2)
  return image


def _axis_labels(kind: str, sentence: Sentence) -> tuple[list[str], list[str]]:
  """(query labels, key labels) of a kind's [T or S, T or S] map."""
  src, tgt = sentence.src_pieces, sentence.tgt_pieces
  return {"encoder_self": (src, src), "decoder_self": (tgt, tgt), "cross": (tgt, src)}[kind]


def _save(fig: Figure, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def plot_heads(weights_NQK: np.ndarray, query_labels: Sequence[str], key_labels: Sequence[str],
               title: str, path: Path, note: str = "rows: queries, columns: keys") -> Path:
  """One layer's maps, a grid of heads (at most 4 a row) on one colour scale 0..1."""
  num_heads, q_len, k_len = weights_NQK.shape
  cols = min(num_heads, 4)
  rows = math.ceil(num_heads / cols)
  fig = Figure(figsize=(cols * (k_len * CELL_INCHES + 1.2) + 1.0,
                        rows * (q_len * CELL_INCHES + 1.6) + 0.6), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for head, ax in enumerate(axes.flat):
    if head >= num_heads:
      ax.set_axis_off()
      continue
    image = _heatmap(ax, weights_NQK[head], query_labels, key_labels, f"head {head + 1}")
  fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
  fig.suptitle(f"{title}   ({note})", fontsize=12)
  return _save(fig, path)


def plot_overview(maps: AttentionMaps, sentence: Sentence, path: Path, b: int = 0) -> Path:
  """Head-averaged maps of every layer (columns) and kind (rows)."""
  num_layers = len(maps.encoder_self)
  longest = max(len(sentence.src_pieces), len(sentence.tgt_pieces))
  side = longest * CELL_INCHES * 0.8 + 1.4
  fig = Figure(figsize=(num_layers * side + 1.2, len(KINDS) * side + 0.8), layout="constrained")
  axes = fig.subplots(len(KINDS), num_layers, squeeze=False)
  for row, kind in enumerate(KINDS):
    query_labels, key_labels = _axis_labels(kind, sentence)
    for layer, weights_BNQK in enumerate(maps.of(kind)):
      mean_QK = weights_BNQK[b, :, :len(query_labels), :len(key_labels)].mean(axis=0)
      image = _heatmap(axes[row, layer], mean_QK, query_labels, key_labels,
                       f"{KIND_TITLES[kind]}, layer {layer + 1}", fontsize=7)
  fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight, mean over heads")
  fig.suptitle(f"{sentence.text!r} -> {sentence.translation!r}\n"
               "decoder rows: input pieces (row t predicts piece t+1)", fontsize=11)
  return _save(fig, path)


def write_attention_figures(model: EncoderDecoder, sentence: Sentence, out_dir: Path) -> list[Path]:
  """Collects the sentence's weights and writes `<kind>_layer<l>.png` and `overview.png`."""
  _, maps = collect_attention(model, np.array([sentence.src_ids], np.int32),
                              np.array([sentence.tgt_in_ids], np.int32))
  paths = []
  for kind in KINDS:
    query_labels, key_labels = _axis_labels(kind, sentence)
    for layer, weights_BNQK in enumerate(maps.of(kind)):
      paths.append(plot_heads(weights_BNQK[0], query_labels, key_labels,
                              f"{KIND_TITLES[kind]}, layer {layer + 1}",
                              out_dir / f"{kind}_layer{layer + 1}.png", AXES_NOTES[kind]))
  paths.append(plot_overview(maps, sentence, out_dir / "overview.png"))
  return paths


# ------------------------------------------------------------------------------------------------
# One word in two contexts
# ------------------------------------------------------------------------------------------------

def _word_attention(weights_NSS: np.ndarray, rows: list[int], pieces: list[str]) -> dict:
  """Where a word's queries attend: per head and head-averaged, per piece and per word."""
  # float64 before rounding, so that the JSON shows 0.0001 rather than 9.999999747378752e-05
  row_NS = weights_NSS[:, rows, :len(pieces)].mean(axis=1).astype(np.float64)
  mean_S = row_NS.mean(axis=0)
  per_word = [(word, round(float(mean_S[indices].sum()), 4))
              for word, indices in word_groups(pieces)]
  return {"per_head": row_NS.round(4).tolist(), "mean": mean_S.round(4).tolist(),
          "top_words": sorted(per_word, key=lambda pair: -pair[1])[:3]}


def contrast_word(model: EncoderDecoder, tokenizer: Tokenizer, *, word: str = "apple",
                  contexts: Sequence[tuple[str, str]] = DEFAULT_CONTEXTS,
                  max_source_tokens: int = 64, beam_size: int = 4, alpha: float = 0.6) -> dict:
  """How `word` attends, and where its vector lies, in each (sentence, neighbour) context.

  Vectors of a word are the mean over its pieces. Stages: the embedding table's row (static:
  the same in every context), the encoder input (sqrt(D) * embedding + position), and the output
  of each encoder layer. At each stage the cosine of `word` in context i to the neighbour of
  context j is reported; a context-sensitive encoder raises the i == j entries above i != j.
  """
  sentences = [prepare_sentence(model, tokenizer, text, max_source_tokens=max_source_tokens,
                                beam_size=beam_size, alpha=alpha) for text, _ in contexts]
  src_BS = pad_rows([s.src_ids for s in sentences])
  _, maps = collect_attention(model, src_BS, pad_rows([s.tgt_in_ids for s in sentences]))
  states = [np.asarray(x_BSD) for x_BSD in encoder_states(model, jnp.asarray(src_BS))]
  table_VD = np.asarray(model.source_embed.table[...], np.float32)
  report = {"word": word, "stages": ["embedding table", "encoder input"]
            + [f"layer {l}" for l in range(1, len(states))], "sentences": [], "cosine": {}}
  vectors = []  # per context: {"word": [stage][D], "neighbour": [stage][D]}
  for b, (sentence, (_, neighbour)) in enumerate(zip(sentences, contexts)):
    pieces = sentence.src_pieces
    rows = {w: word_piece_indices(pieces, w) for w in (word, neighbour)}
    vectors.append({w: [table_VD[[sentence.src_ids[i] for i in idx]].mean(axis=0)]
                    + [x_BSD[b, idx].mean(axis=0) for x_BSD in states] for w, idx in rows.items()})
    report["sentences"].append({
        "text": sentence.text, "translation": sentence.translation, "pieces": pieces,
        "neighbour": neighbour, "word_pieces": rows[word], "neighbour_pieces": rows[neighbour],
        "attention": [_word_attention(w_BNSS[b], rows[word], pieces)
                      for w_BNSS in maps.encoder_self]})
  for i, (text_i, _) in enumerate(contexts):
    for j, (text_j, neighbour) in enumerate(contexts):
      key = f"{word} in #{i + 1} vs {neighbour} in #{j + 1}"
      report["cosine"][key] = [round(cosine(a, b), 4) for a, b in
                               zip(vectors[i][word], vectors[j][neighbour])]
  if len(contexts) == 2:
    report["cosine"][f"{word} in #1 vs {word} in #2"] = [
        round(cosine(a, b), 4) for a, b in zip(vectors[0][word], vectors[1][word])]
  report["baseline"] = _baseline_cosines(sentences, table_VD, states)
  return report


def _baseline_cosines(sentences: list[Sentence], table_VD: np.ndarray,
                      states: list[np.ndarray]) -> dict[str, list[float]]:
  """Mean cosine of all pairs of distinct words, within one sentence and across sentences.

  Contextual vectors of one sentence share their context (and a final LayerNorm's common
  direction), so a high cosine means little until it beats these averages.
  """
  per_stage = []  # [stage][sentence] -> [words, D]
  for stage in range(1 + len(states)):
    words = []
    for b, sentence in enumerate(sentences):
      groups = [idx for w, idx in word_groups(sentence.src_pieces) if w not in SPECIAL_PIECES]
      if stage == 0:
        words.append([table_VD[[sentence.src_ids[i] for i in idx]].mean(axis=0) for idx in groups])
      else:
        words.append([states[stage - 1][b, idx].mean(axis=0) for idx in groups])
    per_stage.append(words)
  within, across = [], []
  for words in per_stage:
    within.append(np.mean([cosine(a, b) for ws in words for i, a in enumerate(ws)
                           for b in ws[i + 1:]]))
    across.append(np.mean([cosine(a, b) for i, ws in enumerate(words) for vs in words[i + 1:]
                           for a in ws for b in vs]) if len(words) > 1 else float("nan"))
  return {"mean over word pairs within a sentence": [round(float(x), 4) for x in within],
          "mean over word pairs across sentences": [round(float(x), 4) for x in across]}


def plot_contrast_attention(report: dict, path: Path) -> Path:
  """Each encoder layer (rows) x context (columns): the word's attention row, per head + mean."""
  contexts = report["sentences"]
  num_layers = len(contexts[0]["attention"])
  longest = max(len(c["pieces"]) for c in contexts)
  num_heads = len(contexts[0]["attention"][0]["per_head"])
  fig = Figure(figsize=(len(contexts) * (longest * CELL_INCHES + 1.4) + 1.0,
                        num_layers * ((num_heads + 1) * CELL_INCHES + 1.5) + 0.8),
               layout="constrained")
  axes = fig.subplots(num_layers, len(contexts), squeeze=False)
  for col, context in enumerate(contexts):
    for layer, attention in enumerate(context["attention"]):
      rows_HS = np.array(attention["per_head"] + [attention["mean"]])
      labels = [f"head {h + 1}" for h in range(num_heads)] + ["mean"]
      image = _heatmap(axes[layer, col], rows_HS, labels, context["pieces"],
                       f"layer {layer + 1}: {context['text']!r}", fontsize=8)
  fig.colorbar(image, ax=axes, shrink=0.5, label=f"attention weight of {report['word']!r}")
  fig.suptitle(f"where {report['word']!r} attends in the encoder", fontsize=12)
  return _save(fig, path)


def plot_contrast_similarity(report: dict, path: Path) -> Path:
  """Cosine similarities (one line per pair) across the stages of the encoder."""
  fig = Figure(figsize=(7.5, 4.5), layout="constrained")
  ax = fig.subplots()
  for key, values in report["cosine"].items():
    ax.plot(range(len(values)), values, marker="o", label=key)
  for (key, values), style in zip(report["baseline"].items(), ("--", ":")):
    ax.plot(range(len(values)), values, color="gray", linestyle=style, label=key)
  ax.set_xticks(range(len(report["stages"])), labels=report["stages"], rotation=20)
  ax.set_ylabel("cosine similarity")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  numbered = "; ".join(f"#{i + 1} {c['text']!r}" for i, c in enumerate(report["sentences"]))
  ax.set_title(f"{report['word']!r} vs its neighbours\n{numbered}", fontsize=9)
  return _save(fig, path)


def write_contrast(report: dict, out_dir: Path) -> list[Path]:
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / "contrast.json"
  json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  return [json_path, plot_contrast_attention(report, out_dir / "contrast_attention.png"),
          plot_contrast_similarity(report, out_dir / "contrast_similarity.png")]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def load_translator(workdir: str | Path):
  """The run's Translator, after checking there is a checkpoint to load."""
  from transformer.decode.translate import Translator
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir} is not a directory: --workdir must be a run directory "
                            "written by train.py")
  checkpoints = workdir / "checkpoints"
  if not any(p.is_dir() and p.name.isdigit() for p in checkpoints.glob("*")):
    raise FileNotFoundError(f"no checkpoint in {checkpoints}: train the run first")
  # Absolute: Orbax reads no metadata from a relative checkpoint path (an OCDBT requirement).
  translator = Translator(workdir.absolute())
  if translator.config.task != "translation":
    raise ValueError(f"{workdir} holds a {translator.config.task!r} model; attention figures "
                     "are drawn for translation (encoder-decoder) runs")
  return translator


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m transformer.visualize",
                                   description="Attention heatmaps of a translation run.")
  parser.add_argument("text", nargs="*", help="the sentence to visualise (its words may be "
                      "given unquoted)")
  parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
  parser.add_argument("--out", help="where figures go (default: WORKDIR/attention)")
  parser.add_argument("--contrast", action="store_true",
                      help="also compare 'apple' in a fruit and in a company context")
  parser.add_argument("--beam_size", type=int, default=4, help="1 = greedy")
  parser.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  text = " ".join(args.text).strip()
  if not args.text and not args.contrast:
    raise ValueError("no sentence given: pass one sentence (quoted), or --contrast")
  if args.text and not text:
    raise ValueError("the sentence is empty: give one non-empty sentence to visualise")
  if args.beam_size < 1:
    raise ValueError(f"--beam_size must be at least 1, got {args.beam_size}")
  translator = load_translator(args.workdir)
  out_dir = Path(args.out) if args.out else Path(args.workdir) / "attention"
  model, tokenizer = translator.model, translator.tokenizer
  paths = []
  if text:
    sentence = prepare_sentence(model, tokenizer, text, beam_size=args.beam_size, alpha=args.alpha,
                                max_source_tokens=translator.max_source_tokens)
    print(f"source: {sentence.text}\ntranslation: {sentence.translation}")
    paths += write_attention_figures(model, sentence, out_dir)
  if args.contrast:
    report = contrast_word(model, tokenizer, max_source_tokens=translator.max_source_tokens,
                           beam_size=args.beam_size, alpha=args.alpha)
    paths += write_contrast(report, out_dir)
  for path in paths:
    print(path)
