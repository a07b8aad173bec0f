"""megacoca.checkpoint.universal: the UNIVERSAL_CHECKPOINT_INFO DeepSpeed's ds_to_universal reads, on meta-device
models (no process group: building the tensor-parallel layers does not communicate). The end-to-end check (a
TP=2 checkpoint converted by ds_to_universal, loaded at TP=1) is tests/distributed/test_deepspeed_tools.py."""

import re
from types import SimpleNamespace

import pytest
import torch
from deepspeed.checkpoint.constants import (
    AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS,
    ORIGINAL_VOCAB_SIZE,
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    TP_REPLICATED_PARAMETER_PATTERNS,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    VOCABULARY_PARAMETER_PATTERNS,
)

from megacoca.checkpoint.universal import universal_checkpoint_info
from megacoca.config.model import CoCaConfig
from megacoca.models.coca import CoCa
from megacoca.parallel.tensor import apply_tensor_parallel

CFG = CoCaConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
                 caption_queries=8, pooler_heads=2, vocab_size=65, context_length=12, text_width=32, text_heads=2,
                 text_mlp_dim=64, text_layers=1, decoder_layers=1, embed_dim=32, kernels="torch")
LISTS = (TP_REPLICATED_PARAMETER_PATTERNS, PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, VOCABULARY_PARAMETER_PATTERNS)


def _model(cfg: CoCaConfig, tp: int):
    with torch.device("meta"):
        model = CoCa(cfg)
    if tp > 1:
        apply_tensor_parallel(model, SimpleNamespace(tp_group=None, tp_rank=tp - 1, tp_size=tp))
    return model


def _matched(info: dict, name: str) -> list[str]:
    return [key for key in LISTS if any(re.match(pattern, name) for pattern in info[key])]


def test_every_parameter_in_one_category_by_its_shard():
    model = _model(CFG, 2)
    info = universal_checkpoint_info(model)
    assert info[UNIVERSAL_CHECKPOINT_VERSION_KEY] >= 0.4 and info[ORIGINAL_VOCAB_SIZE] == 65
    assert AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS not in info
    names = [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        shard = getattr(param, "tp_shard", None)
        expected = ([] if shard is not None and shard.dim == 0 and shard.padded == shard.full_shape[0] else
                    [TP_REPLICATED_PARAMETER_PATTERNS] if shard is None else
                    [PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] if shard.dim == 1 else [VOCABULARY_PARAMETER_PATTERNS])
        assert _matched(info, name) == expected, name
    for key in LISTS:  # exact names: each pattern matches its one parameter (ds_to_universal's strict check)
        for pattern in info[key]:
            assert sum(bool(re.match(pattern, name)) for name in names) == 1, pattern
    assert _matched(info, "text.embed.token_embedding.weight") == [VOCABULARY_PARAMETER_PATTERNS]
    assert _matched(info, "caption_head.weight") == [VOCABULARY_PARAMETER_PATTERNS]
    assert _matched(info, "text.blocks.0.mlp.fc2.weight") == [PARAMETER_WITH_ROW_PARALLELISM_PATTERNS]
    assert _matched(info, "text.blocks.0.mlp.fc2.bias") == [TP_REPLICATED_PARAMETER_PATTERNS]
    assert _matched(info, "text.blocks.0.mlp.fc1.weight") == []  # column-parallel: DeepSpeed's default, dim 0


def test_tp1_records_the_layout_tensor_parallelism_would_cut():
    """A TP=1 checkpoint's universal form must say which weights a TP>1 run cuts along dim 1 or pads, else
    DeepSpeed's loader would cut every weight along dim 0; building that layout leaves the global RNG alone."""
    single, sharded = _model(CFG, 1), _model(CFG, 2)
    rng = torch.get_rng_state()
    assert universal_checkpoint_info(single) == universal_checkpoint_info(sharded)
    assert torch.equal(torch.get_rng_state(), rng)


def test_frozen_parameters_get_no_pattern():
    model = _model(CFG, 2)
    model.logit_scale.requires_grad_(False)
    assert _matched(universal_checkpoint_info(model), "logit_scale") == []


@pytest.mark.parametrize("vocab, refused", [(65, True), (64, False)])
def test_a_padded_caption_head_bias_is_refused_by_ds_to_universal(vocab, refused):
    """DeepSpeed strips vocabulary padding from 2-D tensors only: a padded 1-D bias cannot be described, and
    ds_to_universal's own check refuses the checkpoint naming it; unpadded it is an ordinary dim-0 shard."""
    from deepspeed.checkpoint.ds_to_universal import _validate_autotp_conversion_support

    info = universal_checkpoint_info(_model(CFG.replace(vocab_size=vocab, decoder_bias=True), 2))
    assert _matched(info, "caption_head.bias") == []
    if refused:
        with pytest.raises(ValueError, match=r"caption_head\\\.bias.*padded from 65 to 66"):
            _validate_autotp_conversion_support(info)
    else:
        _validate_autotp_conversion_support(info)
        assert AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS not in info


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_stages_describe_their_own_parameters(tp):
    """Every stage's checkpoint describes the whole model: ds_to_universal reads model-parallel rank 0's only."""
    from megacoca.parallel.pipeline.split import split_stages
    from megacoca.parallel.pipeline.stage import PipelineStage

    cfg = CFG.replace(vision_layers=3)
    model = _model(cfg, tp)
    whole = universal_checkpoint_info(model)
    stages = [universal_checkpoint_info(PipelineStage(model, split_stages(cfg, 2), stage)) for stage in range(2)]
    assert stages[0] == stages[1] == whole
