"""A three-source data mixture through the trainer on 2 gloo ranks, 2 loader workers each (megacoca.data.mixture):
killed with SIGKILL at a random step (seeded, printed) and resumed with `checkpoint.resume=auto`, it sees the same
batches and logs the same losses as the run never killed, bit for bit; resumed on 1 rank (a dp 2 -> 1 re-split), it
(and from 2 workers to none) reads every sample of every source's started epoch that the 2 ranks had not read, once,
none twice.

Sources: two caption sources (synth-shapes train shards, split in two) and a label source (synth-shapes val shards,
the class id in a JSON field, rendered through templates)."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist
from dist_harness import run_ranks
from memory_data import TINY

from megacoca.config.recipes import build_config

STEPS, EVERY = 6, 2
# ~70 s in all (4 two-rank runs with loader workers, a one-rank resume, a pipeline): CI runs them (make test); the
# mixture's order, resume and re-split are in the fast set at the loader's level (tests/unit/data/test_mixture.py)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megacoca.data.shapes import CLASS_NAMES

    root = tmp_path_factory.mktemp("mixture")
    subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", str(root), "--train-samples",
                    "48", "--val-samples", "12", "--image-size", "32", "--shard-size", "3", "--workers", "1"],
                   check=True, capture_output=True)
    for name, shards in (("cap_a", range(0, 4)), ("cap_b", range(4, 8))):  # 3 samples a shard
        os.makedirs(root / name)
        for shard in shards:
            shutil.copy(root / "train" / f"{shard:05d}.tar", root / name / f"{shard:05d}.tar")
    (root / "names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (root / "templates.txt").write_text("a photo of a {c}\na {} on a noisy background\nthere is a {c}\n")
    return root


def _sources(root) -> str:
    return json.dumps([
        {"name": "cap_a", "shards": str(root / "cap_a"), "weight": 0.4},
        {"name": "cap_b", "shards": str(root / "cap_b"), "weight": 0.3},
        {"name": "labels", "shards": str(root / "val"), "weight": 0.3, "text": "labels", "label_field": "class",
         "class_names": str(root / "names.txt"), "templates": str(root / "templates.txt")}])


class _Recorded:
    """The loader, with each batch's keys appended to a per-rank file as it is consumed (what a killed run saw)."""

    def __init__(self, loader, path):
        self.loader, self.path = loader, path

    def __iter__(self):
        for batch in self.loader:
            with open(self.path, "a") as log:
                log.write(json.dumps({"keys": batch["keys"], "sources": batch["sources"]}) + "\n")
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _run(rank, world_size, root, run_dir, resume, workers=2, pp=1, steps=STEPS):
    from megacoca.cli.train import resolve_model_to_tokenizer
    from megacoca.data import load_tokenizer
    from megacoca.data.loaders import build_train_loader
    from megacoca.parallel.dims import ParallelDims
    from megacoca.trainer import Trainer

    job = build_config(overrides=[
        f"data.sources={_sources(root)}", f"data.num_workers={workers}", "parallel.deepspeed_config=zero1_bf16",
        f"schedule.steps={steps}", f"parallel.pp={pp}", "schedule.global_batch_size=8", "schedule.micro_batch_size=2",
        "schedule.warmup_steps=1", f"checkpoint.every={EVERY}", "checkpoint.keep=0", f"checkpoint.resume={resume}",
        f"logging.run_dir={run_dir}", "logging.log_every=1", "logging.tensorboard=false", "eval.every=0"])
    job.model.overrides = {**TINY.to_dict(), "context_length": 16}
    tokenizer = load_tokenizer(job.data.tokenizer, job.model_config().context_length)
    model_cfg = resolve_model_to_tokenizer(job, tokenizer)
    dims = ParallelDims(-1, 1, pp, dist.get_world_size()).build()
    loader = build_train_loader(job, model_cfg, dims, tokenizer)
    if pp == 1:
        loader = _Recorded(loader, os.path.join(run_dir, f"keys{rank}"))
    trainer = Trainer(job, loader, dims=dims)
    resumed = trainer.step if trainer.resume() else 0
    history = trainer.train()
    trainer.close()
    return {"resumed": resumed, "loss": {r["step"]: r["loss"] for r in history},
            "fields": {k: v for k, v in history[-1].items() if k.startswith("data/")},
            "data": trainer.train_loader.state_dict()}


def _keys(run_dir, rank):
    with open(os.path.join(run_dir, f"keys{rank}")) as log:
        return [json.loads(line) for line in log]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("whole")
    results = run_ranks(_run, 2, tmp, data, str(tmp / "run"), "none")
    return tmp / "run", results


def test_killed_at_a_random_step_resumes_bit_for_bit(tmp_path, data, whole):
    run_whole, reference = whole
    kill_step = random.Random(os.environ.get("MEGACOCA_TEST_SEED", "27")).randint(EVERY + 1, STEPS)
    print(f"killing rank 1 as step {kill_step} begins (MEGACOCA_TEST_SEED picks another)")
    run_dir = str(tmp_path / "run")
    with pytest.raises(AssertionError):
        run_ranks(_run, 2, tmp_path, data, run_dir, "none", timeout=120,
                  env={"MEGACOCA_FAULTS": f"kill=rank1@{kill_step}"})
    resumed = run_ranks(_run, 2, tmp_path, data, run_dir, "auto")
    last_saved = (kill_step - 1) // EVERY * EVERY
    per_step = 2  # micro-batches per rank per step: global batch 8 = micro 2 x dp 2 x accumulation 2
    for rank in range(2):
        assert resumed[rank]["resumed"] == last_saved
        assert resumed[rank]["loss"] == {s: v for s, v in reference[rank]["loss"].items() if s > last_saved}
        assert resumed[rank]["data"] == reference[rank]["data"]
        assert resumed[rank]["fields"] == reference[rank]["fields"]
        seen = _keys(run_dir, rank)
        assert seen[-(STEPS - last_saved) * per_step:] == _keys(run_whole, rank)[last_saved * per_step:], rank
    fields = reference[0]["fields"]
    assert sum(fields[f"data/{n}/samples"] for n in ("cap_a", "cap_b", "labels")) == STEPS * 8
    assert fields["data/labels/samples"] == pytest.approx(0.3 * STEPS * 8, abs=2)
    assert fields["data/cap_a/epochs"] >= 0 and fields["data/labels/skipped"] == 0


def test_resume_on_one_rank_reads_every_unread_sample_once(tmp_path, data, whole):
    run_whole, _ = whole
    run_dir = tmp_path / "run"
    # at step 2 every source's streams are still in their first epoch (about 6 of 12 samples taken over 4 streams)
    shutil.copytree(run_whole / "checkpoints" / "step00000002", run_dir / "checkpoints" / "step00000002")
    # one reader (no workers): it reads every source's leftovers of epoch 0 before its epoch 1, so the first epoch
    # is the first `size` samples read (with 2 streams one could start epoch 1 while the other reads leftovers)
    run_ranks(_run, 1, tmp_path, data, str(run_dir), "auto", 0)
    before = [b for rank in range(2) for b in _keys(run_whole, rank)[:2 * 2]]  # steps 1-2: 2 micro-batches each
    after = _keys(run_dir, 0)
    sizes = {"cap_a": 12, "cap_b": 12, "labels": 12}  # about 19, 14 and 14 of 48 samples taken: each finishes one
    order = {name: [] for name in sizes}
    for batch in before + after:
        for key, name in zip(batch["keys"], batch["sources"]):
            order[name].append(key)
    for name, size in sizes.items():
        assert len(order[name]) >= size, name
        assert len(set(order[name][:size])) == size, name  # the first epoch: every sample once


def test_a_pipeline_keeps_the_mixture_position_on_every_stage(tmp_path, data):
    """pp=2: stage 0 reads the mixture, stage 1 holds a MixtureMirror; each checkpoint's rank files both hold stage
    0's exact position (a resume of either rank lands where the reading rank was)."""
    results = run_ranks(_run, 2, tmp_path, data, str(tmp_path / "run"), "none", 0, 2, 2)
    assert results[0]["data"]["kind"] == "mixture"
    assert results[1]["data"] == results[0]["data"]
    assert results[0]["data"]["batches"] == 2 * 4  # 2 steps of 4 micro-batches on the one data-parallel rank
