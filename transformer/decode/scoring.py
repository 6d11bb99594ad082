"""Translating evaluation sets and scoring them: sacreBLEU (cased, detokenized, with its
signature), the lowercased BLEU the Multi30k literature quotes, and chrF."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from transformer import files
from transformer.data.inputs import TestSet
from transformer.data.tokenizer import PAD_ID, Tokenizer
from transformer.decode.config import DecodeConfig
from transformer.decode.engine import Engine, search_all

log = logging.getLogger(__name__)


def real_rows(batch: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
  """{sentence index: source ids without padding} of a batch's real rows (index >= 0)."""
  return {
    int(row): ids[ids != PAD_ID]
    for row, ids in zip(batch["index"], batch["inputs"], strict=True)
    if row >= 0
  }


def translate_batches(
  model,
  batches: Iterable[dict[str, np.ndarray]],
  tokenizer: Tokenizer,
  decode: DecodeConfig,
  mesh: Mesh,
) -> list[str]:
  """Detokenized translations of every real row of `batches` (each process holding its rows of
  every batch), in the original order.

  The batches only deliver the sentences: every process gathers all of them, and the search
  takes them longest first through its own slots (`transformer.decode.engine.search_all`), so a
  sentence's translation does not depend on the batch it came in.
  """
  sources: dict[int, np.ndarray] = {}
  for batch in batches:
    gathered = {
      key: np.asarray(multihost_utils.process_allgather(batch[key], tiled=True))
      for key in ("inputs", "index")
    }
    sources.update(real_rows(gathered))
  order = sorted(sources)
  with jax.set_mesh(mesh):
    tokens = search_all(model, [sources[i] for i in order], decode, mesh=mesh)
  return tokenizer.decode(tokens)


def prepare_search(model, test_sets: Sequence[TestSet], decode: DecodeConfig, mesh: Mesh) -> None:
  """Compiles the search `score_test_sets` runs on `test_sets` (one process; see
  `Engine.prepare`), without translating them."""
  engine = Engine(model)
  with jax.set_mesh(mesh):
    for test in test_sets:
      lengths = [len(ids) for batch in test.batches for ids in real_rows(batch).values()]
      engine.prepare(np.array(lengths), decode)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """sacreBLEU of detokenized, cased text with its signature, the lowercased score beside it
  (the number most Multi30k papers quote), and chrF."""
  metric = sacrebleu.BLEU()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  lowercased = sacrebleu.BLEU(lowercase=True).corpus_score(list(hypotheses), [list(references)])
  chrf = sacrebleu.CHRF()
  return {
    "bleu": score.score,
    "signature": str(metric.get_signature()),
    "detail": str(score),
    "bleu_lowercased": lowercased.score,
    "chrf": chrf.corpus_score(list(hypotheses), [list(references)]).score,
    "chrf_signature": str(chrf.get_signature()),
  }


def score_test_sets(
  model,
  test_sets: Sequence[TestSet],
  tokenizer: Tokenizer,
  decode: DecodeConfig,
  mesh: Mesh,
  out_dir: Path | None = None,
) -> dict:
  """Translates and scores every test set; {split: report, with its "hypotheses"}. With
  `out_dir`, process 0 also writes each split's hypotheses to `out_dir/<split>.txt`, one line per
  source line."""
  report = {}
  for test in test_sets:
    hypotheses = translate_batches(model, test.batches, tokenizer, decode, mesh)
    # A blank source line has a blank translation, as `translate` prints it.
    hypotheses = [h if s.strip() else "" for (s, _), h in zip(test.pairs, hypotheses, strict=True)]
    scores = bleu(hypotheses, [tgt for _, tgt in test.pairs])
    report[test.name] = {
      **scores,
      "beam_size": decode.beam_size,
      "alpha": decode.alpha,
      "max_extra_tokens": decode.max_extra_tokens,
      "stop": decode.stop,
      "hypotheses": hypotheses,
      "examples": [
        {"source": src, "reference": ref, "translation": hyp}
        for (src, ref), hyp in zip(test.pairs[: decode.num_examples], hypotheses)
      ],
    }
    log.info("%s: %s", test.name, scores["detail"])
    if out_dir is not None and jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      files.write_text(out_dir / f"{test.name}.txt", "\n".join(hypotheses) + "\n")
  return report


def write_report(report: dict, path: Path) -> None:
  """The scores as JSON (the hypotheses have files of their own)."""
  if jax.process_index() == 0:
    scores = {name: {k: v for k, v in r.items() if k != "hypotheses"} for name, r in report.items()}
    files.write_text(path, json.dumps(scores, indent=2, ensure_ascii=False))
