"""transformer.export: MarianMT and CTranslate2 models that compute what ours does.

The format checks need nothing optional; the Hugging Face logits need torch and transformers, the
CTranslate2 translations ctranslate2 as well (the `export` extra): without them those skip.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import EncoderDecoder, TransformerConfig
from transformer import export as export_module
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.decode import beam_search
from transformer.decode.batch import length_limits
from transformer.model.layers import sinusoidal_position_encoding

MAX_LEN = 32


def marian_positions(length: int, dim: int) -> np.ndarray:
  """MarianSinusoidalPositionalEmbedding's table, from its definition: angle pos / 10000^(2i/D),
  the sines in the first half of D and the cosines in the second."""
  angle_LI = np.arange(length)[:, None] / np.power(10_000.0, np.arange(0, dim, 2) / dim)[None]
  return np.concatenate([np.sin(angle_LI), np.cos(angle_LI)], axis=1)


def test_the_hidden_order_turns_our_positions_into_marians():
  ours = np.asarray(sinusoidal_position_encoding(50, 16))
  order = export_module.hidden_order(16)
  np.testing.assert_allclose(ours[:, order], marian_positions(50, 16), atol=1e-6)


@pytest.mark.parametrize(
  "change, named",
  [
    (dict(norm="pre"), "model.norm='pre'"),
    (dict(position="rope"), "model.position='rope'"),
    (dict(activation="gelu"), "model.activation='gelu'"),
    (dict(share_embeddings=False, tie_output=False), "model.share_embeddings=False"),
    (dict(use_bias=False), "model.use_bias=False"),
  ],
)
def test_architectures_the_formats_cannot_express_are_refused_by_name(change, named):
  config = dataclasses.replace(TransformerConfig.tiny(), **change)
  with pytest.raises(ValueError, match=named) as error:
    export_module.check_exportable("translation", config)
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="'lm' run cannot be exported"):
    export_module.check_exportable("lm", TransformerConfig.tiny())


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tokenizer, write_run):
  """A random post-norm model with the test tokenizer's vocabulary, written as a run."""
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)
  model = EncoderDecoder(config, rngs=nnx.Rngs(0))
  model.eval()
  workdir = write_run(
    tmp_path_factory.mktemp("run"), model, tokenizer, task="translation", data_max_length=MAX_LEN
  )
  return workdir, model


def test_the_huggingface_folder_has_marians_files(random_run, tmp_path):
  workdir, model = random_run
  out = export_module.export(workdir, "huggingface", tmp_path / "hf")
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "vocab.json", "source.spm", "target.spm"} <= names
  from safetensors.numpy import load_file

  tensors = load_file(str(out / "model.safetensors"))
  assert tensors["model.shared.weight"].shape == (model.config.vocab_size, model.config.d_model)
  assert not any("embed_positions" in name for name in tensors)  # Marian computes its own


def test_huggingface_logits_equal_ours(random_run, tmp_path, tokenizer):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir, model = random_run
  out = export_module.export(workdir, "huggingface", tmp_path / "hf")
  marian = transformers.MarianMTModel.from_pretrained(out).eval()
  texts = ["A man in a red hat rides a bike.", "Two dogs play in the snow near a fence."]
  marian_tokenizer = transformers.MarianTokenizer.from_pretrained(out)
  src_ids = [ids + [EOS_ID] for ids in tokenizer.encode(texts)]
  assert marian_tokenizer(texts).input_ids == src_ids
  src_BS = np.full((2, max(map(len, src_ids))), PAD_ID)
  for row, ids in zip(src_BS, src_ids):
    row[: len(ids)] = ids
  tgt_BT = np.random.default_rng(0).integers(4, model.config.vocab_size, (2, 9))
  tgt_BT[:, 0] = 2  # BOS, the decoder's first input
  ours = np.asarray(model(jnp.asarray(src_BS, jnp.int32), jnp.asarray(tgt_BT, jnp.int32)))
  with torch.no_grad():
    theirs = marian(
      input_ids=torch.tensor(src_BS),
      attention_mask=torch.tensor(src_BS != PAD_ID).long(),
      decoder_input_ids=torch.tensor(tgt_BT),
    ).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A smoke run trained long enough (150 steps) to end its sentences (only where the test that
  uses it can run)."""
  pytest.importorskip("ctranslate2")
  pytest.importorskip("transformers")
  from transformer.configs import smoke
  from transformer.train.loop import run

  workdir = tmp_path_factory.mktemp("trained")
  config = smoke.get_config()
  config.num_train_steps = 150
  config.checkpoint_every_steps = 150
  config.decode.bleu_at_end = False
  config.decode.validation_bleu = False
  run(config, workdir)
  return workdir


@pytest.mark.slow
def test_ctranslate2_translates_as_we_do(trained_run, tmp_path):
  """CTranslate2 ranks finished hypotheses by log p / |Y|^alpha, we by GNMT's penalty: with
  alpha = 0 both rank by log-probability, and beam 4 (and greedy) outputs must agree."""
  import ctranslate2

  from transformer.runs.translator import Translator

  out = export_module.export(trained_run, "ctranslate2", tmp_path / "ct2")
  translator = Translator(trained_run)
  engine = ctranslate2.Translator(str(out), device="cpu", compute_type="float32")
  texts = [
    "A man is riding a bike.",
    "Two children play in the water.",
    "A woman in a blue dress sings.",
    "A dog runs on the grass.",
  ]
  pieces = translator.tokenizer._sp.id_to_piece
  src_BS = translator.encode(texts)
  for beam in (1, 4):
    limits_B = np.asarray(length_limits(jnp.asarray(src_BS), 8, MAX_LEN, PAD_ID))
    tokens_BKT, _ = beam_search(
      translator.model,
      jnp.asarray(src_BS),
      max_new_tokens=MAX_LEN,
      beam_size=beam,
      alpha=0.0,
      num_results=1,
      max_new_tokens_B=jnp.asarray(limits_B),
    )
    for row, ids, limit in zip(np.asarray(tokens_BKT)[:, 0], src_BS, limits_B):
      source = [pieces(int(i)) for i in ids if i != PAD_ID]
      (result,) = engine.translate_batch(
        [source],
        beam_size=beam,
        length_penalty=0.0,
        max_decoding_length=int(limit),
        suppress_sequences=[["<pad>"]],
      )
      ours = [pieces(int(i)) for i in row if i not in (PAD_ID, EOS_ID)]
      assert result.hypotheses[0] == ours, (beam, source)
