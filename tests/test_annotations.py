"""The jaxtyping annotations hold: the package, imported under jaxtyping's import hook with
beartype, runs its models, attention, loss, train step, decoders and batching without a shape or
dtype contradicting a signature.

A fresh process, because the hook must be installed before `transformer` is first imported.
"""

import subprocess
import sys
import textwrap

import pytest

EXERCISE = textwrap.dedent("""
    import os
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxtyping import install_import_hook
    with install_import_hook("transformer", "beartype.beartype"):
      from transformer.data import batching, pipeline, stream, token_cache
      from transformer.decode import beam_search, greedy_decode, sample
      from transformer.model import (DecoderOnly, EncoderDecoder, EncoderOnly, TransformerConfig,
                                     dot_product_attention, sinusoidal_position_encoding)
      from transformer.train.loss import label_smoothed_cross_entropy, token_metrics
      from transformer.train.step import TrainState, make_steps
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from pathlib import Path
    from flax import nnx

    config = TransformerConfig.tiny(vocab_size=32)
    src = jnp.array([[5, 6, 7, 3, 0, 0], [8, 9, 3, 0, 0, 0]], jnp.int32)
    tgt = jnp.array([[2, 8, 9, 10], [2, 11, 0, 0]], jnp.int32)
    model = EncoderDecoder(config, rngs=nnx.Rngs(0))
    model.eval()
    logits = model(src, tgt)
    label_smoothed_cross_entropy(logits, tgt, 0.1)
    token_metrics(logits, tgt, (tgt != 0).astype(jnp.float32), 0.1)
    greedy_decode(model, src, max_new_tokens=6)
    beam_search(model, src, max_new_tokens=6, beam_size=2, alpha=0.6)
    lm = DecoderOnly(config, rngs=nnx.Rngs(0))
    lm.eval()
    sample(lm, tgt[:1], max_new_tokens=3, rng=jax.random.key(0), top_k=5, top_p=0.9)
    encoder = EncoderOnly(config, rngs=nnx.Rngs(0))
    encoder.mlm_logits(src)
    encoder.classify(src)
    sinusoidal_position_encoding(8, 16)
    q = jnp.ones((2, 6, 4, 8))
    for implementation in ("xla", "blockwise"):
      dot_product_attention(q, q, q, implementation=implementation, is_causal=True)

    tx = optax.adam(1e-3)
    graphdef, params, rest = nnx.split(EncoderDecoder(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    steps = make_steps(graphdef, rest, tx, task="translation", label_smoothing=0.1,
                       dropout_key=jax.random.key(1), grad_accum_steps=2)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    jax.jit(steps.train_step)(state, {"inputs": src, "targets": tgt})

    examples, _ = pipeline.make_examples([[5, 6], [7, 8, 9]], [[4, 5, 6], [7]], 8)
    pipeline.eval_batches(examples, 2)
    pipeline.padded([[1, 2], [3]])
    lengths = np.array([[2, 3], [3, 1], [1, 1]], np.int32)
    for packing in (False, True):
      layout = batching.Layout.of(max_len=8, packing=packing, tokens_per_batch=16, multiple=1)
      plan = batching.plan_chunk(np.arange(3), lengths, layout, np.random.default_rng(0))
      cache = token_cache.TokenCache(Path("."), lengths, {})
      cache.read_flat = lambda ids: np.concatenate([np.arange(5, 5 + lengths[i].sum())
                                                    for i in ids])
      batch = stream.assemble_translation(cache, plan[0][1], plan[0][0], packing)
    model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
          src_segments_BS=jnp.asarray(batch["inputs_segments"]),
          tgt_segments_BT=jnp.asarray(batch["targets_segments"]),
          src_positions_BS=jnp.asarray(batch["inputs_positions"]),
          tgt_positions_BT=jnp.asarray(batch["targets_positions"]))
    print("ok")
""")


@pytest.mark.slow
def test_annotations_hold_at_run_time():
  result = subprocess.run(
    [sys.executable, "-c", EXERCISE], capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "ok"
