"""Label smoothing, metrics and learning-rate schedules against their formulas in NumPy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import DecoderOnly, TransformerConfig
from transformer.config import Config, OptimizerConfig, get_config
from transformer.errors import UserError
from transformer.train.loss import label_smoothed_cross_entropy, summarize, token_metrics
from transformer.train.optimizer import (
  clip_by_global_norm,
  learning_rate,
  make_optimizer,
  matrices,
)
from transformer.train.schedule import rsqrt_schedule
from transformer.train.setup import initial_state
from transformer.train.step import make_steps


def numpy_smoothed_ce(logits, targets, eps):
  vocab = logits.shape[-1]
  log_p = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  q = np.full(logits.shape, eps / vocab)
  np.put_along_axis(q, targets[..., None], 1 - eps + eps / vocab, axis=-1)
  return -(q * log_p).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_cross_entropy_matches_numpy(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)) * 3
  targets = rng.integers(0, 11, size=(3, 5))
  got = label_smoothed_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), eps)
  np.testing.assert_allclose(got, numpy_smoothed_ce(logits, targets, eps), rtol=1e-5, atol=1e-5)


def test_loss_gradients_equal_autodiff_of_the_log_softmax_formula():
  """The hand-written backward (softmax - q, weighted by the loss and NLL cotangents) against
  JAX's autodiff of the textbook formula, for an objective that uses both sums."""
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 3, 9)) * 2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 9, size=(2, 3)))
  weights = jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32)

  def plain(logits, eps):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(weights * ((1 - eps) * nll - eps * jnp.mean(log_p, axis=-1)))

  def ours(logits):
    sums = token_metrics(logits, targets, weights, 0.1)
    return sums["loss_sum"] + 0.3 * sums["nll_sum"] ** 2

  want = jax.grad(lambda x: plain(x, 0.1) + 0.3 * plain(x, 0.0) ** 2)(logits)
  np.testing.assert_allclose(jax.grad(ours)(logits), want, rtol=1e-5, atol=1e-6)


def test_metrics_ignore_padding_and_average_per_token():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
  targets = jnp.array([[1, 2, 3, 0], [4, 0, 0, 0]])
  weights = (targets != 0).astype(jnp.float32)
  summary = summarize(token_metrics(logits, targets, weights, 0.0))
  nll = numpy_smoothed_ce(np.asarray(logits, np.float64), np.asarray(targets), 0.0)
  mask = np.asarray(targets) != 0
  assert summary["tokens"] == 4
  assert summary["nll"] == pytest.approx(nll[mask].mean(), rel=1e-5)
  assert summary["perplexity"] == pytest.approx(np.exp(nll[mask].mean()), rel=1e-4)
  argmax = np.asarray(logits).argmax(-1)
  assert summary["accuracy"] == pytest.approx((argmax == np.asarray(targets))[mask].mean())


def test_rsqrt_schedule_is_the_papers_formula():
  d_model, warmup = 512, 4000
  schedule = rsqrt_schedule(d_model, warmup)
  for step in (1, 100, 3999, 4000, 4001, 10_000, 100_000):
    want = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    assert float(schedule(step - 1)) == pytest.approx(want, rel=1e-5)
  peak = max(float(schedule(s)) for s in range(0, 8000, 7))
  assert peak == pytest.approx((d_model * warmup) ** -0.5, rel=1e-3)


def numpy_adam_updates(grads, learning_rates, b1, b2, eps):
  """Bias-corrected Adam (Kingma & Ba, Algorithm 1): the update of each step, in float64."""
  m = v = np.zeros_like(grads[0])
  updates = []
  for t, (g, lr) in enumerate(zip(grads, learning_rates), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    updates.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
  return updates


def test_optimizer_is_adam_with_papers_betas():
  """Several steps with changing gradients: the first step alone is -lr * sign(g) for any betas."""
  config = Config()
  opt = config.optimizer
  assert (opt.b1, opt.b2, opt.eps) == (0.9, 0.98, 1e-9)
  tx = make_optimizer(opt, d_model=config.model.d_model, num_train_steps=config.num_train_steps)
  grads = [
    np.array([1.0, -2.0, 0.5]),
    np.array([-3.0, 0.1, 2.0]),
    np.array([0.5, 4.0, -1.0]),
    np.array([2.0, -0.3, 0.05]),
  ]
  d_model, warmup = config.model.d_model, opt.warmup_steps
  lrs = [d_model**-0.5 * min(t**-0.5, t * warmup**-1.5) for t in range(1, len(grads) + 1)]
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  got = []
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    got.append(np.asarray(updates["w"], np.float64))
  want = numpy_adam_updates(grads, lrs, b1=0.9, b2=0.98, eps=1e-9)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  # The comparison can tell the paper's betas from the common default (0.9, 0.999).
  other = numpy_adam_updates(grads, lrs, b1=0.9, b2=0.999, eps=1e-9)
  assert np.max(np.abs(np.array(other) - np.array(want)) / np.abs(want)) > 100 * 1e-5


def test_unknown_config_key_is_rejected():
  config = get_config()
  with pytest.raises((AttributeError, KeyError)):
    config.optimizer.learning_rat = 1.0
  assert isinstance(config, ml_collections.ConfigDict)


def test_checkpoint_average_is_the_mean_of_the_last_k(tmp_path):
  from transformer.runs.checkpoint import Checkpointer, Record, average_params
  from transformer.train.step import TrainState

  checkpointer = Checkpointer(tmp_path, keep=5, asynchronous=False)
  for step in (1, 2, 3):
    state = TrainState(jnp.asarray(step), {"w": jnp.full((4,), float(step))}, ())
    checkpointer.save(step, state, Record({}))
  averaged, steps = average_params(checkpointer, state, last=2)
  # The newest step's parameters held in memory are not read again (a run at its end).
  restored = []
  restore = checkpointer.restore
  checkpointer.restore = lambda abstract, step: restored.append(step) or restore(abstract, step)
  held, held_steps = average_params(checkpointer, state, last=2, held=(3, state.params))
  checkpointer.close()
  assert steps == held_steps == [2, 3] and restored == [2]
  np.testing.assert_allclose(averaged["w"], 2.5)
  np.testing.assert_allclose(held["w"], 2.5)


def test_cosine_schedule_ends_at_its_floor_as_nanogpt_computes_it():
  from transformer.train.optimizer import learning_rate

  opt = OptimizerConfig(
    name="adamw",
    schedule="cosine",
    peak_learning_rate=1e-3,
    end_learning_rate=1e-4,
    warmup_steps=100,
  )
  schedule = learning_rate(opt, d_model=128, num_train_steps=2000)
  for it in (100, 500, 1000, 1999, 2000):  # nanoGPT's get_lr after warm-up
    ratio = (it - 100) / (2000 - 100)
    expected = 1e-4 + 0.5 * (1 + np.cos(np.pi * ratio)) * (1e-3 - 1e-4)
    np.testing.assert_allclose(float(schedule(it)), expected, rtol=1e-5)
  with pytest.raises(Exception, match="end_learning_rate"):
    OptimizerConfig(peak_learning_rate=1e-3, end_learning_rate=2e-3)


def test_weight_decay_of_matrices_leaves_vectors_alone():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "scale": jnp.ones((4,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for mask, decayed in (("matrices", {"kernel"}), ("all", {"kernel", "bias", "scale"})):
    opt = OptimizerConfig(
      name="adamw",
      schedule="constant",
      peak_learning_rate=0.1,
      weight_decay=0.5,
      weight_decay_mask=mask,
    )
    tx = make_optimizer(opt, d_model=4, num_train_steps=10)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for name, update in updates.items():  # AdamW with zero gradients: -lr * wd * p, or nothing
      expected = -0.1 * 0.5 if name in decayed else 0.0
      np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6)


@pytest.mark.parametrize("norm", [0.3, 1.0, 7.5])
def test_clipping_with_the_steps_norm_is_optax_clip_by_global_norm(norm):
  """Given the norm the step computed (or computing it), the same updates and the same (empty)
  state as optax's clip, below, at and above the threshold."""
  rng = np.random.default_rng(0)
  grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  scale = norm / float(np.sqrt(sum(np.sum(g**2) for g in grads.values())))
  grads = {k: jnp.asarray(g * scale, jnp.float32) for k, g in grads.items()}
  ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  want, want_state = theirs.update(grads, theirs.init(grads))
  given_norm = optax.tree.norm(grads)
  for extra in ({}, {"grad_norm": given_norm}):
    got, got_state = ours.update(grads, ours.init(grads), None, **extra)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    for k in grads:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
  # The norm given is the one used: a wrong norm scales the updates by it.
  got, _ = ours.update(grads, ours.init(grads), None, grad_norm=jnp.float32(2 * max(norm, 1.0)))
  np.testing.assert_allclose(
    np.asarray(got["a"]), np.asarray(grads["a"]) / (2 * max(norm, 1.0)), rtol=1e-6
  )


@pytest.mark.parametrize("name, decay", [("adam", 0.0), ("adamw", 0.1)])
def test_flat_state_gives_the_updates_of_the_per_array_optimizer(name, decay):
  """optimizer.flat_state keeps the moments as one vector: the same updates, step after step,
  with the decay mask still applied per array."""
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones((4,))}
  txs = []
  for flat in (False, True):
    opt = OptimizerConfig(
      name=name,
      schedule="cosine",
      peak_learning_rate=0.1,
      warmup_steps=2,
      weight_decay=decay,
      weight_decay_mask="matrices",
      grad_clip_norm=1.0,
      flat_state=flat,
    )
    txs.append(make_optimizer(opt, d_model=4, num_train_steps=10))
  states = [tx.init(params) for tx in txs]
  assert jax.tree.leaves(states[1])[1].shape == (16,)  # the moments as one vector
  for _ in range(4):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    (want, states[0]), (got, states[1]) = (
      tx.update(grads, state, params) for tx, state in zip(txs, states, strict=True)
    )
    for key in params:
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, want)


def _first_flat_layout(opt: OptimizerConfig) -> optax.GradientTransformation:
  """The flat optimizer as it was first written: clipping per array, then Adam under
  optax.flatten, decay and rate. Checkpoints of its state must restore into today's."""
  return optax.chain(
    clip_by_global_norm(opt.grad_clip_norm),
    optax.chain(
      optax.flatten(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)),
      optax.add_decayed_weights(opt.weight_decay, matrices),
      optax.scale_by_learning_rate(learning_rate(opt, d_model=4, num_train_steps=10)),
    ),
  )


def test_flat_state_takes_summed_gradients_and_keeps_the_state_layout():
  """Given the summed gradients with grad_scale = 1 / n and the norm of their mean, or their
  concatenation as `flat_updates`, the flat optimizer makes the updates it makes from the mean
  itself, and its state has the layout of the earlier flat chain (old checkpoints restore)."""
  rng = np.random.default_rng(1)
  params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones((4,))}
  opt = OptimizerConfig(
    name="adamw",
    weight_decay=0.1,
    weight_decay_mask="matrices",
    grad_clip_norm=0.5,
    flat_state=True,
  )
  tx = make_optimizer(opt, d_model=4, num_train_steps=10)
  state = tx.init(params)
  old = _first_flat_layout(opt).init(params)
  assert jax.tree.structure(state) == jax.tree.structure(old)
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
  assert shapes(state) == shapes(old)
  n = 37.0
  for _ in range(3):
    mean = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    norm = optax.tree.norm(mean)
    summed = jax.tree.map(lambda g: g * n, mean)
    want, want_state = tx.update(mean, state, params)
    given = dict(grad_norm=norm, grad_scale=jnp.float32(1 / n))
    # As the train step calls it: the concatenation given, the updates only for their shapes.
    flat = jnp.concatenate([jnp.ravel(summed[k]) for k in sorted(summed)])
    zeros = jax.tree.map(jnp.zeros_like, summed)
    for got, got_state in (
      tx.update(summed, state, params, **given),
      tx.update(zeros, state, params, flat_updates=flat, **given),
    ):
      for key in params:
        np.testing.assert_allclose(
          np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-7
        )
      for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    params, state = optax.apply_updates(params, want), want_state


def test_flat_state_is_refused_with_sharded_parameters():
  config = get_config()
  config.optimizer.flat_state = True
  config.parallel.fsdp = 2
  with pytest.raises(UserError, match=r"optimizer.flat_state .* set optimizer.flat_state=False"):
    Config.from_dict(config.to_dict())


def test_train_step_with_the_flat_optimizer_matches_the_per_array_one():
  """The train step hands the flat optimizer the summed gradients (`flat_optimizer`) and the
  per-array one their mean: three steps of a small GPT give the same parameters, gradient norms
  and losses."""
  config = TransformerConfig.tiny(
    num_encoder_layers=0, norm="pre", activation="gelu", dropout_rate=0.0, use_bias=False
  )
  rng = np.random.default_rng(2)
  batches = [
    {"targets": jnp.asarray(rng.integers(4, config.vocab_size, size=(4, 9)), jnp.int32)}
    for _ in range(3)
  ]
  runs = []
  for flat in (False, True):
    model = DecoderOnly(config, rngs=nnx.Rngs(0))
    opt = OptimizerConfig(
      name="adamw",
      schedule="constant",
      peak_learning_rate=1e-2,
      weight_decay=0.1,
      weight_decay_mask="matrices",
      grad_clip_norm=0.5,
      flat_state=flat,
    )
    tx = make_optimizer(opt, d_model=config.d_model, num_train_steps=3)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    steps = make_steps(
      graphdef,
      rest,
      tx,
      task="lm",
      label_smoothing=0.0,
      dropout_key=jax.random.key(0),
      flat_optimizer=flat,
    )
    state, step = initial_state(model, tx), jax.jit(steps.train_step)
    norms = []
    for batch in batches:
      state, metrics = step(state, batch)
      norms.append((float(metrics["grad_norm"]), float(metrics["loss_sum"])))
    runs.append((state.params, norms))
  (want_params, want_norms), (got_params, got_norms) = runs
  np.testing.assert_allclose(got_norms, want_norms, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
