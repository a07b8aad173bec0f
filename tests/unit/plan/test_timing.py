"""The step-time model's structure on the presets: the pipeline bubble shrinks with more micro-batches, tensor
parallelism pays all-reduces that grow with the micro-batch, ZeRO-3 moves three times the weights per micro-batch
against ZeRO-1/2's once per step, more GPUs at the same per-GPU batch give more samples/s. (How close it comes to
measured step times is in docs/benchmarks.md and benchmarks/plan_validate.py.)"""

import json

import pytest

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import Layout
from megacoca.plan.presets import PRESETS
from megacoca.plan.profile import DeviceProfile
from megacoca.plan.timing import Work, predict_time, stage_work, work_seconds

BASE = get_flavor("coca_base")
A100 = PRESETS["a100-80gb"]


def test_pipeline_bubble_shrinks_with_micro_batches():
    few = predict_time(BASE, Layout(pp=4, dp=2, zero_stage=1, micro_batch=8, grad_accum=4), A100)
    many = predict_time(BASE, Layout(pp=4, dp=2, zero_stage=1, micro_batch=8, grad_accum=32), A100)
    assert few.parts["pipeline bubble"] / few.seconds > 2 * many.parts["pipeline bubble"] / many.seconds


def test_tensor_parallel_all_reduces():
    plain = predict_time(BASE, Layout(dp=8, zero_stage=1, micro_batch=16, grad_accum=1), A100)
    tp = predict_time(BASE, Layout(tp=2, dp=4, zero_stage=1, micro_batch=32, grad_accum=1), A100)
    assert plain.parts["tensor-parallel all-reduces"] == 0 < tp.parts["tensor-parallel all-reduces"]


def test_zero3_traffic_grows_with_accumulation_and_zero1_does_not():
    def exposed(zero, accum):
        slow = DeviceProfile(**{**A100.__dict__, "inter_node_bw": 1e9})  # a slow network exposes the traffic
        return predict_time(BASE, Layout(dp=64, zero_stage=zero, micro_batch=4, grad_accum=accum), slow.with_nodes(8)
                            ).parts["data-parallel exposed"]
    assert exposed(3, 8) > 4 * exposed(3, 1)
    assert exposed(1, 8) == pytest.approx(exposed(1, 1), rel=0.05)


def test_more_gpus_more_throughput():
    small = predict_time(BASE, Layout(dp=8, zero_stage=1, micro_batch=32, grad_accum=1), A100)
    large = predict_time(BASE, Layout(dp=64, zero_stage=1, micro_batch=32, grad_accum=1), A100)
    # 8 GPUs share one node's NVLink; 64 cross nodes, where ZeRO-1's post-step all-gather of the weights shows
    assert 4 < large.samples_per_s / small.samples_per_s <= 8
    assert large.parts["data-parallel exposed"] > 5 * small.parts["data-parallel exposed"]
    assert 0 < large.mfu < 1


def test_tensor_parallelism_splits_the_matmuls_not_the_layernorms():
    """Megatron's layout without sequence parallelism: each tensor rank does half the matmul FLOPs and attention,
    but every LayerNorm and residual add whole."""
    one, two = stage_work(BASE, BASE.vision_layers, True), stage_work(BASE, BASE.vision_layers, True, tp=2)
    assert two.flops == pytest.approx(one.flops / 2, rel=1e-12)
    assert two.attention == pytest.approx(one.attention / 2, rel=1e-12)
    assert one.elementwise / 2 < two.elementwise < one.elementwise
    checkpointed = stage_work(BASE, BASE.vision_layers, True, checkpointing=True)
    assert checkpointed.flops > 1.2 * one.flops and checkpointed.elementwise > one.elementwise


def test_work_seconds_with_calibrated_rates_and_without():
    work = Work(flops=1e12, elementwise=1e9, attention=1e8, attention_rows=1e6)
    rates = {"flops": 1e12, "elementwise": 1e10, "attention": 1e9, "attention_rows": 1e8}
    calibrated = DeviceProfile(**{**A100.__dict__, "block_rates": {"bf16": rates}})
    assert work_seconds(work, calibrated, "bf16") == pytest.approx(1 + 0.1 + 0.1 + 0.01)
    # a preset: the matmul rate, and the elementwise bytes at the memory bandwidth (a fused kernel's scores are free)
    assert work_seconds(work, A100, "bf16") == pytest.approx(1e12 / A100.matmul_flops["bf16"]
                                                             + 2 * 1e9 / A100.memory_bw)


def test_zero3_with_checkpointing_gathers_again_for_the_recompute():
    slow = DeviceProfile(**{**A100.__dict__, "inter_node_bw": 1e9, "tensor_overhead_s": {"3": 1e-3}})

    def step(zero, checkpointing):
        layout = Layout(dp=64, zero_stage=zero, micro_batch=4, grad_accum=4, checkpointing=checkpointing)
        return predict_time(BASE, layout, slow.with_nodes(8))

    zero3 = step(3, True).parts["data-parallel exposed"] / step(3, False).parts["data-parallel exposed"]
    assert zero3 > 1.2
    # ZeRO-1 moves the same bytes (a longer backward only hides a little more of its reduce-scatter)
    assert step(1, True).parts["data-parallel exposed"] == pytest.approx(step(1, False).parts["data-parallel exposed"],
                                                                         rel=0.01)


def test_ring_latency_grows_with_the_group():
    measured_at_four = DeviceProfile(**{**A100.__dict__, "collective_latency_s": 3e-3, "collective_ranks": 4})
    assert measured_at_four.latency(4) == pytest.approx(3e-3)
    assert measured_at_four.latency(2) == pytest.approx(1e-3)
    assert A100.latency(2) == A100.latency(512) == A100.collective_latency_s  # a preset: one figure


def test_a_profile_from_before_block_rates_still_loads():
    legacy = json.loads(A100.to_json())
    legacy.pop("block_rates")
    for key in ("overlap", "micro_param_s", "step_param_s", "sample_overhead_s", "parallel_overhead_s",
                "collective_ranks"):
        legacy.pop(key)
    legacy["block_flops"] = {"fp32": 8e10, "bf16": 1e11}
    profile = DeviceProfile.from_json(json.dumps(legacy))
    assert profile.block_rates == {"fp32": {"flops": 8e10}, "bf16": {"flops": 1e11}}
    assert profile.overlap == 0.7 and profile.step_param(1) == pytest.approx(32 / profile.memory_bw)
    assert work_seconds(Work(2e11, 1e9), profile, "bf16") == pytest.approx(2.0)
