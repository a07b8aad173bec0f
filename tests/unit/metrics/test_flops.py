"""FLOPs per sample against docs/REFERENCE.md section 6 (forward GFLOP/pair, train TFLOP/pair, attention share)."""

import pytest

from megacoca.config.model import CoCaConfig
from megacoca.metrics.flops import attention_share, forward_flops_breakdown, forward_flops_per_sample, \
    train_flops_per_sample
from megacoca.models.coca import get_flavor

# open_clip coca_ViT-L-14: 224px/14 with a class token, one 256-query pooler, text 768 wide, ctx 76, 49408 vocab.
OPEN_CLIP_L14 = CoCaConfig(
    image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp_dim=4096,
    vision_class_token=True, pooler_layout="open_clip", caption_queries=256, pooler_heads=8, text_width=768,
    text_heads=12, text_mlp_dim=3072, text_layers=12, decoder_layers=12, decoder_mlp_after_self_attn=True,
    vocab_size=49408, context_length=76, embed_dim=768)


@pytest.mark.parametrize("cfg, fwd_gflop, train_tflop, attention", [
    (get_flavor("coca_giant"), 708, 2.12, 0.025),
    (get_flavor("coca_base"), 86.3, 0.26, 0.041),
    (OPEN_CLIP_L14, 214.6, 0.64, 0.037),
])
def test_reference_numbers(cfg, fwd_gflop, train_tflop, attention):
    assert forward_flops_per_sample(cfg) / 1e9 == pytest.approx(fwd_gflop, rel=0.005)
    assert train_flops_per_sample(cfg) / 1e12 == pytest.approx(train_tflop, rel=0.01)
    assert attention_share(cfg) == pytest.approx(attention, abs=0.001)


def test_giant_shares():
    parts = forward_flops_breakdown(get_flavor("coca_giant"))
    total = sum(parts.values())
    assert parts["vision"] / total == pytest.approx(0.73, abs=0.01)  # ViT GEMMs
    assert (parts["decoder"] + parts["decoder_attention"]) / total == pytest.approx(0.14, abs=0.01)
    assert (parts["text"] + parts["text_attention"]) / total == pytest.approx(0.077, abs=0.005)


def test_matmul_params_times_tokens_without_attention():
    """The dense part is 2 x (matmul params x the tokens they see): check the unimodal text tower."""
    cfg = get_flavor("coca_tiny")
    per_layer_params = 4 * cfg.text_width ** 2 + 2 * cfg.text_width * cfg.text_mlp_dim
    assert forward_flops_breakdown(cfg)["text"] == 2 * cfg.text_layers * per_layer_params * (cfg.context_length + 1)


def test_train_is_three_forwards():
    cfg = get_flavor("coca_tiny")
    assert train_flops_per_sample(cfg) == 3 * forward_flops_per_sample(cfg)


def test_parallel_poolers_count_the_contrastive_pooler_over_the_image_tokens():
    cascade = get_flavor("coca_base")
    parallel = cascade.replace(pooler_cascade=False)
    a, b = forward_flops_breakdown(cascade), forward_flops_breakdown(parallel)
    n, q, wv, d = cascade.image_tokens, cascade.caption_queries, cascade.vision_width, cascade.pooled_width
    # the contrastive pooler's k, v projections see n tokens of the ViT's width instead of q caption tokens
    assert b["poolers"] - a["poolers"] == 2 * 2 * (n * wv * d - q * d * d)
    assert b["poolers_attention"] - a["poolers_attention"] == 2 * 2 * (n - q) * d
    assert {k: v for k, v in a.items() if not k.startswith("poolers")} == \
        {k: v for k, v in b.items() if not k.startswith("poolers")}
