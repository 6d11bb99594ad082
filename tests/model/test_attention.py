"""Scaled dot-product attention against a plain NumPy softmax(Q K^T / sqrt(d_k)) V."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import TransformerConfig, dot_product_attention
from transformer.model import attention as attn
from transformer.model import blockwise


def numpy_attention(q, k, v, mask):
  """The reference: loops over batch and heads, float64, zero output for fully masked rows."""
  b, t, n, h = q.shape
  mask = np.broadcast_to(mask, (b, n, t, k.shape[1]))
  out = np.zeros((b, t, n, h))
  for i in range(b):
    for j in range(n):
      scores = q[i, :, j].astype(np.float64) @ k[i, :, j].T.astype(np.float64) / np.sqrt(h)
      scores = np.where(mask[i, j], scores, -np.inf)
      with np.errstate(invalid="ignore"):
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
      out[i, :, j] = np.nan_to_num(weights) @ v[i, :, j]
  return out


def random_case(seed, b=2, t=6, s=11, n=3, h=8, causal=False):
  rng = np.random.default_rng(seed)
  q, k, v = (
    rng.normal(size=shape).astype(np.float32)
    for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h))
  )
  lengths = rng.integers(1, s + 1, size=b)
  lengths[0] = s
  mask = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S] padding
  if causal:
    mask = mask & np.tril(np.ones((t, s), bool))[None, None]
  return q, k, v, mask


def run(implementation, q, k, v, mask):
  if implementation == "jax.nn":  # the cudnn path's wrapper, on jax.nn's portable backend
    return attn._cudnn_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), False, implementation="xla"
    )
  return dot_product_attention(
    jnp.asarray(q),
    jnp.asarray(k),
    jnp.asarray(v),
    mask=jnp.asarray(mask),
    implementation=implementation,
    block_size=4,
  )


IMPLEMENTATIONS = ["xla", "blockwise", "jax.nn"]


@pytest.mark.parametrize(
  "backend,dtype,head_dim,t,s,expected",
  [
    ("cpu", jnp.float32, 64, 64, 64, "xla"),
    ("cpu", jnp.float32, 64, 2048, 2048, "blockwise"),
    ("gpu", jnp.bfloat16, 64, 64, 64, "cudnn"),
    ("gpu", jnp.bfloat16, 64, 63, 64, "xla"),  # odd: cuDNN's masked backward refuses it
    ("gpu", jnp.bfloat16, 64, 2047, 2047, "blockwise"),
    ("gpu", jnp.float32, 64, 64, 64, "xla"),  # cuDNN needs 16-bit inputs
    ("gpu", jnp.bfloat16, 12, 64, 64, "xla"),  # ... and H a multiple of 8
  ],
)
def test_auto_picks_an_implementation_the_shapes_allow(
  monkeypatch, backend, dtype, head_dim, t, s, expected
):
  monkeypatch.setattr(attn.jax, "default_backend", lambda: backend)
  assert attn.resolve_implementation("auto", dtype, head_dim, s, t) == expected
  assert attn.resolve_implementation("xla", dtype, head_dim, s, t) == "xla"
  with pytest.raises(ValueError, match="unknown"):
    attn.resolve_implementation("flash", dtype, head_dim, s, t)


@pytest.mark.parametrize("implementation", ["cudnn", "blockwise"])
def test_attention_dropout_is_refused_by_fused_implementations(implementation):
  with pytest.raises(ValueError, match="attention_dropout_rate"):
    TransformerConfig.tiny(attention=implementation, attention_dropout_rate=0.1)
  TransformerConfig.tiny(attention="auto", attention_dropout_rate=0.1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed,causal,t,s", [(0, False, 6, 11), (1, True, 9, 9), (2, True, 5, 16)])
def test_matches_numpy(implementation, seed, causal, t, s):
  q, k, v, mask = random_case(seed, t=t, s=s, causal=causal)
  np.testing.assert_allclose(
    run(implementation, q, k, v, mask), numpy_attention(q, k, v, mask), atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_is_causal_flag_equals_explicit_mask(implementation):
  q, k, v, _ = random_case(3, t=10, s=10)
  causal = np.tril(np.ones((10, 10), bool))[None, None]
  q_, k_, v_ = (jnp.asarray(x) for x in (q, k, v))
  got = dot_product_attention(
    q_, k_, v_, is_causal=True, implementation=implementation, block_size=4
  )
  np.testing.assert_allclose(got, numpy_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_are_zero_not_nan(implementation):
  q, k, v, _ = random_case(4, t=4, s=6)
  mask = np.ones((2, 1, 4, 6), bool)
  mask[0, :, 1] = False  # one query row sees nothing
  mask[1] = False  # a whole example sees nothing
  out = np.asarray(run(implementation, q, k, v, mask))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[0, 1], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scores_bytes", [None, 1])
def test_blockwise_gradients_match_xla(scores_bytes, monkeypatch):
  """The hand-written FlashAttention backward pass against autodiff of the plain formula; with
  scores_bytes=1 the scans visit one head at a time (the CPU cache schedule), the per-row mask
  split along with them."""
  if scores_bytes is not None:
    monkeypatch.setattr(blockwise, "groups_heads", lambda: True)  # the tests run on 8 CPU devices
    monkeypatch.setattr(blockwise, "CPU_SCORES_BYTES", scores_bytes)
  q, k, v, mask = random_case(5, t=7, s=13, causal=True)
  mask = mask.copy()
  mask[1, :, 2] = False  # a fully masked row must give zero, finite gradients too
  cotangent = np.random.default_rng(6).normal(size=q.shape).astype(np.float32)

  def loss(implementation):
    f = lambda q, k, v: jnp.sum(
      dot_product_attention(
        q, k, v, mask=jnp.asarray(mask), implementation=implementation, block_size=4
      )
      * cotangent
    )
    return jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))

  for got, want in zip(loss("blockwise"), loss("xla")):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "mask_kind,leaf_blocks,scores_bytes",
  [
    ("none", 1, None),
    ("keys", 1, None),
    ("keys", 4, None),
    ("rows", 1, None),
    ("keys", 1, 4 * 24 * 4),
  ],
)
def test_causal_schedule_matches_xla_values_and_gradients(
  mask_kind, leaf_blocks, scores_bytes, monkeypatch
):
  """is_causal self-attention takes the schedule that skips the upper triangle (T = S = 37 with
  block 4, padded to 48: leaves of 3 and rectangles of 3, 6, 12, 24; or, with leaves of up to 4
  blocks, leaves of 12 and rectangles of 12, 24); a per-row mask takes the full schedule.
  Values and all three gradients equal autodiff of the plain formula, with no mask, a key-padding
  mask (a fully padded row included), and per-row masks with a fully masked row. With
  scores_bytes set, each scan visits the heads in groups that fit that many bytes of scores
  (1 to 8 of the 6 to 96 heads of the pieces), as on CPU at long lengths."""
  monkeypatch.setattr(blockwise, "LEAF_BLOCKS", leaf_blocks)
  if scores_bytes is not None:
    monkeypatch.setattr(blockwise, "groups_heads", lambda: True)  # the tests run on 8 CPU devices
    monkeypatch.setattr(blockwise, "CPU_SCORES_BYTES", scores_bytes)
  assert blockwise.causal_leaf(37, 4) == {1: (3, 4), 4: (12, 2)}[leaf_blocks]
  q, k, v, key_mask = random_case(7, t=37, s=37)
  mask = {"none": None, "keys": key_mask, "rows": np.broadcast_to(key_mask, (2, 1, 37, 37)).copy()}[
    mask_kind
  ]
  if mask_kind == "rows":
    mask[0, :, 5] = False
  cotangent = np.random.default_rng(8).normal(size=q.shape).astype(np.float32)

  def value_and_grads(implementation):
    f = lambda q, k, v: dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation=implementation, block_size=4
    )
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(jnp.asarray(cotangent)))

  for got, want in zip(value_and_grads("blockwise"), value_and_grads("xla")):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_keeps_sharded_heads_on_their_devices(monkeypatch):
  """With batch and heads sharded over 8 devices the scans keep all heads together (no head
  groups, whatever the cache budget): the compiled program moves no data between devices and
  equals the single-device result."""
  monkeypatch.setattr(blockwise, "CPU_SCORES_BYTES", 1)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model"))
  q, k, v = (
    jnp.asarray(np.random.default_rng(i).normal(size=(8, 32, 4, 8)), jnp.float32) for i in range(3)
  )

  def forward_backward(q, k, v):
    out, vjp = jax.vjp(
      lambda q, k, v: blockwise.blockwise_attention(q, k, v, block_size=8), q, k, v
    )
    return out, vjp(out)

  sharded = jax.jit(forward_backward).lower(*(jax.device_put(x, sharding) for x in (q, k, v)))
  compiled = sharded.compile()
  assert not any(op in compiled.as_text() for op in ("all-gather", "all-to-all", "all-reduce"))
  got = compiled(*(jax.device_put(x, sharding) for x in (q, k, v)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(forward_backward)(q, k, v))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_worked_example_scaled_scores():
  """With d_k = 2, dot products 12 and 3 are scaled to 12/sqrt(2) = 8.49 and 3/sqrt(2) = 2.12."""
  q = jnp.array([3.0, 3.0]).reshape(1, 1, 1, 2)
  k = jnp.array([[2.0, 2.0], [0.5, 0.5]]).reshape(1, 2, 1, 2)
  scores = np.asarray(attn.attention_logits(q, k)).ravel()
  np.testing.assert_allclose(scores, [8.49, 2.12], atol=5e-3)


def test_worked_example_softmax_weights():
  """Similarities (1, 0.71) become attention weights 0.57 and 0.43."""
  q = jnp.array([np.sqrt(2.0), 0.0]).reshape(1, 1, 1, 2)  # q.k / sqrt(2) = k[0]
  k = jnp.array([[1.0, 0.0], [0.71, 0.0]]).reshape(1, 2, 1, 2)
  weights = np.asarray(attn.attention_weights(q, k)).ravel()
  np.testing.assert_allclose(weights, [0.57, 0.43], atol=5e-3)
  v = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)  # the output mixes v by weight
  out = np.asarray(dot_product_attention(q, k, v)).ravel()
  np.testing.assert_allclose(out, weights, atol=1e-6)


def test_masked_keys_content_is_ignored():
  q, k, v, mask = random_case(7)
  k2, v2 = k.copy(), v.copy()
  hidden = ~np.broadcast_to(mask, (2, 1, 1, 11))[:, 0, 0]  # [B, S] padded positions
  k2[hidden] = 100.0
  v2[hidden] = -100.0
  for implementation in ("xla", "blockwise"):
    np.testing.assert_allclose(
      run(implementation, q, k, v, mask), run(implementation, q, k2, v2, mask), atol=1e-6
    )


def test_unknown_implementation_is_a_clear_error():
  q, k, v, _ = random_case(0)
  with pytest.raises(ValueError, match="unknown: use one of"):
    dot_product_attention(*(jnp.asarray(x) for x in (q, k, v)), implementation="flash")


@pytest.mark.gpu
def test_cudnn_matches_numpy_on_gpu():
  q, k, v, mask = random_case(8, t=16, s=16, h=64)
  to16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  got = dot_product_attention(to16(q), to16(k), to16(v), mask=mask, implementation="cudnn")
  np.testing.assert_allclose(
    np.asarray(got, np.float32), numpy_attention(q, k, v, mask), atol=3e-2, rtol=3e-2
  )


def test_attention_over_a_heads_first_cache_matches_numpy():
  """A decoding cache is stored [B, N, C, H]; attending over it is the same formula."""
  q, k, v, mask = random_case(7, t=4, s=13)
  mask = mask & (np.random.default_rng(1).random((2, 1, 4, 13)) < 0.7)
  mask[1, :, 2] = False  # a query that sees nothing gets zeros
  heads_first = lambda x: jnp.asarray(np.swapaxes(x, 1, 2))
  out = attn.cached_attention(jnp.asarray(q), heads_first(k), heads_first(v), jnp.asarray(mask))
  np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_attending_over_each_groups_filled_prefix_equals_attending_over_every_slot():
  """Groups of rows filled to different depths each read their own prefix of the cache; the
  slots past it are masked, so the result is attention over all of them."""
  b, t, c, n, h, block = 6, 2, 24, 2, 4, 8
  rng = np.random.default_rng(3)
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, n, c, h)).astype(np.float32) for _ in range(2))
  filled_G = np.array([3, 17, 24])  # three groups of two rows
  filled_B = np.repeat(filled_G, b // 3)
  mask = np.arange(c)[None, None, None, :] < filled_B[:, None, None, None]
  mask = np.broadcast_to(mask, (b, 1, t, c))
  args = [jnp.asarray(x) for x in (q, k, v, mask)]
  out = attn.attend_filled_prefix(*args, jnp.asarray(filled_G), block)
  np.testing.assert_allclose(out, attn.cached_attention(*args), rtol=1e-6, atol=1e-6)
  reference = numpy_attention(q, np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2), mask)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_projections_together_give_the_separate_projections_and_their_gradients(with_bias):
  """Q, K and V as one matmul split three ways (`project_together`) against three einsums: the
  same outputs, and the same gradients for the input, the kernels and the biases."""
  rng = np.random.default_rng(3)
  d, n, h = 8, 2, 4
  x = jnp.asarray(rng.normal(size=(2, 5, d)), jnp.float32)
  kernels = [jnp.asarray(rng.normal(size=(d, n, h)), jnp.float32) for _ in range(3)]
  biases = (
    [jnp.asarray(rng.normal(size=(n, h)), jnp.float32) for _ in range(3)] if with_bias else None
  )
  weights = [jnp.asarray(rng.normal(size=(2, 5, n, h)), jnp.float32) for _ in range(3)]

  def separate(x, kernels, biases):
    outs = [jnp.einsum("BTD,DNH->BTNH", x, k) for k in kernels]
    return (
      outs if biases is None else [o + b[None, None] for o, b in zip(outs, biases, strict=True)]
    )

  def together(x, kernels, biases):
    return attn.project_together(x, kernels, biases, jnp.float32)

  for got, want in zip(together(x, kernels, biases), separate(x, kernels, biases), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *a: sum(jnp.sum(o * w) for o, w in zip(f(*a), weights, strict=True))
  argnums = (0, 1, 2) if with_bias else (0, 1)
  got = jax.grad(loss(together), argnums)(x, kernels, biases)
  want = jax.grad(loss(separate), argnums)(x, kernels, biases)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
