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
