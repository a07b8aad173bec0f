"""The paper's ablations (Table 8b) through the Trainer and DeepSpeed: a contrastive-only (caption weight 0) and
a captioning-only (contrastive weight 0) job run only their objective's modules (the multimodal decoder and
caption head, or the contrastive pooler and projections, get no gradient at all), and still equal one plain
torch process under every optimizer path that meets a parameter without a gradient: DP=2 under ZeRO-0 (the
engine's all-reduce), ZeRO-2 and ZeRO-3 (every tensor partitioned), TP=2 and PP=2 (ZeRO-1). Losses, grad norms
and every parameter after 2 steps, to rtol 1e-4 / atol 1e-5; the dropped loss is logged as null."""

import os

import pytest
from dist_harness import run_ranks
from gather import fp32_master, full_tensors, union_over_stages
from memory_data import SHARD_ALL, TINY, MemoryLoader
from reference import assert_same, reference_run

from megacoca.config.recipes import build_config
from megacoca.metrics.flops import train_flops_per_sample
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

STEPS, GLOBAL, MICRO_BATCHES = 2, 8, 2
WEIGHTS = {"contrastive_only": ("optim.caption_weight=0",), "captioning_only": ("optim.contrastive_weight=0",)}
LAYOUTS = [("zero0_fp32", 1, 1), ("zero0_fp32/2", 1, 1), ("zero3_fp32", 1, 1), ("zero0_fp32/1", 2, 1),
           ("zero0_fp32/1", 1, 2)]  # (DeepSpeed config, tp, pp)
MODEL = TINY.replace(vision_layers=2)


def _job(run_dir, objective, ds_name, micro, tp=1, pp=1):
    ds_name, _, stage = ds_name.partition("/")
    overrides = [f"parallel.deepspeed_config={ds_name}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"schedule.steps={STEPS}", f"schedule.global_batch_size={GLOBAL}",
                 f"schedule.micro_batch_size={micro}", "schedule.warmup_steps=1", "optim.lr=1e-3",
                 "optim.grad_clip=1.0", "optim.weight_decay=0.1", f"logging.run_dir={run_dir}",
                 "logging.tensorboard=false", "logging.log_every=1", "checkpoint.save_final=false", SHARD_ALL,
                 *WEIGHTS[objective]]
    if stage:
        overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={stage}")
    job = build_config(overrides=overrides)
    job.model.overrides = MODEL.to_dict()
    return job


def _train(rank, world_size, tmp, objective, ds_name, tp, pp):
    dp = world_size // (tp * pp)
    micro = GLOBAL // MICRO_BATCHES // dp
    job = _job(os.path.join(tmp, f"{objective}_{ds_name.replace('/', '_')}_{tp}_{pp}"), objective, ds_name, micro,
               tp, pp)
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(micro, dims.dp_rank, dims.dp_size, MODEL), dims=dims)
    module = trainer.engine.module
    assert trainer.flops_per_sample == train_flops_per_sample(MODEL, **trainer.coca_loss.model_kwargs)
    calls = []
    if hasattr(module, "decoder"):  # not on a pipeline's first stage
        skipped = module.decoder if objective == "contrastive_only" else module.image_pooler.contrastive_pooler
        skipped.register_forward_hook(lambda *_: calls.append(1))
    history = trainer.train()
    assert not calls, f"{objective} ran what it drops"
    params = union_over_stages(full_tensors(module, dims, fp32_master), dims)
    trainer.close()
    dropped = "loss_caption" if objective == "contrastive_only" else "loss_contrastive"
    assert all(record[dropped] is None for record in history), history
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history], "params": params}


def _all(rank, world_size, tmp):
    return {(objective, *layout): _train(rank, world_size, tmp, objective, *layout)
            for objective in WEIGHTS for layout in LAYOUTS}


@pytest.mark.timeout(600)
def test_single_objective_jobs_equal_one_process(tmp_path):
    results = run_ranks(_all, 2, tmp_path, str(tmp_path), timeout=560)
    for objective in WEIGHTS:
        job = _job(str(tmp_path / f"ref_{objective}"), objective, "zero0_fp32", GLOBAL // MICRO_BATCHES)
        reference = reference_run(job, MODEL, steps=STEPS, global_batch_size=GLOBAL, accumulation=MICRO_BATCHES)
        assert reference["grad_norm"][0] > 0
        for layout in LAYOUTS:
            for rank_results in results:
                assert_same(rank_results[(objective, *layout)], reference, 1e-4, 1e-5, f"{objective} {layout}")
