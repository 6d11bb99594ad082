"""Translating evaluation sets and scoring them with detokenized sacreBLEU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import sacrebleu
from flax import nnx
from jax.experimental import multihost_utils

from transformer.decode.batch import translate_ids
from transformer.parallel.mesh import global_batch

log = logging.getLogger(__name__)


def translate_batches(model, batches, tokenizer, decode_config, mesh) -> list[str]:
  """Detokenized translations of every real row of `batches`, in the original order."""
  by_index: dict[int, str] = {}
  for batch in batches:
    with jax.set_mesh(mesh):
      src = global_batch({"inputs": batch["inputs"]}, mesh)["inputs"]
      tokens = translate_ids(model, src, beam_size=decode_config.beam_size,
                             alpha=decode_config.alpha,
                             max_extra_length=decode_config.max_extra_length)
    tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    index = np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True))
    for row, text in zip(index, tokenizer.decode(tokens)):
      if row >= 0:
        by_index[int(row)] = text
  return [by_index[i] for i in sorted(by_index)]


def bleu_report(trainer, params, workdir: Path) -> dict[str, float]:
  """sacreBLEU of every test split; translations and scores written under workdir."""
  config = trainer.config
  model = nnx.merge(trainer.graphdef, params, trainer.rest)
  model.eval()
  out_dir = Path(workdir) / "translations"
  results, report = {}, {}
  for test in trainer.inputs.test_sets:
    hypotheses = translate_batches(model, test.batches, trainer.inputs.tokenizer, config.decode,
                                   trainer.mesh)
    references = [tgt for _, tgt in test.pairs]
    metric = sacrebleu.BLEU()
    bleu = metric.corpus_score(hypotheses, [references])
    results[f"bleu/{test.name}"] = bleu.score
    report[test.name] = {"bleu": bleu.score, "signature": str(metric.get_signature()),
                         "detail": str(bleu), "beam_size": config.decode.beam_size,
                         "alpha": config.decode.alpha,
                         "examples": [{"source": src, "reference": ref, "translation": hyp}
                                      for (src, ref), hyp in
                                      zip(test.pairs[:config.decode.num_examples], hypotheses)]}
    log.info("%s: %s", test.name, bleu)
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      (out_dir / f"{test.name}.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
  if jax.process_index() == 0:
    (Path(workdir) / "bleu.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
  return results
