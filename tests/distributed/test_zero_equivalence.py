"""Two optimizer steps on 2 ranks under ZeRO-0 and ZeRO-3 (every parameter partitioned) equal one plain-torch
process (AdamW with the same groups, clipping and lr schedule): losses, grad norms and parameters. The same
holds with gradient accumulation (against a one-process run that accumulates the same micro-batches) and with
per-block activation checkpointing under ZeRO-3. bf16 runs (ZeRO-1 and ZeRO-3) track the fp32 one-process run
to bf16 tolerance: losses, grad norms, and the update each fp32 master weight received."""

import os

import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader, assert_partitioned
from reference import assert_same, assert_tracks_in_bf16, reference_run

from megacoca.config.recipes import build_config
from megacoca.trainer import Trainer

STEPS, GLOBAL, DP = 2, 8, 2


def _job(run_dir, ds_name, micro, checkpointing=False):
    job = build_config(overrides=[f"parallel.activation_checkpointing={checkpointing}",
        f"parallel.deepspeed_config={ds_name}", f"schedule.steps={STEPS}", f"schedule.global_batch_size={GLOBAL}",
        f"schedule.micro_batch_size={micro}", "schedule.warmup_steps=1", "optim.lr=1e-3", "optim.grad_clip=1.0",
        f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.log_every=1", "checkpoint.save_final=false",
        SHARD_ALL])
    job.model.overrides = TINY.to_dict()
    return job


def _masters(module):
    """fp32 master weights as the optimizer holds them (gathered from every ZeRO partition); under ZeRO-0 fp32
    the module's parameters are the masters (DeepSpeed returns None for them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param)
        masters[name] = (param if master is None else master).detach().float().clone()
    return masters


def _train(rank, world_size, tmp, ds_name, micro, checkpointing=False):
    job = _job(os.path.join(tmp, f"{ds_name}_{micro}_{checkpointing}"), ds_name, micro, checkpointing)
    trainer = Trainer(job, MemoryLoader(micro, rank, world_size))
    if "zero3" in ds_name:
        assert_partitioned(trainer.engine.module, world_size)
    expected = torch.bfloat16 if "bf16" in ds_name else torch.float32
    assert {p.dtype for p in trainer.engine.module.parameters()} == {expected}  # the precision the config asks
    history = trainer.train()
    params = _masters(trainer.engine.module)
    trainer.close()
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history], "params": params}


def _all_variants(rank, world_size, tmp):
    runs = {(name, micro): _train(rank, world_size, tmp, name, micro)
            for name, micro in (("zero0_fp32", 4), ("zero3_fp32", 4), ("zero0_fp32", 2), ("zero3_fp32", 2))}
    runs["checkpointed"] = _train(rank, world_size, tmp, "zero3_fp32", 4, checkpointing=True)
    for name in ("zero1_bf16", "zero3_bf16"):
        runs[name] = _train(rank, world_size, tmp, name, 2)
    return runs


def _reference(tmp, accumulation: int):
    return reference_run(_job(tmp, "zero0_fp32", GLOBAL // DP // accumulation), TINY, steps=STEPS,
                         global_batch_size=GLOBAL, accumulation=accumulation)


def test_zero3_equals_zero0_equals_one_process(tmp_path):
    results = run_ranks(_all_variants, DP, tmp_path, str(tmp_path))
    reference = _reference(str(tmp_path / "ref"), accumulation=1)
    accumulated = _reference(str(tmp_path / "ref_accum"), accumulation=2)
    assert reference["grad_norm"][0] > 1.0  # clipping was active
    assert reference["loss"] != accumulated["loss"]  # fewer contrastive negatives per micro-batch: another run
    for rank_result in results:
        assert_same(rank_result[("zero0_fp32", 4)], reference, 1e-4, 1e-5, "zero0 vs one process")
        assert_same(rank_result[("zero3_fp32", 4)], reference, 1e-4, 1e-5, "zero3 vs one process")
        assert_same(rank_result[("zero0_fp32", 2)], accumulated, 1e-4, 1e-5, "zero0, accumulation 2, vs one process")
        assert_same(rank_result[("zero3_fp32", 2)], accumulated, 1e-4, 1e-5, "zero3, accumulation 2, vs one process")
        assert_same(rank_result["checkpointed"], reference, 1e-4, 1e-5, "zero3 + activation checkpointing")
        for name in ("zero1_bf16", "zero3_bf16"):
            assert_tracks_in_bf16(rank_result[name], accumulated, name)
