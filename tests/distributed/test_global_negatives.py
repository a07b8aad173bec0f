"""`loss.negatives: global` against the one process that runs the whole global batch as one micro-batch.

Whatever the layout (accumulation 4 on one rank, DP=2 under ZeRO-3, TP=2, PP=2 with text-ahead, PP=2 x DP=2 and
TP=2 x DP=2 on 4 ranks), each image is scored against every text of the global batch: the losses, grad norms and
every parameter after 3 steps equal the reference's (tests/distributed/reference.py with accumulation 1) to fp32
reduction-order tolerance, and pass 2 recomputes pass 1's embeddings bit for bit (`negatives_replay_error` 0). With
dropout planted in the towers (the model has none of its own), the two passes still draw the same masks.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from gather import fp32_master, full_tensors, union_over_stages
from memory_data import SHARD_ALL, TINY, MemoryLoader
from reference import assert_same, reference_run

from megacoca.config.recipes import build_config
from megacoca.models.coca.layers import MLP
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

STEPS, GLOBAL = 3, 16
CFG = TINY.replace(vision_layers=2)


def _job(run_dir, ds_name, *, micro, tp=1, pp=1, text_ahead=-1):
    ds_name, _, stage = ds_name.partition("/")
    overrides = [
        f"parallel.deepspeed_config={ds_name}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.text_ahead={text_ahead}", "loss.negatives=global", f"schedule.steps={STEPS}",
        f"schedule.global_batch_size={GLOBAL}", f"schedule.micro_batch_size={micro}", "schedule.warmup_steps=1",
        "optim.lr=1e-3", "optim.grad_clip=1.0", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "logging.log_every=1", "checkpoint.save_final=false", SHARD_ALL]
    if stage:
        overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={stage}")
    job = build_config(overrides=overrides)
    job.model.overrides = CFG.to_dict()
    return job


def _dropout_in_every_mlp(p: float = 0.2):
    """Dropout after every MLP (all three towers): randomness in the forward that both passes must draw alike."""
    forward = MLP.forward

    def with_dropout(self, x):
        return F.dropout(forward(self, x), p, training=self.training)

    MLP.forward = with_dropout
    return forward


def _train(rank, world_size, tmp, variant):
    name, ds_name, micro, tp, pp = variant[:5]
    dropout = "dropout" in variant[5:]
    job = _job(os.path.join(tmp, name), ds_name, micro=micro, tp=tp, pp=pp)
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    original = _dropout_in_every_mlp() if dropout else None
    try:
        trainer = Trainer(job, MemoryLoader(micro, dims.dp_rank, dims.dp_size, CFG), dims=dims)
        history = trainer.train()
        module = trainer.engine.module
        params = union_over_stages(full_tensors(module, dims, fp32_master), dims)
        trainer.close()
    finally:
        if original is not None:
            MLP.forward = original
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history], "params": params,
            "replay": [r["negatives_replay_error"] for r in history], "micro_batches": trainer.grad_accum}


def _all(rank, world_size, tmp, variants):
    return {variant[0]: _train(rank, world_size, tmp, variant) for variant in variants}


def _check(results, tmp_path, variants):
    job = _job(str(tmp_path / "ref"), "zero0_fp32", micro=GLOBAL)
    reference = reference_run(job, CFG, steps=STEPS, global_batch_size=GLOBAL, accumulation=1)
    for variant in variants:
        name = variant[0]
        for rank_results in results:
            run = rank_results[name]
            assert run["micro_batches"] > 1, name  # an accumulation, a pipeline or dp: the micro case is not global
            assert run["replay"] == [0.0] * STEPS, (name, run["replay"])
            if "dropout" not in variant[5:]:
                assert_same(run, reference, 1e-4, 1e-5, f"global negatives {name}")


ONE = [("accum4-zero0", "zero0_fp32", 4, 1, 1), ("accum4-zero3-dropout", "zero3_fp32", 4, 1, 1, "dropout")]
TWO = [("dp2-zero3-accum2", "zero3_fp32", 4, 1, 1), ("tp2-zero1-accum4", "zero0_fp32/1", 4, 2, 1),
       ("pp2-zero1-accum4", "zero0_fp32/1", 4, 1, 2), ("pp2-zero3-dropout", "zero3_fp32", 4, 1, 2, "dropout")]
FOUR = [("pp2-dp2-zero1", "zero0_fp32/1", 4, 1, 2), ("tp2-dp2-zero3", "zero3_fp32", 4, 2, 1)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world, variants", [(1, ONE), (2, TWO), (4, FOUR)], ids=["1rank", "2ranks", "4ranks"])
def test_global_negatives_equal_one_micro_batch_of_the_whole_batch(tmp_path, world, variants):
    results = run_ranks(_all, world, tmp_path, str(tmp_path), variants, timeout=560)
    _check(results, tmp_path, variants)


def test_micro_and_global_agree_without_accumulation(tmp_path):
    """One micro-batch per step on one rank: the global batch is the micro-batch, so both settings compute the same
    loss (global negatives through the cached gradients): equal to fp32 tolerance."""
    results = run_ranks(_micro_and_global, 1, tmp_path, str(tmp_path))
    micro, global_ = results[0]
    assert_same(global_, micro, 1e-5, 1e-6, "global vs micro, one micro-batch")


def _micro_and_global(rank, world_size, tmp):
    out = []
    for negatives in ("micro", "global"):
        job = _job(os.path.join(tmp, negatives), "zero0_fp32", micro=GLOBAL)
        job.loss.negatives = negatives
        dims = ParallelDims.from_config(job.parallel, world_size).build()
        trainer = Trainer(job, MemoryLoader(GLOBAL, dims.dp_rank, dims.dp_size, CFG), dims=dims)
        history = trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        trainer.close()
        out.append({"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
                    "params": params})
    return out


def test_global_needs_the_contrastive_loss():
    from megacoca.config.overrides import ConfigError

    with pytest.raises(ConfigError, match="loss.negatives=global needs the contrastive loss"):
        build_config(overrides=["loss.negatives=global", "optim.contrastive_weight=0"])


def test_planted_dropout_changes_the_loss():
    """The dropout the tests plant really draws (so the replay check above is not vacuous)."""
    torch.manual_seed(0)
    original = _dropout_in_every_mlp()
    try:
        mlp = MLP(8, 16).train()
        x = torch.randn(4, 8)
        assert not torch.equal(mlp(x), mlp(x))
    finally:
        MLP.forward = original
