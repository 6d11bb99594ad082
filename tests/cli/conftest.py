"""Tiny untrained runs saved as training leaves them (`write_run`), for the commands' tests."""

import pytest
from flax import nnx

from tests.helpers import TINY_MAX_LEN
from transformer import DecoderOnly, EncoderDecoder, TransformerConfig


def _tiny_run(tmp_path_factory, tokenizer, write_run, model_class, task: str):
  config = TransformerConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=TINY_MAX_LEN)
  model = model_class(config, rngs=nnx.Rngs(0))
  workdir = tmp_path_factory.mktemp(task)
  return write_run(workdir, model, tokenizer, task=task, data_max_length=TINY_MAX_LEN)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tokenizer, write_run):
  return _tiny_run(tmp_path_factory, tokenizer, write_run, DecoderOnly, "lm")


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory, tokenizer, write_run):
  return _tiny_run(tmp_path_factory, tokenizer, write_run, EncoderDecoder, "translation")
