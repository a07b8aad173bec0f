"""Consolidation to one fp32 state dict from checkpoints of every ZeRO stage (ZeRO-3 with every parameter
partitioned; ZeRO-3 bf16: test_resume.py)."""

import os

import deepspeed
import pytest
import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader, assert_partitioned

from megacoca.checkpoint import consolidated_state_dict
from megacoca.checkpoint.export import export_model_directory
from megacoca.config.recipes import build_config
from megacoca.trainer import Trainer


def _train(rank, world_size, run_dir, ds_name):
    job = build_config(overrides=[f"parallel.deepspeed_config={ds_name}", "schedule.steps=2",
                                  "schedule.global_batch_size=8", "schedule.micro_batch_size=2",
                                  f"logging.run_dir={run_dir}", "logging.tensorboard=false", SHARD_ALL])
    job.model.overrides = TINY.to_dict()
    trainer = Trainer(job, MemoryLoader(2, rank, world_size))
    if "zero3" in ds_name:
        assert_partitioned(trainer.engine.module, world_size)
    trainer.train()
    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        final = {n: p.detach().float().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.close()
    return final


@pytest.mark.parametrize("ds_name", ["zero0_fp32", "zero1_bf16", "zero2_bf16", "zero3_fp32"])
def test_consolidated_matches_trained_parameters(tmp_path, ds_name):
    final = run_ranks(_train, 2, tmp_path, str(tmp_path / "run"), ds_name)[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    state = consolidated_state_dict(str(checkpoints))  # via `latest`
    assert state.keys() == final.keys()
    dtype = torch.bfloat16 if "bf16" in ds_name else torch.float32  # the module holds bf16 copies of fp32 masters
    for name, value in final.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name].to(dtype).float(), value), name
    out = export_model_directory(str(checkpoints / "step00000002"), str(tmp_path / "exported"))  # streamed
    from safetensors.torch import load_file

    written = load_file(os.path.join(out, "model.safetensors"))
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())
