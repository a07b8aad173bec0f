"""Preemption for real on 2 gloo ranks (ZeRO-3 bf16, every parameter partitioned; and PP=2): SIGUSR1 (or SIGTERM)
reaching ONE rank mid-step makes every rank stop after the same step with a complete checkpoint there, and the
run resumed from it (`resume auto`) logs the same losses and ends with the same weights as a run never
interrupted. The same for a signal at the other moments of a run: while it is built and while it resumes (every
rank stops before its first step, saving nothing) and while a checkpoint is written (the save completes, and is
not repeated). The exit status megacoca.train returns for it is REQUEUE_EXIT_CODE (tests/e2e)."""

import os
import signal

import pytest
import torch
from dist_harness import run_ranks
from gather import module_values, union_over_stages
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.checkpoint import complete_checkpoints
from megacoca.config.recipes import build_config
from megacoca.launch.preemption import PreemptionWatch
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

STEPS = 6


def _run(rank, world_size, run_dir, signal_at, signum, pp, every=0):
    """signal_at: a step (after it), "build" (before the Trainer is built) or "resume" (before it resumes); only
    on rank 1. A signal while a checkpoint is written comes from MEGACOCA_FAULTS (signal_at=rank1@save:...)."""
    preemption = PreemptionWatch().install()  # the first thing, as megacoca.train does
    if signal_at == "build" and rank == 1:
        os.kill(os.getpid(), signum)
    job = build_config(overrides=[
        "parallel.deepspeed_config=zero3_bf16", f"parallel.pp={pp}", f"schedule.steps={STEPS}",
        "schedule.global_batch_size=8", "schedule.micro_batch_size=2", "schedule.warmup_steps=2",
        f"checkpoint.every={every}", "checkpoint.resume=auto", f"logging.run_dir={run_dir}", "logging.log_every=1",
        "logging.tensorboard=false", SHARD_ALL])
    job.model.overrides = TINY.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size), dims=dims)
    trainer.preemption = preemption
    if signal_at == "resume" and rank == 1:
        os.kill(os.getpid(), signum)
    resumed = trainer.resume()
    real_step, real_save, saves = trainer.train_step, trainer.save, []

    def step_then_maybe_signal(batches):
        result = real_step(batches)
        if signal_at is not None and trainer.step == signal_at and rank == 1:
            os.kill(os.getpid(), signum)  # only this rank hears it, in the middle of training
        return result

    def counted_save():
        saves.append(trainer.step)
        return real_save()

    trainer.train_step, trainer.save = step_then_maybe_signal, counted_save
    history = trainer.train()
    preemption.uninstall()
    final = union_over_stages(module_values(trainer.engine.module, dims), dims)
    trainer.close()
    return {"resumed": resumed, "preempted": trainer.preempted, "steps": [r["step"] for r in history],
            "loss": [r["loss"] for r in history], "final": final, "position": trainer.train_loader.position,
            "received": list(preemption.received), "saves": saves}


@pytest.mark.parametrize("signum, pp", [(signal.SIGUSR1, 1), (signal.SIGTERM, 2)], ids=["usr1-dp2", "term-pp2"])
def test_preempted_run_checkpoints_and_resumes_exactly(tmp_path, signum, pp):
    whole = run_ranks(_run, 2, tmp_path, str(tmp_path / "whole"), None, signum, pp)
    stopped = run_ranks(_run, 2, tmp_path, str(tmp_path / "cut"), 3, signum, pp)
    for rank in range(2):
        assert stopped[rank]["preempted"] and stopped[rank]["steps"] == [1, 2, 3]  # both ranks, the same step
        assert stopped[rank]["received"] == ([signal.Signals(signum).name] if rank == 1 else [])
    assert [step for step, _ in complete_checkpoints(str(tmp_path / "cut" / "checkpoints"))] == [3]
    resumed = run_ranks(_run, 2, tmp_path, str(tmp_path / "cut"), None, signum, pp)
    for rank in range(2):
        assert resumed[rank]["resumed"] and not resumed[rank]["preempted"]
        assert resumed[rank]["steps"] == [4, 5, 6]
        assert stopped[rank]["loss"] + resumed[rank]["loss"] == whole[rank]["loss"]
        assert resumed[rank]["position"] == whole[rank]["position"]
        for name, value in whole[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][name], value), name


def test_a_signal_while_building_resuming_or_saving_loses_nothing(tmp_path):
    """Rank 1 alone gets SIGUSR1 while the run is built, then (another run) while a checkpoint is written, then
    (its relaunch) while it resumes: every rank stops (preempted) at the same point each time, the first and the
    last before any step and without saving, the second after the save it was in, without saving twice; the run
    relaunched once more ends like the run never interrupted."""
    usr1 = signal.SIGUSR1
    whole = run_ranks(_run, 2, tmp_path, str(tmp_path / "whole"), None, usr1, 1)
    built = run_ranks(_run, 2, tmp_path, str(tmp_path / "built"), "build", usr1, 1)
    for rank in range(2):
        assert built[rank]["preempted"] and built[rank]["steps"] == [] and built[rank]["saves"] == []
        assert built[rank]["received"] == (["SIGUSR1"] if rank == 1 else [])
    assert not (tmp_path / "built" / "checkpoints").exists() or not os.listdir(tmp_path / "built" / "checkpoints")
    cut = str(tmp_path / "cut")
    saving = run_ranks(_run, 2, tmp_path, cut, None, usr1, 1, 2,
                       env={"MEGACOCA_FAULTS": "signal_at=rank1@save:after_model_states"})
    for rank in range(2):
        assert saving[rank]["preempted"] and saving[rank]["steps"] == [1, 2] and saving[rank]["saves"] == [2]
    assert [step for step, _ in complete_checkpoints(os.path.join(cut, "checkpoints"))] == [2]
    resuming = run_ranks(_run, 2, tmp_path, cut, "resume", usr1, 1)
    for rank in range(2):
        assert resuming[rank]["resumed"] and resuming[rank]["preempted"]
        assert resuming[rank]["steps"] == [] and resuming[rank]["saves"] == []
    assert [step for step, _ in complete_checkpoints(os.path.join(cut, "checkpoints"))] == [2]
    rest = run_ranks(_run, 2, tmp_path, cut, None, usr1, 1)
    for rank in range(2):
        assert rest[rank]["resumed"] and not rest[rank]["preempted"] and rest[rank]["steps"] == [3, 4, 5, 6]
        assert saving[rank]["loss"] + rest[rank]["loss"] == whole[rank]["loss"]
        assert rest[rank]["position"] == whole[rank]["position"]
        for name, value in whole[rank]["final"].items():
            assert torch.equal(rest[rank]["final"][name], value), name
