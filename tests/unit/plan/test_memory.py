"""The planner's memory model against what really exists: the activations autograd saves in a real forward (every
saved tensor's storage counted once), the parameters a rank holds under tensor and pipeline parallelism (the
project's own meta-device build), and the model states by ZeRO stage."""

import pytest
import torch

from megacoca.config.flavors import get_flavor
from megacoca.config.layout import Layout
from megacoca.models.coca import CoCa
from megacoca.plan.memory import ZeroBuffers, activation_parts, predict, state_bytes
from megacoca.plan.params import stage_tensors


def _saved_bytes(model, images, text) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images, text)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("changes", [
    {},  # coca_tiny: paper poolers
    {"pooler_cascade": False},  # the paper's poolers side by side
    {"pooler_layout": "open_clip", "decoder_mlp_after_self_attn": True, "vision_heads": 2, "text_heads": 2,
     "vision_mlp_dim": 384, "text_mlp_dim": 320, "caption_queries": 17, "vocab_size": 777},
], ids=["paper", "paper-parallel-poolers", "open_clip-odd"])
def test_activations_match_what_autograd_saves(dtype, changes):
    cfg = get_flavor("coca_tiny", kernels="torch", **changes)
    torch.manual_seed(0)
    model = CoCa(cfg).to(dtype)
    batch = 6
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    text = torch.randint(3, cfg.vocab_size, (batch, cfg.context_length))
    text[:, 0], text[:, -1] = 1, 2  # full-length captions: the planner assumes the whole context is kept
    measured = _saved_bytes(model, images, text)
    e = 2 if dtype == torch.bfloat16 else 4
    parts = activation_parts(cfg, Layout(micro_batch=batch, precision="bf16" if e == 2 else "fp32"))
    predicted = e * sum(part["saved"] for part in parts.values()) \
        + 4 * batch * (cfg.context_length - 1) * cfg.vocab_size  # the caption loss's fp32 log-probabilities
    assert predicted == pytest.approx(measured, rel=0.03), (predicted, measured)


def test_parameters_per_rank_are_the_real_shards():
    giant = get_flavor("coca_giant")
    assert stage_tensors(giant, 1, 1)[0].elements / 1e6 == pytest.approx(2122.185, abs=1e-3)
    tp2 = stage_tensors(giant, 2, 1)[0]
    assert tp2.elements / 1e6 == pytest.approx(1064.564, abs=1e-3)  # docs/benchmarks.md, from the shard shapes
    stages = stage_tensors(giant, 1, 4)
    assert sum(stage.elements for stage in stages) == stage_tensors(giant, 1, 1)[0].elements
    assert stages[-1].elements > stages[0].elements  # the text side is on the last stage


@pytest.mark.parametrize("zero, params, grads, optimizer, backward_buckets", [
    (1, 2, 0, 12 / 4, 2 * 2 * 1000), (2, 2, 0, 12 / 4, 2 * 2 * 1000 + 2 / 4 * 4_000_000),
    (3, 2 / 4, 2 * 1000 + 2 / 4 * 4_000_000, 12 / 4, 0)])
def test_model_states_per_zero_stage(zero, params, grads, optimizer, backward_buckets):
    """Per element of the rank's parameters (bf16, dp=4): what is always live, and the reduce buckets (1000
    elements here) that ZeRO-1/2 allocate in backward and ZeRO-3 keeps."""
    numels = [400_000] * 10  # above the persistence threshold, divisible by dp
    p = sum(numels)
    states = state_bytes(numels, Layout(dp=4, zero_stage=zero), ZeroBuffers(reduce_bucket=1000, prefetch_bucket=0),
                         groups=(3_000_000, 1_000_000))
    assert states["params"] == params * p and states["optimizer"] == optimizer * p
    assert states["grads"] == (grads if zero == 3 else 0) and states["buckets"] == backward_buckets
    assert states["step"] == 3 * 4 * 3_000_000 / 4  # three fp32 buffers of the largest group's partition


def test_checkpointing_and_pipelines_cut_activations():
    cfg = get_flavor("coca_base")
    plain = predict(cfg, Layout(micro_batch=16, zero_stage=3, dp=8))
    ckpt = predict(cfg, Layout(micro_batch=16, zero_stage=3, dp=8, checkpointing=True))
    assert ckpt[0].activations < plain[0].activations / 5
    pipe = predict(cfg, Layout(micro_batch=16, pp=4, dp=2, zero_stage=1, grad_accum=8))
    assert [stage.detail["in_flight"] for stage in pipe] == [4, 3, 2, 1]


def test_keep_gathered_holds_the_stage_whole_through_forward_and_backward():
    """parallel.pipeline_keep_gathered: the stage's parameters stay gathered (eP beside the eP/dp shards) from the
    first forward to just before the step (measured on 4 CPU ranks, pp=2 x dp=2: params 10.12 MB = 6.75 gathered +
    3.37 shard on stage 0, docs/benchmarks.md); without it ZeRO-3's per-module gathers (eP live, 2eP at the end of
    forward); ZeRO-1/2 and pp=1 ignore it."""
    numels = [400_000] * 10
    p = sum(numels)
    buffers = ZeroBuffers(persistence_threshold=0)
    plain = state_bytes(numels, Layout(dp=4, pp=2, zero_stage=3, grad_accum=2), buffers)
    kept = state_bytes(numels, Layout(dp=4, pp=2, zero_stage=3, grad_accum=2, keep_gathered=True), buffers)
    assert kept["params"] == plain["params"] == 2 * p / 4
    assert kept["gathered"] == kept["gathered_backward"] == 2 * p
    assert plain["gathered"] == 2 * 2 * p and plain["gathered_backward"] == 2 * p
    assert state_bytes(numels, Layout(dp=4, zero_stage=3, keep_gathered=True), buffers) == \
        state_bytes(numels, Layout(dp=4, zero_stage=3), buffers)
    cfg = get_flavor("coca_base")
    layout = Layout(pp=4, dp=8, zero_stage=3, micro_batch=8, grad_accum=8)
    plain, kept = predict(cfg, layout), predict(cfg, layout.replace(keep_gathered=True))
    for a, b in zip(plain, kept):
        # coca_base's stages are below max_live: the model's peak moves only by the end-of-forward copy
        assert b.peak <= a.peak and b.peak > a.peak - 2 * a.detail["parameters"] - 1


def test_buffers_a_deepspeed_config_leaves_out_are_deepspeeds_defaults():
    """zero0_fp32.json has no buckets: raised to ZeRO-2 DeepSpeed allocates its default 5e8-element reduce bucket,
    one without overlap_comm (measured: 2,000 MB of fp32 gradients buffer, predicted within 0.1%)."""
    bare = ZeroBuffers.from_ds_config({"zero_optimization": {"stage": 2}})
    assert bare.reduce_bucket == 500_000_000 and bare.reduce_buffers == 1
    shipped = ZeroBuffers.from_ds_config({"zero_optimization": {"stage": 1, "overlap_comm": True,
                                                                "reduce_bucket_size": 5e7}})
    assert shipped.reduce_bucket == 50_000_000 and shipped.reduce_buffers == 2
    assert ZeroBuffers.from_ds_config({"zero_optimization": {"stage": 3}}).reduce_buffers == 2
    states = state_bytes([1000], Layout(dp=2, zero_stage=2, precision="fp32"), bare)
    assert states["buckets"] == 4 * 500_000_000 + 4 * 500


def test_text_ahead_keeps_the_text_towers_run_ahead_of_the_one_in_flight():
    """The last stage runs T(0..t-1) before F(0): besides the in-flight micro-batch's own, t - 1 text towers."""
    cfg = get_flavor("coca_base")
    layout = Layout(pp=2, dp=8, zero_stage=1, micro_batch=8, grad_accum=8)
    text = 2 * activation_parts(cfg, layout)["text_blocks"]["saved"]
    base = predict(cfg, layout)[-1].detail["activations"]
    for ahead, extra in ((1, 0), (3, 2), (20, 7)):
        assert predict(cfg, layout.replace(text_ahead=ahead))[-1].detail["activations"] == \
            pytest.approx(base + extra * text)


def test_the_overlapped_text_tower_is_held_whole_under_zero3():
    """parallel.overlap_text_tower under ZeRO-3 gathers the text tower once per step and holds it outside
    DeepSpeed's live budget (megacoca.parallel.overlap): above max_live the peak grows by its partitioned part;
    below it the model was gathered whole at the end of forward anyway; a pipeline never overlaps."""
    from megacoca.parallel.overlap import text_tower_tensor_numels

    cfg = get_flavor("coca_giant")
    small = ZeroBuffers(max_live_parameters=100_000_000, prefetch_bucket=0)
    layout = Layout(dp=64, zero_stage=3, micro_batch=8)
    plain, overlapped = predict(cfg, layout, small)[0], predict(cfg, layout.replace(text_overlap=True), small)[0]
    text = sum(n for n in text_tower_tensor_numels(cfg, 1) if n > small.persistence_threshold)
    assert overlapped.detail["gathered"] - plain.detail["gathered"] == pytest.approx(2 * 2 * text)
    base = get_flavor("coca_base")
    assert predict(base, layout)[0].peak == predict(base, layout.replace(text_overlap=True))[0].peak
    assert predict(cfg, layout.replace(zero_stage=1), small)[0].peak == \
        predict(cfg, layout.replace(zero_stage=1, text_overlap=True), small)[0].peak
