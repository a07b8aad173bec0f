"""Resume with the real data path (synth-shapes shards, ShardLoader, CLIP BPE tokenizer) as `megacoca.train` wires
it, on 2 ranks: the data position saved in each rank's client state makes the resumed run see the same batches,
so its losses after the checkpoint equal the uninterrupted run's."""

import subprocess
import sys

import pytest
import torch.distributed as dist
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, assert_partitioned

from megacoca.config.recipes import build_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", str(root), "--train-samples",
                    "48", "--val-samples", "8", "--image-size", "32", "--shard-size", "12", "--workers", "1"],
                   check=True, capture_output=True)
    return str(root / "train")


def _run(rank, world_size, shards, run_dir, resume):
    from megacoca.data import load_tokenizer
    from megacoca.parallel.dims import ParallelDims
    from megacoca.cli.train import resolve_model_to_tokenizer
    from megacoca.data.loaders import build_train_loader
    from megacoca.trainer import Trainer

    job = build_config(overrides=[
        f"data.train_shards={shards}", "parallel.deepspeed_config=zero3_bf16", "schedule.steps=4",
        "schedule.global_batch_size=8", "schedule.micro_batch_size=2", "schedule.warmup_steps=1",
        "checkpoint.every=2", f"checkpoint.resume={resume}", f"logging.run_dir={run_dir}", "logging.log_every=1",
        "logging.tensorboard=false", "eval.every=0", SHARD_ALL])
    job.model.overrides = {**TINY.to_dict(), "context_length": 16}
    tokenizer = load_tokenizer(job.data.tokenizer, job.model_config().context_length)
    model_cfg = resolve_model_to_tokenizer(job, tokenizer)
    dims = ParallelDims(-1, 1, 1, dist.get_world_size()).build()
    trainer = Trainer(job, build_train_loader(job, model_cfg, dims, tokenizer), dims=dims)
    assert_partitioned(trainer.engine.module, world_size)
    trainer.resume()
    history = trainer.train()
    trainer.close()
    return {"steps": [r["step"] for r in history], "loss": [r["loss"] for r in history],
            "data": trainer.train_loader.state_dict()}


def test_resume_with_shard_loader(tmp_path, shards):
    import shutil

    full = run_ranks(_run, 2, tmp_path, shards, str(tmp_path / "a"), "none")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step00000002", tmp_path / "b" / "checkpoints" / "step00000002")
    resumed = run_ranks(_run, 2, tmp_path, shards, str(tmp_path / "b"), "auto")
    for rank in range(2):
        assert resumed[rank]["steps"] == [3, 4]
        assert resumed[rank]["loss"] == full[rank]["loss"][2:]
        assert resumed[rank]["data"] == full[rank]["data"]
    assert full[0]["data"] != full[1]["data"]  # the ranks read different shards
