"""One word in two contexts: where its attention goes in the encoder, and how its vector moves
towards the words around it ("apple" among fruit, and as a company)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from transformer.data.pipeline import padded
from transformer.data.tokenizer import Tokenizer
from transformer.decode.config import PAPER_SEARCH, DecodeConfig
from transformer.inspect.attention import (
  SPECIAL_PIECES,
  Sentence,
  collect_attention,
  cosine,
  encoder_states,
  prepare_sentence,
  word_groups,
  word_piece_indices,
)
from transformer.model.transformer import EncoderDecoder

DEFAULT_CONTEXTS = (
  ("please buy an apple and an orange", "orange"),
  ("apple unveiled the new phone", "phone"),
)


def _word_attention(weights_NSS: np.ndarray, rows: list[int], pieces: list[str]) -> dict:
  """Where a word's queries attend: per head and head-averaged, per piece and per word."""
  # float64 before rounding, so that the JSON shows 0.0001 rather than 9.999999747378752e-05
  row_NS = weights_NSS[:, rows, : len(pieces)].mean(axis=1).astype(np.float64)
  mean_S = row_NS.mean(axis=0)
  per_word = [
    (word, round(float(mean_S[indices].sum()), 4)) for word, indices in word_groups(pieces)
  ]
  return {
    "per_head": row_NS.round(4).tolist(),
    "mean": mean_S.round(4).tolist(),
    "top_words": sorted(per_word, key=lambda pair: -pair[1])[:3],
  }


def contrast_word(
  model: EncoderDecoder,
  tokenizer: Tokenizer,
  *,
  word: str = "apple",
  contexts: Sequence[tuple[str, str]] = DEFAULT_CONTEXTS,
  max_source_tokens: int = 64,
  search: DecodeConfig = PAPER_SEARCH,
) -> dict:
  """How `word` attends, and where its vector lies, in each (sentence, neighbour) context.

  Vectors of a word are the mean over its pieces. Stages: the embedding table's row (static:
  the same in every context), the encoder input (sqrt(D) * embedding + position), and the output
  of each encoder layer (each sentence translated with the `search` settings). At each stage the
  cosine of `word` in context i to the neighbour of context j is reported; a context-sensitive
  encoder raises the i == j entries above i != j.
  """
  sentences = [
    prepare_sentence(
      model,
      tokenizer,
      text,
      max_source_tokens=max_source_tokens,
      search=search,
    )
    for text, _ in contexts
  ]
  src_BS = padded([s.src_ids for s in sentences])
  _, maps = collect_attention(model, src_BS, padded([s.tgt_in_ids for s in sentences]))
  states = [np.asarray(x_BSD) for x_BSD in encoder_states(model, jnp.asarray(src_BS))]
  table_VD = np.asarray(model.source_embed.table[...], np.float32)
  report: dict[str, Any] = {
    "word": word,
    "stages": ["embedding table", "encoder input"] + [f"layer {l}" for l in range(1, len(states))],
    "sentences": [],
    "cosine": {},
  }
  vectors = []  # per context: {"word": [stage][D], "neighbour": [stage][D]}
  for b, (sentence, (_, neighbour)) in enumerate(zip(sentences, contexts)):
    pieces = sentence.src_pieces
    rows = {w: word_piece_indices(pieces, w) for w in (word, neighbour)}
    vectors.append(
      {
        w: [table_VD[[sentence.src_ids[i] for i in idx]].mean(axis=0)]
        + [x_BSD[b, idx].mean(axis=0) for x_BSD in states]
        for w, idx in rows.items()
      }
    )
    report["sentences"].append(
      {
        "text": sentence.text,
        "translation": sentence.translation,
        "pieces": pieces,
        "neighbour": neighbour,
        "word_pieces": rows[word],
        "neighbour_pieces": rows[neighbour],
        "attention": [
          _word_attention(w_BNSS[b], rows[word], pieces) for w_BNSS in maps.encoder_self
        ],
      }
    )
  for i in range(len(contexts)):
    for j, (_, neighbour) in enumerate(contexts):
      key = f"{word} in #{i + 1} vs {neighbour} in #{j + 1}"
      report["cosine"][key] = [
        round(cosine(a, b), 4) for a, b in zip(vectors[i][word], vectors[j][neighbour])
      ]
  if len(contexts) == 2:
    report["cosine"][f"{word} in #1 vs {word} in #2"] = [
      round(cosine(a, b), 4) for a, b in zip(vectors[0][word], vectors[1][word])
    ]
  report["baseline"] = _baseline_cosines(sentences, table_VD, states)
  return report


def _baseline_cosines(
  sentences: list[Sentence], table_VD: np.ndarray, states: list[np.ndarray]
) -> dict[str, list[float]]:
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
    within.append(
      np.mean([cosine(a, b) for ws in words for i, a in enumerate(ws) for b in ws[i + 1 :]])
    )
    across.append(
      np.mean(
        [
          cosine(a, b)
          for i, ws in enumerate(words)
          for vs in words[i + 1 :]
          for a in ws
          for b in vs
        ]
      )
      if len(words) > 1
      else float("nan")
    )
  return {
    "mean over word pairs within a sentence": [round(float(x), 4) for x in within],
    "mean over word pairs across sentences": [round(float(x), 4) for x in across],
  }
