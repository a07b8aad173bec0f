"""The step guard on 2 gloo ranks: a step whose loss is NaN (on one rank only), whose gradients are NaN with a
finite loss, or whose loss spikes is skipped on every rank alike, for the client optimizer DeepSpeed steps as is
(ZeRO-0 fp32), DeepSpeed's ZeRO-1, ZeRO-2 and ZeRO-3 optimizers (bf16 and fp32; ZeRO-2 fp32 also with gradient
clipping off: DeepSpeed still computes the gradient norm it judges an fp32 step by), a 2-stage pipeline (ZeRO-0
fp32 and ZeRO-1 bf16) and 2-way tensor parallelism: the fp32 master weights, the optimizer state and the lr
schedule after the skipped step are those before it, bit for bit, every good step has a finite gradient norm, and
the train record says why. Too many skipped steps in a row save a complete checkpoint of that state and stop every
rank with one line; through the CLI, exit status 65."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.step_guard import BadStepsError
from megacoca.trainer import Trainer

# step 2: rank 1's loss is NaN; step 3: rank 1's loss is +inf (its gradients stay finite: the guard must make
# them NaN); step 4: every gradient NaN, the loss finite; step 6: the loss x 1000 (a spike)
FAULTS = "nan_loss=rank1@2;inf_loss=rank1@3;nan_grad=4;loss_scale=6:1000"
EXPECTED = {2: "non-finite loss", 3: "non-finite loss", 4: "non-finite gradient norm", 6: "loss spike"}
STEPS = 7


def _job(run_dir, ds_name, *, pp=1, tp=1, steps=STEPS, extra=()):
    job = build_config(overrides=[
        f"parallel.deepspeed_config={ds_name}", f"parallel.pp={pp}", f"parallel.tp={tp}", f"schedule.steps={steps}",
        "schedule.global_batch_size=8", "schedule.micro_batch_size=4", "schedule.warmup_steps=1",
        "optim.lr=1e-3", "optim.grad_clip=1.0", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "logging.log_every=100", "checkpoint.save_final=false", "fault.loss_spike_factor=3",
        "fault.loss_spike_window=2", SHARD_ALL, *extra])
    job.model.overrides = TINY.replace(vision_layers=2).to_dict()
    return job


def _state(trainer):
    """fp32 masters (every ZeRO partition gathered), this rank's optimizer state (DeepSpeed's ZeRO optimizers keep
    their torch optimizer's state on flat partitions: each rank compares its own), the lr schedule's position."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in trainer.engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        masters[name] = (param if master is None else master).detach().float().clone()
    optimizer = trainer.engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # the client torch optimizer itself under ZeRO-0 fp32
    moments = {(i, key): value.detach().float().clone() for i, state in enumerate(inner.state.values())
               for key, value in state.items() if torch.is_tensor(value)}
    return masters, moments, trainer.scheduler.last_epoch


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _guarded_run(rank, world_size, tmp, ds_name, pp, tp, extra):
    os.environ["MEGACOCA_FAULTS"] = FAULTS
    job = _job(tmp, ds_name, pp=pp, tp=tp, extra=extra)
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(4, dims.dp_rank, dims.dp_size, TINY.replace(vision_layers=2)), dims=dims)
    batches = trainer._batches()
    report = []
    for _ in range(STEPS):
        masters, moments, position = _state(trainer)
        result = trainer.train_step(batches)
        after_masters, after_moments, after_position = _state(trainer)
        grad_norm = None if result["grad_norm"] is None else float(result["grad_norm"])
        report.append({"step": trainer.step, "skipped": result["skipped"], "moments": len(moments),
                       "grad_norm": grad_norm,
                       "masters_same": _same(masters, after_masters), "moments_same": _same(moments, after_moments),
                       "lr_advanced": after_position - position})
    trainer.close()
    del os.environ["MEGACOCA_FAULTS"]
    return report


STAGE = "parallel.deepspeed_overrides.zero_optimization.stage={}"  # ds_configs/ has no ZeRO-1/2 fp32 file
LAYOUTS = {  # id: (DeepSpeed config, pp, tp, more overrides)
    "zero0_fp32": ("zero0_fp32", 1, 1, ()),
    "zero1_bf16": ("zero1_bf16", 1, 1, ()),
    "zero2_bf16": ("zero2_bf16", 1, 1, ()),
    "zero3_bf16": ("zero3_bf16", 1, 1, ()),
    "zero1_fp32": ("zero0_fp32", 1, 1, (STAGE.format(1),)),
    "zero2_fp32-noclip": ("zero0_fp32", 1, 1, (STAGE.format(2), "optim.grad_clip=0")),
    "zero3_fp32": ("zero3_fp32", 1, 1, ()),
    "zero1_bf16-pp2": ("zero1_bf16", 2, 1, ()),
    "zero0_fp32-pp2": ("zero0_fp32", 2, 1, ()),
    "zero3_bf16-tp2": ("zero3_bf16", 1, 2, ()),
}


SLOW_LAYOUTS = {"zero2_bf16", "zero1_fp32", "zero2_fp32-noclip"}  # ~3 s each: make test runs them, not test-fast


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LAYOUTS else name
                                    for name in LAYOUTS])
def test_bad_steps_are_skipped_on_every_rank_with_nothing_changed(tmp_path, layout):
    reports = run_ranks(_guarded_run, 2, tmp_path, str(tmp_path), *LAYOUTS[layout])
    for report in reports:  # every rank (both stages, both tensor-parallel halves) the same
        for entry in report:
            step, reason = entry["step"], EXPECTED.get(entry["step"])
            assert entry["skipped"] == reason, entry
            assert entry["moments"] > 0 or step == 1
            if reason:
                assert entry["masters_same"] and entry["moments_same"] and entry["lr_advanced"] == 0, entry
            else:
                assert not entry["masters_same"] and not entry["moments_same"] and entry["lr_advanced"] == 1, entry
                assert entry["grad_norm"] is not None and math.isfinite(entry["grad_norm"]), entry


def _stopping_run(rank, world_size, tmp):
    os.environ["MEGACOCA_FAULTS"] = "nan_loss=3,4"
    job = _job(os.path.join(tmp, "stop"), "zero3_fp32", steps=6, extra=("fault.max_bad_steps=2",
                                                                        "fault.loss_spike_factor=0"))
    trainer = Trainer(job, MemoryLoader(4, rank, world_size, TINY.replace(vision_layers=2)))
    with pytest.raises(BadStepsError) as raised:
        trainer.train()
    trainer.close()
    del os.environ["MEGACOCA_FAULTS"]
    return {"message": str(raised.value), "records": trainer.history}


def test_too_many_bad_steps_save_the_last_good_state_and_stop(tmp_path):
    results = run_ranks(_stopping_run, 2, tmp_path, str(tmp_path))
    message = results[0]["message"]
    assert message == results[1]["message"]
    checkpoint = tmp_path / "stop" / "checkpoints" / "step00000004"
    assert message == (f"2 optimizer steps in a row skipped (steps 3-4: non-finite loss; fault.max_bad_steps=2); "
                       f"saved the last good state (weights of step 2) as {checkpoint}; stopping")
    assert (checkpoint / "COMPLETE").is_file()
    records = results[0]["records"]
    assert [r["step"] for r in records] == [3, 4] and all(r["skipped_step"] for r in records)


def test_cli_exits_65_with_one_line(tmp_path):
    """One rank through `python -m megacoca.train`: the run stops at the second bad step in a row."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))
    from tiny_run import make_tiny_run

    make_tiny_run(tmp_path)
    env = dict(os.environ, MEGACOCA_FAULTS="nan_loss=2,3", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "megacoca.train", "--config", str(tmp_path / "tiny.yaml"),
                          "--train-shards", str(tmp_path / "shapes" / "train"), "--run-dir", str(tmp_path / "run"),
                          "--steps", "5", "--set", "fault.max_bad_steps=2"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 65, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "megacoca train: error: 2 optimizer steps in a row skipped (steps 2-3: non-finite loss; "
        "fault.max_bad_steps=2); saved the last good state (weights of step 1) as "
        f"{tmp_path / 'run' / 'checkpoints' / 'step00000003'}; stopping")
    assert "SKIPPED: non-finite loss" in run.stdout
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert [(r["step"], r.get("skipped_step", False)) for r in records] == [(1, False), (2, True), (3, True)]
