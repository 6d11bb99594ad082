"""The model's hyper-parameters: one frozen dataclass shared by the three families."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from transformer.errors import UserError

POSITIONS = ("sinusoidal", "learned", "rope")
NORMS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")
DTYPES = ("float32", "bfloat16", "float16")
LOGITS_DTYPES = ("auto", *DTYPES)
DROPOUT_RNGS = ("auto", "threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and options of a Transformer (Vaswani et al., 2017, Table 3 names in brackets).

  Attributes:
    vocab_size: V, one vocabulary shared by source and target (the paper's 37k BPE).
    d_model: D [d_model], width of every residual stream.
    num_heads: N [h]; the head width H = D / N is the paper's d_k = d_v.
    d_ff: F [d_ff], hidden width of the position-wise feed-forward network.
    num_encoder_layers, num_decoder_layers: L [N] of each stack.
    dropout_rate: P_drop on embeddings + positions and on each sub-layer output.
    attention_dropout_rate: dropout on the softmax weights (used by tensor2tensor, 0 in the paper's
      text). It needs the [B, N, T, S] weights, so training runs the "xla" path; "auto" allows it,
      the fused "cudnn" and "blockwise" implementations refuse it.
    max_len: the longest sequence that positional encodings and the KV cache provide for.
    position: "sinusoidal" (the paper), "learned" (its Table 3 row E) or "rope".
    norm: "post" = LayerNorm(x + Sublayer(x)) as in the paper; "pre" = x + Sublayer(LayerNorm(x)).
    activation: "relu" as in the paper, or "gelu".
    share_embeddings: one embedding table for source and target (needs a shared vocabulary).
    tie_output: the pre-softmax linear layer reuses the embedding matrix (Section 3.4).
    pad_id: token id of padding; padded keys are never attended to.
    num_classes: size of the EncoderOnly classification head.
    dtype: compute dtype; parameters stay in param_dtype (float32) and softmax/norms run in float32.
    logits_dtype: dtype of the pre-softmax logits [B, T, V], the largest arrays of a step;
      "bfloat16" halves their memory traffic (the loss and the decoders still reduce over them in
      float32, element by element). "auto" is bfloat16 when `dtype` is bfloat16, else float32.
    dropout_rng: the PRNG that draws the dropout masks (`jax.random` implementations): JAX's
      "threefry2x32", or "rbg" / "unsafe_rbg", XLA's RngBitGenerator, which makes the masks' bits
      at a fraction of threefry's cost on GPUs. "auto" is "rbg" when `dtype` is 16-bit, else
      threefry2x32. Every choice is deterministic given the seed and the step, so a resumed run
      draws the same masks.
      Both stay float32 / threefry2x32 by default until the numerics check of the two ("auto")
      on the GPU recipe's model has run its 2,000 steps (`benchmarks/numerics.py`; it resumes):
      then "auto" becomes their default, so that bfloat16 compute gets both without a flag.
    scan_layers: run each stack as one `nnx.scan` over its layers, whose parameters are then
      stacked [L, ...] ("encoder/layers/self_attention/query" of shape [L, D, N, H]): the step
      compiles one layer per stack instead of L. Same values and gradients as the unrolled
      stacks; exported models keep the unrolled names (`transformer.model.stacking`).
    attention: implementation of scaled dot-product attention, see `dot_product_attention`.
    attention_block_size: key block of the blockwise attention (256: on CPU at T = 2048 level
      with 512 and ahead of 64 and 128, see benchmarks/README.md).
    layer_norm_epsilon: epsilon of every LayerNorm.
    use_bias: additive biases in every attention and feed-forward projection and LayerNorm, as
      the paper's layers have; False leaves them all out (GPT-style models without biases, as
      nanoGPT's default bias=False: the shakespeare_char model then has 40 parameter arrays
      instead of 73, and its first step, compilation included, took 3.8 against 4.4 s on one
      core, the same program compiled second in one process; later steps took as long).
  """

  vocab_size: int = 32_000
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  max_len: int = 256
  position: Literal["sinusoidal", "learned", "rope"] = "sinusoidal"
  norm: Literal["post", "pre"] = "post"
  activation: Literal["relu", "gelu"] = "relu"
  share_embeddings: bool = True
  tie_output: bool = True
  pad_id: int = 0
  num_classes: int = 2
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  logits_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
  dropout_rng: Literal["auto", "threefry2x32", "rbg", "unsafe_rbg"] = "threefry2x32"
  scan_layers: bool = False
  attention: Literal["auto", "xla", "cudnn", "blockwise"] = "auto"
  attention_block_size: int = 256
  layer_norm_epsilon: float = 1e-6
  use_bias: bool = True

  def __post_init__(self):
    check(self)

  @property
  def head_dim(self) -> int:
    """H: the paper's d_k = d_v = d_model / h."""
    return self.d_model // self.num_heads

  @property
  def resolved_logits_dtype(self) -> str:
    """The logits' dtype that "auto" stands for with this compute dtype."""
    if self.logits_dtype != "auto":
      return self.logits_dtype
    return "bfloat16" if self.dtype == "bfloat16" else "float32"

  @property
  def resolved_dropout_rng(self) -> str:
    """The dropout PRNG implementation that "auto" stands for with this compute dtype."""
    if self.dropout_rng != "auto":
      return self.dropout_rng
    return "rbg" if self.dtype in ("bfloat16", "float16") else "threefry2x32"

  def replace(self, **changes) -> TransformerConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **overrides) -> TransformerConfig:
    """A ~45k-parameter model for tests and the copy task."""
    values = dict(
      vocab_size=64,
      d_model=32,
      num_heads=4,
      d_ff=64,
      num_encoder_layers=2,
      num_decoder_layers=2,
      max_len=64,
      dropout_rate=0.0,
    )
    return cls(**{**values, **overrides})

  @classmethod
  def small(cls, **overrides) -> TransformerConfig:
    """The benchmark's fixed 'small' model: V 8192, D 512, 8 heads, F 2048, 6+6 layers."""
    values = dict(
      vocab_size=8192,
      d_model=512,
      num_heads=8,
      d_ff=2048,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dropout_rate=0.1,
    )
    return cls(**{**values, **overrides})

  @classmethod
  def base(cls, vocab_size: int = 37_000, **overrides) -> TransformerConfig:
    """The paper's base model (Table 3): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1."""
    values = dict(
      vocab_size=vocab_size,
      d_model=512,
      num_heads=8,
      d_ff=2048,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dropout_rate=0.1,
    )
    return cls(**{**values, **overrides})

  @classmethod
  def big(cls, vocab_size: int = 37_000, **overrides) -> TransformerConfig:
    """The paper's big model (Table 3): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3."""
    values = dict(
      vocab_size=vocab_size,
      d_model=1024,
      num_heads=16,
      d_ff=4096,
      num_encoder_layers=6,
      num_decoder_layers=6,
      dropout_rate=0.3,
    )
    return cls(**{**values, **overrides})


def check(config: TransformerConfig) -> None:
  """Refuses values no model can be built from, in one line naming the key and the fix."""
  for name in (
    "vocab_size",
    "d_model",
    "num_heads",
    "d_ff",
    "max_len",
    "attention_block_size",
    "num_classes",
  ):
    if getattr(config, name) <= 0:
      raise UserError(f"model.{name} must be positive, got {getattr(config, name)}")
  for name in ("num_encoder_layers", "num_decoder_layers"):
    if getattr(config, name) < 0:
      raise UserError(f"model.{name} must be >= 0, got {getattr(config, name)}")
  if config.d_model % config.num_heads:
    raise UserError(
      f"model.d_model={config.d_model} is not divisible by model.num_heads={config.num_heads}: "
      "choose d_model as a multiple of num_heads"
    )
  if config.position == "rope" and config.head_dim % 2:
    raise UserError(f"rope needs an even head width, got d_model/num_heads={config.head_dim}")
  for name, allowed in (
    ("position", POSITIONS),
    ("norm", NORMS),
    ("activation", ACTIVATIONS),
    ("attention", ATTENTION_IMPLEMENTATIONS),
    ("dtype", DTYPES),
    ("param_dtype", DTYPES),
    ("logits_dtype", LOGITS_DTYPES),
    ("dropout_rng", DROPOUT_RNGS),
  ):
    if getattr(config, name) not in allowed:
      raise UserError(f"model.{name}={getattr(config, name)!r} is unknown: use one of {allowed}")
  for name in ("dropout_rate", "attention_dropout_rate"):
    if not 0.0 <= getattr(config, name) < 1.0:
      raise UserError(f"model.{name} must be in [0, 1), got {getattr(config, name)}")
  if not (math.isfinite(config.layer_norm_epsilon) and config.layer_norm_epsilon > 0):
    # 0 divides by zero on a constant row, NaN or a negative value poisons every norm.
    raise UserError(
      f"model.layer_norm_epsilon must be a finite number > 0 (e.g. 1e-6), got "
      f"{config.layer_norm_epsilon}"
    )
  if not 0 <= config.pad_id < config.vocab_size:
    raise UserError(
      f"model.pad_id={config.pad_id} is not an id of the {config.vocab_size}-piece vocabulary"
    )
  if config.attention_dropout_rate > 0 and config.attention in ("cudnn", "blockwise"):
    raise UserError(
      f"model.attention_dropout_rate={config.attention_dropout_rate} needs the full attention "
      f"weights, which model.attention={config.attention!r} never forms: set it to 0, or use "
      "attention 'xla' or 'auto'"
    )
