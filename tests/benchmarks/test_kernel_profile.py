# ruff: noqa: E501  (the HLO fixture keeps XLA's one-instruction lines)
"""benchmarks/kernel_profile.py: the HLO parse and the kernel groups, on a real CPU trace of the
tiny train step and on GPU-style names (the cuBLAS, cuDNN and NCCL kernels a GPU trace shows)."""

import jax
import pytest

from benchmarks.kernel_profile import GROUPS, HloOp, hlo_ops, kernel_group, profile, summarise
from transformer import TransformerConfig

# Cut down from the optimised HLO text of a GPU step (one instruction per line, as XLA prints).
GPU_HLO = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%fused_computation.3 (param_0.1: bf16[8,4]) -> bf16[4,8] {
  %param_0.1 = bf16[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[4,8]{1,0} transpose(%param_0.1), dimensions={1,0}
}

%fused_computation.4 (param_0.2: f32[8,4]) -> f32[8] {
  %param_0.2 = f32[8,4]{1,0} parameter(0)
  %exponential.1 = f32[8,4]{1,0} exponential(%param_0.2)
  ROOT %reduce.1 = f32[8]{0} reduce(%exponential.1, %c), dimensions={1}, to_apply=%add
}

ENTRY %main (p: bf16[8,4]) -> bf16[4,8] {
  %custom-call.40 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(BTD,DF->BTF)/dot_general"}
  %custom-call.7 = (bf16[2,8,4,4]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaScaleBiasSoftmax", metadata={op_name="jit(train_step)/jvp(attention)/dot_product_attention"}
  %input_reduce_fusion.2 = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_computation.4, metadata={op_name="jit(train_step)/jvp(cross_entropy)/reduce_sum"}
  %loop_rsqrt_fusion = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation.4, metadata={op_name="jit(train_step)/transpose(jvp(layer_norm))/mul"}
  %transpose_fusion.3 = bf16[4,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(train_step)/jvp(layer_norm)/transpose"}
  %all-reduce.1 = f32[8]{0} all-reduce(%y), replica_groups={}, to_apply=%add
  ROOT %rng-bit-generator.2 = (u32[4]{0}, u32[8,4]{1,0}) rng-bit-generator(%key), algorithm=rng_default
}
"""


def test_hlo_parse_reads_opcodes_targets_scopes_and_fusion_bodies():
  ops = hlo_ops(GPU_HLO)
  assert ops["custom-call.40"].target == "__cublas$gemm"
  assert ops["input_reduce_fusion.2"].body == {"parameter", "exponential", "reduce"}
  assert "cross_entropy" in ops["input_reduce_fusion.2"].op_name
  assert ops["transpose_fusion.3"].body == {"parameter", "transpose"}
  assert ops["transpose.1"].opcode == "transpose"  # instructions inside fusions too


@pytest.mark.parametrize(
  "hlo_op, kernel, group",
  [
    ("custom-call.40", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("custom-call.7", "cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"),
    ("input_reduce_fusion.2", "input_reduce_fusion_2", "softmax/cross-entropy"),
    ("loop_rsqrt_fusion", "loop_rsqrt_fusion", "layer norm"),
    ("transpose_fusion.3", "transpose_fusion_3", "copies/transposes"),  # a copy, even in LN
    ("all-reduce.1", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collectives"),
    ("rng-bit-generator.2", "rng_bit_generator_kernel", "random bits"),
    # Kernels whose instruction the HLO text does not have: their own names decide.
    ("unknown.1", "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("unknown.2", "MemcpyDtoD", "copies/transposes"),
    ("unknown.3", "flash_fwd_kernel", "attention"),
    ("unknown.4", "some_kernel", "other"),
  ],
)
def test_gpu_style_kernels_fall_into_their_groups(hlo_op, kernel, group):
  assert kernel_group(hlo_ops(GPU_HLO).get(hlo_op), kernel) == group


def test_summary_adds_up_and_skips_while_loops():
  ops = {"dot.1": HloOp("dot"), "while.2": HloOp("while"), "fusion.3": HloOp("fusion")}
  events = [("dot.1", "dot.1", 3.0), ("while.2", "while.2", 9.0), ("fusion.3", "f", 1.0)] * 2
  summary = summarise(events, ops, steps=2)
  assert summary["kernel_seconds_per_step"] == pytest.approx(4.0)
  assert summary["seconds_per_step_by_group"]["matmul"] == pytest.approx(3.0)
  assert summary["seconds_per_step_by_group"]["elementwise"] == pytest.approx(1.0)
  assert [row["hlo_op"] for row in summary["top_kernels"]] == ["dot.1", "fusion.3"]


@pytest.mark.slow
def test_cpu_trace_of_the_tiny_step_finds_every_part_of_the_model():
  """XLA:CPU names its thunks after HLO instructions ("ynn_fusion.3", "copy.12"): the same
  grouping finds the matmuls, attention, the loss, LayerNorm and dropout's random bits."""
  config = TransformerConfig.tiny(dropout_rate=0.1)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
    summary = profile(config, batch_size=4, length=16, steps=2)
  by_group = summary["seconds_per_step_by_group"]
  assert set(by_group) == set(GROUPS)
  for group in ("matmul", "attention", "softmax/cross-entropy", "layer norm", "random bits"):
    assert by_group[group] > 0, (group, by_group)
  assert by_group["collectives"] == 0  # one device
  assert sum(by_group.values()) == pytest.approx(summary["kernel_seconds_per_step"])
  assert summary["instructions_not_in_hlo"] == 0
  assert len(summary["top_kernels"]) == 10
