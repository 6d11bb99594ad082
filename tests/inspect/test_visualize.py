"""Attention maps: the sown weights against the layers' own projections, figures, CLI errors.

A tiny random encoder-decoder and the SentencePiece model of conftest's `tokenizer` stand in for
a trained run; `workdir` saves both the way train.py does.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, MultiHeadAttention, TransformerConfig, visualize
from transformer.cli import run_cli
from transformer.data.tokenizer import BOS_ID, EOS_ID, MODEL_FILENAME, PAD_ID
from transformer.inspect import attention as inspect_attention
from transformer.model.masks import padding_mask

MAX_LEN = 24  # keeps a random model's (EOS-less) translations and their figures small


@pytest.fixture(scope="module")
def model(tokenizer):
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer, model, write_run):
  return write_run(
    tmp_path_factory.mktemp("run"), model, tokenizer, task="translation", data_max_length=MAX_LEN
  )


def _batch():
  """Two sources and decoder inputs of different lengths, PAD-padded: [2, 7] and [2, 5]."""
  src_BS = np.array(
    [[10, 11, 12, 13, 14, 15, EOS_ID], [20, 21, 22, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
  )
  tgt_in_BT = np.array([[BOS_ID, 30, 31, 32, 33], [BOS_ID, 40, 41, PAD_ID, PAD_ID]])
  return src_BS.astype(np.int32), tgt_in_BT.astype(np.int32)


def test_weights_have_every_layers_shape_and_rows_sum_to_one(model):
  src_BS, tgt_in_BT = _batch()
  logits_BTV, maps = inspect_attention.collect_attention(model, src_BS, tgt_in_BT)
  b, s = src_BS.shape
  t, n, layers = tgt_in_BT.shape[1], model.config.num_heads, model.config.num_encoder_layers
  expected = {"encoder_self": (b, n, s, s), "decoder_self": (b, n, t, t), "cross": (b, n, t, s)}
  for kind, shape in expected.items():
    assert [w.shape for w in maps.of(kind)] == [shape] * layers, kind
  src_keys_B11S = (src_BS != PAD_ID)[:, None, None, :]
  tgt_keys_B11T = (tgt_in_BT != PAD_ID)[:, None, None, :]
  allowed = {
    "encoder_self": src_keys_B11S,
    "cross": src_keys_B11S,
    "decoder_self": tgt_keys_B11T & np.tril(np.ones((t, t), bool))[None, None],
  }
  for kind, visible in allowed.items():
    for weights_BNQK in maps.of(kind):
      # Every query sees at least one key (its own position or the first source piece).
      np.testing.assert_allclose(weights_BNQK.sum(-1), 1.0, atol=1e-5)
      assert np.all(weights_BNQK[~np.broadcast_to(visible, weights_BNQK.shape)] == 0.0), kind
  # Sowing changes nothing the model computes, and the hook is off again afterwards.
  np.testing.assert_allclose(
    logits_BTV, model(jnp.asarray(src_BS), jnp.asarray(tgt_in_BT)), atol=1e-4, rtol=1e-4
  )
  assert not any(
    m.sow_weights for _, m in nnx.iter_modules(model) if isinstance(m, MultiHeadAttention)
  )


def numpy_attention_weights(q_BTNH, k_BSNH, keep_BS):
  """softmax(q k^T / sqrt(H)) over the keys where keep_BS is True, in float64: [B, N, T, S]."""
  scores_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / np.sqrt(q_BTNH.shape[-1])
  scores_BNTS = np.where(keep_BS[:, None, None, :], scores_BNTS, -np.inf)
  exp_BNTS = np.exp(scores_BNTS - scores_BNTS.max(axis=-1, keepdims=True))
  return exp_BNTS / exp_BNTS.sum(axis=-1, keepdims=True)


def test_cross_attention_equals_softmax_of_the_layers_own_projections(model):
  """softmax(q k^T / sqrt(H)) from x W^Q + b and memory W^K + b, layer by layer, in NumPy."""
  src_BS, tgt_in_BT = map(jnp.asarray, _batch())
  _, maps = inspect_attention.collect_attention(model, src_BS, tgt_in_BT)
  memory_BSD = model.encode(src_BS)
  decoder = model.decoder
  positions_BT = jnp.broadcast_to(jnp.arange(tgt_in_BT.shape[1]), tgt_in_BT.shape)
  x_BTD = decoder.positions(decoder.embed(tgt_in_BT), positions_BT)
  self_mask = padding_mask(tgt_in_BT, PAD_ID)
  memory_mask = padding_mask(src_BS, PAD_ID)
  for layer, weights_BNTS in zip(decoder.layers, maps.cross):
    attention = layer.cross_attention
    # The cross-attention's queries come from the output of the layer's masked self-attention.
    h_BTD = layer.self_attention_block(
      x_BTD, lambda y, layer=layer: layer.self_attention(y, mask=self_mask, is_causal=True)
    )
    as64 = lambda x: np.asarray(x, np.float64)
    q_BTNH = (
      np.einsum("btd,dnh->btnh", as64(h_BTD), as64(attention.query[...]))
      + as64(attention.query_bias[...])[None, None]
    )
    k_BSNH = (
      np.einsum("bsd,dnh->bsnh", as64(memory_BSD), as64(attention.key[...]))
      + as64(attention.key_bias[...])[None, None]
    )
    expected_BNTS = numpy_attention_weights(q_BTNH, k_BSNH, np.asarray(src_BS) != PAD_ID)
    np.testing.assert_allclose(weights_BNTS, expected_BNTS, atol=1e-5)
    x_BTD = layer(x_BTD, memory_BSD, self_mask, memory_mask, positions_BT, False)


def test_without_the_hook_nothing_is_sown(model):
  src_BS, tgt_in_BT = map(jnp.asarray, _batch())
  _, sown = nnx.capture(model, nnx.Intermediate)(src_BS, tgt_in_BT)
  assert not nnx.to_flat_state(sown)


def test_encoder_states_end_in_the_encoder_output(model):
  src_BS = jnp.asarray(_batch()[0])
  states = inspect_attention.encoder_states(model, src_BS)
  assert len(states) == model.config.num_encoder_layers + 1
  np.testing.assert_allclose(states[-1], model.encode(src_BS), atol=1e-5)


def test_words_gather_their_pieces():
  pieces = ["\u2581apple", "\u2581un", "ve", "il", "ed", "\u2581", "A", "\u2581orange", ".", "</s>"]
  assert inspect_attention.word_piece_indices(pieces, "unveiled") == [1, 2, 3, 4]
  assert inspect_attention.word_piece_indices(pieces, "a") == [6]  # the bare word mark is left out
  assert inspect_attention.word_piece_indices(pieces, "Orange") == [7]  # so is the full stop
  assert [w for w, _ in inspect_attention.word_groups(pieces)][-2:] == ["orange.", "</s>"]
  with pytest.raises(ValueError, match="'phone' is not a word"):
    inspect_attention.word_piece_indices(pieces, "phone")


def _png(path: Path) -> bool:
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_writes_every_figure_and_the_contrast(workdir, tmp_path, capsys):
  out = tmp_path / "figures"
  visualize.main(
    [
      "--workdir",
      str(workdir),
      "--out",
      str(out),
      "--beam_size",
      "1",
      "--contrast",
      "a dog runs on the grass",
    ]
  )
  printed = capsys.readouterr().out.splitlines()
  layers = range(1, 3)
  names = [f"{kind}_layer{l}.png" for kind in inspect_attention.KINDS for l in layers] + [
    "overview.png",
    "contrast.json",
    "contrast_attention.png",
    "contrast_similarity.png",
  ]
  assert printed[0] == "source: a dog runs on the grass"
  assert printed[2:] == [str(out / name) for name in names]
  assert all(_png(out / name) for name in names if name.endswith(".png"))
  report = json.loads((out / "contrast.json").read_text())
  assert report["stages"] == ["embedding table", "encoder input", "layer 1", "layer 2"]
  # The static embedding of "apple" is one row of the table, whichever the sentence.
  assert report["cosine"]["apple in #1 vs apple in #2"][0] == pytest.approx(1.0)
  for context in report["sentences"]:
    for attention in context["attention"]:
      assert np.asarray(attention["per_head"]).shape == (4, len(context["pieces"]))
      assert sum(attention["mean"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
  "case, message",
  [
    ("empty", "the sentence is empty"),
    ("too_long", "pieces and the model takes at most 23"),
    ("no_model", "no exported model in"),
    ("no_checkpoint", "no checkpoint in"),
    ("no_tokenizer", "spm.model is missing"),
  ],
)
def test_cli_errors_are_one_line_and_exit_2(case, message, workdir, tmp_path, capsys):
  text = "a dog runs on the grass"
  if case in ("empty", "too_long"):
    run_dir = workdir
    text = "   " if case == "empty" else " ".join(["a man with a red hat"] * 6)
  else:
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
  args = ["--workdir", str(run_dir), "--out", str(tmp_path), text]
  if case == "no_model":
    shutil.rmtree(run_dir / "model")
  elif case == "no_checkpoint":
    shutil.rmtree(run_dir / "checkpoints")
    args += ["--step", "1"]
  elif case == "no_tokenizer":
    (run_dir / "model" / MODEL_FILENAME).unlink()
  code = run_cli(lambda: visualize.main(args))
  errors = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors


@pytest.mark.slow
def test_module_entry_point_exits_2_with_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-m", "transformer.visualize", "--workdir", str(tmp_path / "absent"), "a dog"],
    capture_output=True,
    text=True,
    env=env,
    cwd=Path(__file__).parents[2],
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    (
      f"error: {tmp_path / 'absent'} is not a directory: --workdir must be a run directory "
      "written by training"
    )
  ]
