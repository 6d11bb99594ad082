"""PNG figures of attention maps and of the contrast report, with the pieces on the axes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The object-oriented API renders with Agg whatever backend pyplot would pick: no display needed.
from matplotlib.figure import Figure

from transformer.inspect.attention import (
  AXES_NOTES,
  KIND_TITLES,
  KINDS,
  AttentionMaps,
  Sentence,
  collect_attention,
)
from transformer.model.transformer import EncoderDecoder

CELL_INCHES = 0.3  # one token's row or column: room for an 8-point label


def _heatmap(
  ax,
  weights_TS: np.ndarray,
  query_labels: Sequence[str],
  key_labels: Sequence[str],
  title: str,
  *,
  vmax: float = 1.0,
  fontsize: int = 8,
):
  image = ax.imshow(weights_TS, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
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


def plot_heads(
  weights_NTS: np.ndarray,
  query_labels: Sequence[str],
  key_labels: Sequence[str],
  title: str,
  path: Path,
  note: str = "rows: queries, columns: keys",
) -> Path:
  """One layer's maps, a grid of heads (at most 4 a row) on one colour scale 0..1."""
  num_heads, q_len, k_len = weights_NTS.shape
  cols = min(num_heads, 4)
  rows = math.ceil(num_heads / cols)
  fig = Figure(
    figsize=(cols * (k_len * CELL_INCHES + 1.2) + 1.0, rows * (q_len * CELL_INCHES + 1.6) + 0.6),
    layout="constrained",
  )
  axes = fig.subplots(rows, cols, squeeze=False)
  for head, ax in enumerate(axes.flat):
    if head >= num_heads:
      ax.set_axis_off()
      continue
    image = _heatmap(ax, weights_NTS[head], query_labels, key_labels, f"head {head + 1}")
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
    for layer, weights_BNTS in enumerate(maps.of(kind)):
      mean_TS = weights_BNTS[b, :, : len(query_labels), : len(key_labels)].mean(axis=0)
      image = _heatmap(
        axes[row, layer],
        mean_TS,
        query_labels,
        key_labels,
        f"{KIND_TITLES[kind]}, layer {layer + 1}",
        fontsize=7,
      )
  fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight, mean over heads")
  fig.suptitle(
    f"{sentence.text!r} -> {sentence.translation!r}\n"
    "decoder rows: input pieces (row t predicts piece t+1)",
    fontsize=11,
  )
  return _save(fig, path)


def write_attention_figures(model: EncoderDecoder, sentence: Sentence, out_dir: Path) -> list[Path]:
  """Collects the sentence's weights and writes `<kind>_layer<l>.png` and `overview.png`."""
  _, maps = collect_attention(
    model, np.array([sentence.src_ids], np.int32), np.array([sentence.tgt_in_ids], np.int32)
  )
  paths = []
  for kind in KINDS:
    query_labels, key_labels = _axis_labels(kind, sentence)
    for layer, weights_BNTS in enumerate(maps.of(kind)):
      paths.append(
        plot_heads(
          weights_BNTS[0],
          query_labels,
          key_labels,
          f"{KIND_TITLES[kind]}, layer {layer + 1}",
          out_dir / f"{kind}_layer{layer + 1}.png",
          AXES_NOTES[kind],
        )
      )
  paths.append(plot_overview(maps, sentence, out_dir / "overview.png"))
  return paths


def plot_contrast_attention(report: dict, path: Path) -> Path:
  """Each encoder layer (rows) x context (columns): the word's attention row, per head + mean."""
  contexts = report["sentences"]
  num_layers = len(contexts[0]["attention"])
  longest = max(len(c["pieces"]) for c in contexts)
  num_heads = len(contexts[0]["attention"][0]["per_head"])
  fig = Figure(
    figsize=(
      len(contexts) * (longest * CELL_INCHES + 1.4) + 1.0,
      num_layers * ((num_heads + 1) * CELL_INCHES + 1.5) + 0.8,
    ),
    layout="constrained",
  )
  axes = fig.subplots(num_layers, len(contexts), squeeze=False)
  for col, context in enumerate(contexts):
    for layer, attention in enumerate(context["attention"]):
      rows_NS = np.array(attention["per_head"] + [attention["mean"]])
      labels = [f"head {h + 1}" for h in range(num_heads)] + ["mean"]
      image = _heatmap(
        axes[layer, col],
        rows_NS,
        labels,
        context["pieces"],
        f"layer {layer + 1}: {context['text']!r}",
        fontsize=8,
      )
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
  return [
    json_path,
    plot_contrast_attention(report, out_dir / "contrast_attention.png"),
    plot_contrast_similarity(report, out_dir / "contrast_similarity.png"),
  ]
