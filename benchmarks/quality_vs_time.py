"""Quality per unit of compute: the Transformer and the LSTM encoder-decoder with attention, each
trained on Multi30k for the same wall-clock budget, BLEU against training time.

Both models train on the same batches (the first CPU recipe, pinned in `recipe`: a 6,000-piece
tokenizer, 2,048-target-token length buckets, label smoothing 0.1, dropout 0.1, seed 0) with the
project's own pure train step (`transformer.train.step`):

  transformer     the recipe's model (d_model 192, 3+3 layers, 4 heads, d_ff 768) and optimizer
                  (Adam 0.9/0.98/1e-9, the paper's warm-up + rsqrt schedule, lr_scale 0.4)
  lstm_attention  `transformer.baselines.rnn.LSTMSeq2Seq` (2-layer bidirectional encoder, 2-layer
                  decoder, Bahdanau attention, tied embeddings) at the width whose parameter count
                  is closest to the Transformer's; Adam 1e-3 after a 200-step linear warm-up,
                  gradients clipped to norm 1 (the usual LSTM NMT recipe, e.g. fairseq's)

The clock counts only training: fetching batches and running synchronised train steps. Each
batch shape is compiled before its first step, timed apart (`compile_s`). Every `eval_every_s`
of training the clock stops and the model is scored on the validation split: greedy decoding
(the Transformer with its KV cache, the LSTM carrying its recurrent state), detokenised
sacreBLEU against the reference text, and the validation NLL per token. At the end of the
budget every model is also scored on test_2016.

`run_all` runs it as a 15-s smoke check; the comparison itself is 2 x 8 minutes of training on
2 cores. `--lstm_lr` trains the LSTM at another peak learning rate; with `--models lstm_attention
--append` that run joins the existing result file (and its plot) instead of replacing it, so a
learning-rate check costs one run:

  python -m benchmarks.quality_vs_time [--preset quick|full] [--budget_s S]
  python -m benchmarks.quality_vs_time --models lstm_attention --lstm_lr 3e-3 --append
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sacrebleu
from flax import nnx

from benchmarks import common
from benchmarks.steps import build_step, count_params
from transformer.baselines.rnn import LSTMSeq2Seq, RNNConfig
from transformer.config import Config
from transformer.configs import default as default_recipe
from transformer.data.corpus import Location
from transformer.data.inputs import training_inputs
from transformer.decode.greedy import greedy_decode
from transformer.model import create_model
from transformer.train.optimizer import make_optimizer

PRESETS = {
  # eval_sentences: validation sentences translated at each evaluation (None: all 1,014);
  # nll_batches: validation batches of the NLL (None: all).
  "quick": dict(budget_s=30.0, eval_every_s=15.0, eval_sentences=128, nll_batches=2, test=False),
  "full": dict(budget_s=480.0, eval_every_s=60.0, eval_sentences=None, nll_batches=None, test=True),
}
# Greedy decoding stops at source length + this; Multi30k German rarely runs longer.
MAX_EXTRA_LENGTH = 10
LSTM_PEAK_LR, LSTM_WARMUP, LSTM_CLIP = 1e-3, 200, 1.0
MODELS = ("transformer", "lstm_attention")


def recipe(preset: str):
  """The settings of the committed comparison: the first CPU recipe's model, tokenizer and
  length-bucketed batches (the LSTM reads one pair per row, so no packing), pinned here so that
  a change of the default recipe does not change what this benchmark measures."""
  config = default_recipe.get_config()
  config.model.update(
    d_model=192, num_heads=4, d_ff=768, num_encoder_layers=3, num_decoder_layers=3
  )
  config.data.update(vocab_size=6000, packing=False, length_buckets=(16, 24, 32, 64))
  config.optimizer.update(warmup_steps=200, lr_scale=0.4)
  if preset == "quick":  # a smoke check of the pipeline: one batch shape to compile per model
    config.data.update(eval_batch_size=64, length_buckets=(64,))
  return config


def lstm_optimizer(peak_lr: float) -> optax.GradientTransformation:
  warmup = optax.linear_schedule(0.0, peak_lr, LSTM_WARMUP)
  schedule = optax.join_schedules([warmup, optax.constant_schedule(peak_lr)], [LSTM_WARMUP])
  return optax.chain(optax.clip_by_global_norm(LSTM_CLIP), optax.adam(schedule))


def translate(model, batches, tokenizer) -> list[str]:
  """Greedy translations of every real row of `batches`, in the split's order."""
  by_index = {}
  for batch in batches:
    src_BS = jnp.asarray(batch["inputs"])
    max_length = min(src_BS.shape[1] + MAX_EXTRA_LENGTH, model.config.max_len)
    tokens_BT = greedy_decode(model, src_BS, max_new_tokens=max_length)
    for row, text in zip(batch["index"], tokenizer.decode(np.asarray(tokens_BT))):
      if row >= 0:
        by_index[int(row)] = text
  return [by_index[i] for i in sorted(by_index)]


def score(model, test_set, tokenizer, sentences: int | None) -> dict:
  """Greedy sacreBLEU on the first `sentences` of a split (all if None), and the decode time."""
  batches, pairs = test_set.batches, test_set.pairs
  if sentences is not None:
    batches = [b for b in batches if np.any((b["index"] >= 0) & (b["index"] < sentences))]
    batches = [{**b, "index": np.where(b["index"] < sentences, b["index"], -1)} for b in batches]
    pairs = pairs[:sentences]
  start = time.perf_counter()
  hypotheses = translate(model, batches, tokenizer)
  bleu = sacrebleu.BLEU().corpus_score(hypotheses, [[tgt for _, tgt in pairs]])
  return {
    "bleu": bleu.score,
    "sentences": len(pairs),
    "decode_s": time.perf_counter() - start,
    "example": hypotheses[0],
  }


def validation_nll(eval_step, params, batches) -> float:
  sums = [eval_step(params, {k: b[k] for k in ("inputs", "targets", "weights")}) for b in batches]
  nll = sum(float(s["nll_sum"]) for s in sums)
  return nll / max(sum(float(s["tokens"]) for s in sums), 1.0)


def train_for_budget(
  name: str,
  model: nnx.Module,
  tx: optax.GradientTransformation,
  inputs,
  preset: dict,
  optimizer: dict,
) -> dict:
  """Trains `model` for `preset["budget_s"]` seconds of training time, scoring it along the way."""
  steps, state = build_step(model, tx, dropout_seed=1)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # to rebuild the model for scoring
  eval_step = jax.jit(steps.eval_step)
  validation = inputs.test_sets[0]
  compiled, compile_s = {}, 0.0
  train_s, next_eval_s, tokens, curve = 0.0, 0.0, 0, []
  stream = inputs.train

  def evaluate():
    scored = nnx.merge(graphdef, state.params, rest)
    scored.eval()
    point = {
      "train_s": train_s,
      "step": int(state.step),
      "target_tokens": tokens,
      "validation_nll": validation_nll(
        eval_step, state.params, inputs.eval_batches[: preset["nll_batches"]]
      ),
      **score(scored, validation, inputs.tokenizer, preset["eval_sentences"]),
    }
    curve.append(point)
    print(
      f"  {name:15s} {train_s:6.0f} s  step {point['step']:5d}  val NLL "
      f"{point['validation_nll']:.3f}  BLEU {point['bleu']:5.2f}  "
      f"(decode {point['decode_s']:.0f} s)",
      flush=True,
    )

  while True:
    if train_s >= next_eval_s:
      evaluate()
      next_eval_s += preset["eval_every_s"]
    if train_s >= preset["budget_s"]:
      break
    start = time.perf_counter()
    batch = {k: v for k, v in next(stream).items() if k in ("inputs", "targets")}
    shape = (batch["inputs"].shape, batch["targets"].shape)
    if shape not in compiled:  # a new bucket: compile it off the clock
      compile_start = time.perf_counter()
      compiled[shape] = jax.jit(steps.train_step, donate_argnums=0).lower(state, batch).compile()
      compile_s += time.perf_counter() - compile_start
      start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled[shape](state, batch))
    train_s += time.perf_counter() - start
    tokens += int(np.sum(batch["targets"] != 0))
    if not math.isfinite(float(metrics["loss_sum"])):
      raise FloatingPointError(f"{name}: non-finite loss at step {int(state.step)}")
  record = {
    "model": name,
    "optimizer": optimizer,
    "parameters": count_params(model),
    "steps": int(state.step),
    "train_s": train_s,
    "compile_s": compile_s,
    "compiled_shapes": len(compiled),
    "target_tokens_per_s": tokens / train_s,
    "curve": curve,
  }
  if preset["test"]:
    scored = nnx.merge(graphdef, state.params, rest)
    scored.eval()
    record["test_2016"] = score(scored, inputs.test_sets[1], inputs.tokenizer, None)
    print(f"  {name:15s} test_2016 greedy BLEU {record['test_2016']['bleu']:.2f}", flush=True)
  return record


def main(argv=None):
  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--budget_s",
    type=float,
    default=None,
    help="training seconds per model (default: the preset's)",
  )
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
  parser.add_argument(
    "--lstm_lr",
    type=float,
    default=LSTM_PEAK_LR,
    help="the LSTM's peak learning rate (Adam, after the warm-up)",
  )
  parser.add_argument(
    "--append",
    action="store_true",
    help="add these runs to the existing result file of this preset",
  )
  parser.add_argument(
    "--workdir",
    type=Path,
    default=None,
    help="where the tokenizer and the tfds data are prepared (default: a temporary folder)",
  )
  args = common.parse_args(parser, argv)
  models = args.models.split(",")
  if not set(models) <= set(MODELS):
    parser.error(f"--models takes names from {MODELS}")
  path = common.result_path("quality_vs_time", args.preset, args.out)
  if args.append and not path.exists():
    parser.error(f"--append: no {path} to add to; run without --append first")
  if args.budget_s is not None and args.budget_s <= 0:
    parser.error(f"--budget_s {args.budget_s:g}: give a positive number of training seconds")
  if args.lstm_lr <= 0:
    parser.error(f"--lstm_lr {args.lstm_lr:g}: give a positive learning rate, e.g. 3e-3")
  preset = dict(PRESETS[args.preset])
  if args.budget_s is not None:
    preset["budget_s"] = args.budget_s
  recipe_config = recipe(args.preset)
  recipe_config.data.test_splits = ("validation", "test_2016")
  config = Config.of(recipe_config)
  with tempfile.TemporaryDirectory() as scratch:
    where = Location.of(config.data, args.workdir or scratch)
    inputs = training_inputs(config.data, where, task="translation", seed=config.seed)
    transformer = create_model("translation", config.model, config.seed)
    rnn_config = RNNConfig.with_num_parameters(
      count_params(transformer),
      config.model.vocab_size,
      dropout_rate=config.model.dropout_rate,
      max_len=config.model.max_len,
    )
    lstm = LSTMSeq2Seq(rnn_config, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    print(
      f"transformer {count_params(transformer) / 1e6:.2f}M parameters, LSTM "
      f"(d_model {rnn_config.d_model}) {count_params(lstm) / 1e6:.2f}M; "
      f"{preset['budget_s']:.0f} s of training each",
      flush=True,
    )
    contestants = {
      "transformer": (
        transformer,
        make_optimizer(
          config.optimizer, d_model=config.model.d_model, num_train_steps=config.num_train_steps
        ),
        dataclasses.asdict(config.optimizer),
      ),
      "lstm_attention": (
        lstm,
        lstm_optimizer(args.lstm_lr),
        {
          "name": "adam",
          "peak_learning_rate": args.lstm_lr,
          "warmup_steps": LSTM_WARMUP,
          "clip_global_norm": LSTM_CLIP,
        },
      ),
    }
    runs, first_batch = [], inputs.train.state()
    for name in models:
      inputs.train.restore(first_batch)  # every model sees the same batches in the same order
      model, tx, optimizer = contestants[name]
      runs.append(train_for_budget(name, model, tx, inputs, preset, optimizer))
  earlier = {}
  if args.append:
    previous = json.loads(path.read_text(encoding="utf-8"))
    runs = previous["results"] + runs
    earlier = {
      "earlier_runs": previous.get("earlier_runs", [])
      + [{k: previous[k] for k in ("environment", "contention")}]
    }
  common.write_and_plot(
    "quality_vs_time",
    args.preset,
    {
      **earlier,
      "recipe": "transformer/configs/default.py",
      "budget_s": preset["budget_s"],
      "eval_every_s": preset["eval_every_s"],
      "decoding": "greedy",
      "max_extra_tokens": MAX_EXTRA_LENGTH,
      "transformer_config": dataclasses.asdict(config.model),
      "lstm_config": vars(rnn_config),
      "results": runs,
    },
    args.out,
  )


if __name__ == "__main__":
  sys.exit(main())
