"""The planner's predicted peak memory per rank against the tracker's measurement (megacoca.profiling.measure) of real
DeepSpeed training steps on gloo CPU ranks: within 10% (the issue's bound; docs/benchmarks.md has the full tables,
within 5.5% on every rank of 44 layouts). ZeRO-1 with a small reduce bucket (so the activations and the optimizer
step decide the peak), ZeRO-3 with activation checkpointing, and a 2-stage pipeline with accumulation."""

import pytest

from megacoca.config.layout import Layout
from megacoca.config.model import CoCaConfig
from megacoca.profiling.measure import measure_layout
from megacoca.plan.memory import ZeroBuffers, default_text_ahead, predict

CFG = CoCaConfig(image_size=64, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, vision_mlp_dim=256,
                 caption_queries=16, pooler_heads=2, vocab_size=2000, context_length=24, text_width=64,
                 text_heads=2, text_mlp_dim=256, text_layers=1, decoder_layers=1, embed_dim=64, kernels="torch")
SHARD_ALL = "parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"
SMALL_BUCKET = "parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=200000"


@pytest.mark.parametrize("overrides, layout, buffers", [
    (["parallel.deepspeed_config=zero1_bf16", "schedule.micro_batch_size=8", "schedule.global_batch_size=16",
      SMALL_BUCKET], Layout(dp=2, zero_stage=1, micro_batch=8), ZeroBuffers(reduce_bucket=200_000)),
    (["parallel.deepspeed_config=zero3_bf16", "schedule.micro_batch_size=8", "schedule.global_batch_size=16",
      SHARD_ALL, "parallel.activation_checkpointing=true"],
     Layout(dp=2, zero_stage=3, micro_batch=8, checkpointing=True), ZeroBuffers(persistence_threshold=0)),
    (["parallel.deepspeed_config=zero1_bf16", "parallel.pp=2", "schedule.micro_batch_size=4",
      "schedule.global_batch_size=16", SMALL_BUCKET],
     Layout(pp=2, zero_stage=1, micro_batch=4, grad_accum=4, text_ahead=default_text_ahead(CFG, 2, 4)),
     ZeroBuffers(reduce_bucket=200_000)),
], ids=["zero1", "zero3-ckpt", "pp2-zero1"])
def test_predicted_peak_within_ten_percent(overrides, layout, buffers):
    ranks = measure_layout(overrides, 2, CFG, steps=2)
    predicted = predict(CFG, layout, buffers)
    for rank in ranks:
        stage = predicted[rank.get("pp_rank", 0)]
        assert stage.peak == pytest.approx(rank["peak_bytes"], rel=0.10), (rank, stage)
