"""What one rank holds of the model under a tensor x pipeline layout, from the project's own code on the meta device.

`stage_tensors(cfg, tp, pp)`: per pipeline stage, the element count of every distinct parameter on one
tensor-parallel rank (tensor rank 0: the ranks differ only in which vocabulary rows are padding), built the way
training builds it: CoCa on the meta device, swapped by `apply_tensor_parallel` at degree `tp`, cut into stages by
`PipelineStage` with the cost-model split. Nothing is allocated and no process group is needed, so the layouts of
a 512-GPU run are read on a laptop. Cached per (config, tp, pp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from megacoca.config.model import CoCaConfig
from megacoca.optim import param_groups
from megacoca.parallel.build import meta_model
from megacoca.parallel.pipeline.split import split_stages
from megacoca.parallel.pipeline.stage import PipelineStage


@dataclass(frozen=True)
class StageTensors:
    """One pipeline stage on one tensor-parallel rank: `numels` of its distinct parameters (a tied weight once),
    `sharded` the elements of tensor-parallel ones (the rest are whole on every tensor rank)."""

    numels: tuple[int, ...]
    sharded: int
    groups: tuple[int, ...] = ()  # elements of each optimizer param group (megacoca.optim.param_groups)

    @property
    def elements(self) -> int:
        return sum(self.numels)


def stage_tensors(cfg, tp: int, pp: int) -> tuple[StageTensors, ...]:
    return _stage_tensors(json.dumps(cfg.to_dict(), sort_keys=True), tp, pp)


@lru_cache(maxsize=64)
def _stage_tensors(key: str, tp: int, pp: int) -> tuple[StageTensors, ...]:
    cfg = CoCaConfig.from_dict(json.loads(key))
    model = meta_model(cfg, tp if tp > 1 else None)
    stages = [model] if pp == 1 else [PipelineStage(model, _pipeline_split(key, pp), s) for s in range(pp)]
    out = []
    for stage in stages:
        params = list(stage.parameters())  # distinct Parameters (a tied weight once)
        groups = tuple(sum(p.numel() for p in group["params"]) for group in param_groups(stage, 0.0))
        out.append(StageTensors(tuple(p.numel() for p in params if p.requires_grad),
                                sum(p.numel() for p in params if p.requires_grad and hasattr(p, "tp_shard")),
                                groups))
    return tuple(out)


def text_tower_tensors(cfg, tp: int = 1) -> int:
    """Trainable parameter tensors of the unimodal text tower on one tensor rank (what a text-ahead forward gathers
    apart under ZeRO-3); a weight tied to another part counted here."""
    return _text_tower_tensors(json.dumps(cfg.to_dict(), sort_keys=True), tp)


@lru_cache(maxsize=64)
def _text_tower_tensors(key: str, tp: int) -> int:
    model = meta_model(CoCaConfig.from_dict(json.loads(key)), tp if tp > 1 else None)
    return sum(1 for p in model.text.parameters() if p.requires_grad)


def pipeline_split(cfg, pp: int):
    """The cost-model split of `cfg` over `pp` stages (megacoca.parallel.pipeline.split), computed once per
    (config, pp): the planner asks for it for each of a thousand layouts."""
    return _pipeline_split(json.dumps(cfg.to_dict(), sort_keys=True), pp)


@lru_cache(maxsize=64)
def _pipeline_split(key: str, pp: int):
    return split_stages(CoCaConfig.from_dict(json.loads(key)), pp)


def vit_blocks_per_stage(cfg, pp: int) -> tuple[int, ...]:
    """How many ViT blocks each pipeline stage runs (the cost-model split)."""
    return tuple(len(blocks) for blocks in pipeline_split(cfg, pp).blocks)
