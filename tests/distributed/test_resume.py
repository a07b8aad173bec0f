"""Resume for real (ZeRO-3 bf16 with every parameter partitioned) on 2 data-parallel ranks, on 4 ranks with
tensor parallelism (TP=2 x DP=2), and with pipeline parallelism (PP=2 on 2 ranks, PP=2 x DP=2 on 4): a run
resumed from step 3 logs the same losses after step 3 as the uninterrupted run and ends with bit-identical weights;
a checkpoint whose save was interrupted is ignored by `resume auto`; the consolidated fp32 state dict (TP shards
and pipeline stages merged) matches the trained parameters; metrics.jsonl is complete."""

import glob
import json
import os
import shutil

import pytest
import torch
from dist_harness import run_ranks
from gather import fp32_master, full_tensors, module_values, union_over_stages
from memory_data import SHARD_ALL, TINY, MemoryLoader, assert_partitioned

import megacoca
from megacoca.checkpoint import complete_checkpoints, consolidated_state_dict
from megacoca.cli import main as cli
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

STEPS, EVERY = 6, 3


def _run(rank, world_size, run_dir, checkpoint_dir, resume, tp, pp):
    job = build_config(overrides=[
        "parallel.deepspeed_config=zero3_bf16", f"schedule.steps={STEPS}", "schedule.global_batch_size=8",
        "schedule.micro_batch_size=2", "schedule.warmup_steps=2", f"checkpoint.every={EVERY}", "checkpoint.keep=0",
        f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"checkpoint.dir={checkpoint_dir}", f"checkpoint.resume={resume}", f"logging.run_dir={run_dir}",
        "logging.log_every=1", "eval.every=2", SHARD_ALL])
    job.model.overrides = TINY.replace(vision_layers=2).to_dict()
    evals = []

    def eval_fn(model, step):
        evals.append(step)
        return {"probe": float(step)}

    dims = ParallelDims.from_config(job.parallel, world_size).build()
    cfg = job.model_config()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size, cfg), dims=dims, eval_fn=eval_fn)
    module = trainer.engine.module
    assert_partitioned(module, dims.dp_size)
    initial = union_over_stages(full_tensors(module, dims, fp32_master), dims)
    resumed = trainer.resume()
    history = trainer.train()
    final = union_over_stages(module_values(module, dims), dims)
    masters = union_over_stages(full_tensors(module, dims, fp32_master), dims)
    trainer.close()
    return {"resumed": resumed, "steps": [r["step"] for r in history], "loss": [r["loss"] for r in history],
            "parts": [(r["loss_contrastive"], r["loss_caption"]) for r in history], "initial": initial,
            "final": final, "masters": masters, "evals": evals, "position": trainer.train_loader.position}


def _check_positions_agree_over_stages(checkpoint_dir, world, tp, pp):
    """Under a pipeline only stage 0 reads the data; every rank file must still record its data-parallel rank's
    exact position (the ranks of one data-parallel rank, all stages and tensor ranks, hold the same one)."""
    for _, tag_dir in complete_checkpoints(checkpoint_dir):
        files = sorted(glob.glob(os.path.join(tag_dir, "megacoca_rank*.pt")))
        assert len(files) == world, files
        data = [torch.load(path, weights_only=True)["data"] for path in files]
        for rank in range(world):
            first_of_dp_rank = rank - rank % (pp * tp)
            assert data[rank] == data[first_of_dp_rank] and data[rank]["position"] > 0, (tag_dir, rank, data)


FOUR_RANKS = pytest.mark.slow  # the 4-rank layouts (~10 s each): CI runs them (make test); the 2-rank ones are fast


@pytest.mark.parametrize("world, tp, pp", [(2, 1, 1), pytest.param(4, 2, 1, marks=FOUR_RANKS), (2, 1, 2),
                                           pytest.param(4, 1, 2, marks=FOUR_RANKS)],
                         ids=["dp2", "tp2xdp2", "pp2", "pp2xdp2"])
def test_resume_gives_identical_losses(tmp_path, world, tp, pp):
    ckpt_a = str(tmp_path / "a" / "checkpoints")
    full = run_ranks(_run, world, tmp_path, str(tmp_path / "a"), ckpt_a, "auto", tp, pp)
    assert not full[0]["resumed"] and full[0]["steps"] == list(range(1, STEPS + 1))
    assert [step for step, _ in complete_checkpoints(ckpt_a)] == [3, 6]
    assert open(os.path.join(ckpt_a, "latest")).read() == "step00000006"
    _check_positions_agree_over_stages(ckpt_a, world, tp, pp)

    # A crash while saving step 6: its files exist but COMPLETE (written after every rank finished) does not.
    # The resumed run continues in a copy of the whole run directory (logs and checkpoints).
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpt_b = str(tmp_path / "b" / "checkpoints")
    os.remove(os.path.join(ckpt_b, "step00000006", "COMPLETE"))
    with open(os.path.join(ckpt_b, "latest"), "w") as f:
        f.write("step00000003")
    resumed = run_ranks(_run, world, tmp_path, str(tmp_path / "b"), ckpt_b, "auto", tp, pp)

    for rank in range(world):
        assert resumed[rank]["resumed"] and resumed[rank]["steps"] == [4, 5, 6]
        assert resumed[rank]["loss"] == full[rank]["loss"][3:], (resumed[rank]["loss"], full[rank]["loss"])
        assert resumed[rank]["parts"] == full[rank]["parts"][3:]
        assert resumed[rank]["position"] == full[rank]["position"]  # data continued at the right batch
        for name, value in full[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][name], value), name
        assert resumed[rank]["evals"] == [4, 6]
    # The model trained, so the equalities above mean something: the fp32 master weights moved from their
    # initial values by about lr x steps (lr = 0, or an optimizer that never steps, leaves them all equal).
    # Not every tensor: at init the paper-layout pooler's caption tokens are nearly identical, so in bf16 the
    # decoder's cross-attention queries get an exactly zero gradient.
    largest, unchanged = 0.0, []
    for name, value in full[0]["masters"].items():
        if torch.equal(value, full[0]["initial"][name]):
            unchanged.append(name)
        largest = max(largest, (value - full[0]["initial"][name]).abs().max().item())
        assert torch.equal(resumed[0]["masters"][name], value), name
    assert largest > 1e-3 and len(unchanged) < 0.1 * len(full[0]["masters"]), (largest, unchanged)

    # Consolidation (DeepSpeed's zero_to_fp32 merge per tensor-parallel rank, then the TP merge) gives the fp32
    # master weights of the trained model, and `megacoca convert from-deepspeed` writes them as a model directory.
    merged = consolidated_state_dict(ckpt_a)
    assert merged.keys() == full[0]["final"].keys()
    for name, value in full[0]["final"].items():
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name].bfloat16().float(), value, rtol=0, atol=0)
        assert torch.equal(merged[name], full[0]["masters"][name]), name
    assert cli(["convert", "from-deepspeed", "--input", ckpt_a, "--output", str(tmp_path / "exported")]) == 0
    exported = dict(megacoca.load(str(tmp_path / "exported")).named_parameters())
    assert exported.keys() == full[0]["masters"].keys()
    for name, value in full[0]["masters"].items():
        assert torch.equal(exported[name].detach(), value), name

    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "loss_contrastive", "loss_caption", "logit_scale", "lr", "grad_norm",
                "samples_per_s", "tflops_per_device", "mfu", "skipped_samples"):
        assert key in train[-1], key
    assert train[-1]["mfu"] is None  # CPU: no peak in the table
    assert train[-1]["grad_norm"] > 0 and train[-1]["samples_per_s"] > 0
    assert [r["step"] for r in records if "eval/probe" in r] == [2, 4, 6]
    assert os.listdir(tmp_path / "a" / "tensorboard")

    # The resumed run's metrics.jsonl reads like the uninterrupted one: steps 4-6 of the crashed timeline were
    # dropped on resume and logged again, with the same losses.
    again = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in again] == [r["step"] for r in records]
    for first, second in zip(records, again):
        for key in ("loss", "loss_contrastive", "loss_caption", "logit_scale", "lr", "grad_norm", "eval/probe"):
            assert first.get(key) == second.get(key), (key, first, second)
