"""How OptimConfig/ScheduleConfig are realised: weight-decay groups and the lr schedule."""

import math

import pytest

from megacoca.config.train import ScheduleConfig
from megacoca.models.coca import CoCa
from megacoca.optim import lr_lambda, param_groups

import sys, os  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "distributed"))
from memory_data import TINY  # noqa: E402


def test_no_decay_on_norms_biases_embeddings_queries_logit_scale():
    model = CoCa(TINY.replace(vision_class_token=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(skipped) == len(names)
    for name in skipped:
        assert (name.endswith("bias") or ".ln" in name or "embedding" in name or "query" in name
                or name == "logit_scale"), name
    for name in ("logit_scale", "text.embed.token_embedding.weight", "text.embed.positional_embedding",
                 "text.embed.cls_embedding", "vision.embed.positional_embedding", "vision.embed.class_embedding",
                 "image_pooler.caption_pooler.query"):
        assert name in skipped
    for name in ("vision.embed.patch_embed.weight", "vision.blocks.0.attn.q_proj.weight",
                 "decoder.layers.0.cross_block.mlp.fc1.weight", "caption_head.weight"):
        assert name in decayed


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay(decay):
    schedule = ScheduleConfig(steps=110, warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    f = lr_lambda(schedule)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    expected_end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[decay]
    assert f(110) == pytest.approx(expected_end)
    if decay == "cosine":
        assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    if decay == "linear":
        assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
