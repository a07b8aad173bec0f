"""A checkpoint's full training state read without its layout (megacoca.checkpoint.full_state): after two steps on
2 ranks, the masters and Adam moments read per parameter from a ZeRO-0 fp32 checkpoint (dp=2) equal the live torch
optimizer's, bit for bit; a ZeRO-3 checkpoint (dp=2) of the same training equals it to reduction-order
tolerance; and a ZeRO-0 checkpoint at TP=2 and a ZeRO-1 one at PP=2 (dp=1: two micro-batches of 4, so their
contrastive negatives differ from dp=2's) equal each other. Adam's step is 2 in each."""

import os

import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.checkpoint.full_state import KINDS, adam_step, iter_full_state
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

CFG = TINY.replace(vision_layers=2)
RUNS = {"zero0_dp2": ("zero0_fp32", 1, 1, None), "zero3_dp2": ("zero3_fp32", 1, 1, None),
        "zero0_tp2": ("zero0_fp32", 1, 2, None), "zero1_pp2": ("zero0_fp32", 2, 1, 1)}


def _train(rank, world_size, tmp):
    live = {}
    for run, (ds_name, pp, tp, stage) in RUNS.items():
        overrides = [f"parallel.deepspeed_config={ds_name}", f"parallel.pp={pp}", f"parallel.tp={tp}",
                     "schedule.steps=2", "schedule.global_batch_size=8", "schedule.micro_batch_size=4",
                     "schedule.warmup_steps=1", "optim.lr=1e-3", "optim.grad_clip=1.0",
                     f"logging.run_dir={os.path.join(tmp, run)}", "logging.tensorboard=false", SHARD_ALL]
        if stage is not None:
            overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={stage}")
        job = build_config(overrides=overrides)
        job.model.overrides = CFG.to_dict()
        dims = ParallelDims.from_config(job.parallel, world_size).build()
        trainer = Trainer(job, MemoryLoader(4, dims.dp_rank, dims.dp_size, CFG), dims=dims)
        trainer.train()
        if run == "zero0_dp2" and rank == 0:
            optimizer = trainer.engine.optimizer
            for name, param in trainer.engine.module.named_parameters():
                state = optimizer.state[param]
                live[name] = {"fp32": param.detach().clone(), "exp_avg": state["exp_avg"].clone(),
                              "exp_avg_sq": state["exp_avg_sq"].clone()}
        trainer.close()
    return live


def test_full_state_is_the_same_under_every_layout(tmp_path):
    live = run_ranks(_train, 2, tmp_path, str(tmp_path))[0]
    states = {run: dict(iter_full_state(str(tmp_path / run / "checkpoints"))) for run in RUNS}
    reference = states["zero0_dp2"]
    assert reference.keys() == live.keys()
    for name, kinds in reference.items():
        for kind in KINDS:
            assert torch.equal(kinds[kind], live[name][kind]), (name, kind)
    scales = {run: {kind: max(float(kinds[kind].abs().max()) for kinds in state.values()) for kind in KINDS}
              for run, state in states.items()}
    for run, against in (("zero3_dp2", "zero0_dp2"), ("zero1_pp2", "zero0_tp2")):
        assert states[run].keys() == reference.keys() == states[against].keys(), run
        for name, kinds in states[run].items():
            other = states[against][name]
            # fp32 reduction-order noise, against the model-wide scale of each moment (some gradients are ~0 by
            # construction, e.g. an attention key's bias, and their moments are pure noise); a misplaced slice
            # or a wrong partition would be off by the moment's own size
            for kind in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(kinds[kind], other[kind], rtol=1e-3, atol=1e-6 * scales[against][kind],
                                           msg=f"{run} {name} {kind}")
            # Adam moves a weight by about lr per step whatever its gradient's size: where the gradient is ~0 (or
            # small against its own history, or against eps) the reduction order can flip the update's sign.
            # Elsewhere the masters agree closely.
            settled = (other["exp_avg"].abs() > 0.05 * other["exp_avg_sq"].sqrt()) & (other["exp_avg_sq"].sqrt() > 1e-5)
            torch.testing.assert_close(kinds["fp32"][settled], other["fp32"][settled], rtol=1e-4, atol=1e-6,
                                       msg=f"{run} {name} fp32")  # atol: 1e-3 of one update (lr 1e-3)
            assert (kinds["fp32"] - other["fp32"]).abs().max() <= 2 * 2 * 1e-3, (run, name)
    for run in RUNS:
        assert adam_step(str(tmp_path / run / "checkpoints")) == 2, run
