"""DeepSpeed's own checkpoint tools on megacoca's checkpoints, run as a user runs them (subprocesses), after two
training steps on 2 ranks of a CoCa whose vocabulary (65) tensor parallelism pads (to 66 at TP=2):
- `zero_to_fp32.py`, which DeepSpeed writes beside the tags of a ZeRO-1/2/3 checkpoint directory (dp=2, TP=PP=1),
  gives megacoca's own consolidation exactly; a ZeRO-0 checkpoint gets no script (its model-states file already
  holds the whole fp32 module), and at TP=2 the script refuses (it knows one model-parallel rank);
- `ds_to_universal` on a TP=2 ZeRO-1 checkpoint (megacoca's UNIVERSAL_CHECKPOINT_INFO: row-parallel, vocabulary,
  replicated patterns) writes, per single-device parameter, the consolidated master weight (vocabulary padding
  stripped) and Adam's moments as megacoca's full_state reads them;
- DeepSpeed's universal loader (`checkpoint.load_universal`) restores that at TP=1 (dp=2), and the universal form
  of a TP=1 (dp=2) checkpoint at TP=2 (the vocabulary padded again, row-parallel weights cut along dim 1), both at
  ZeRO-1: weights, moments and Adam's step equal the source's exactly (read back through megacoca's own save), and
  a third step trains with a finite loss. Megacoca's resume does not read a universal checkpoint (no COMPLETE
  marker, no rank files), so the test calls the engine's loader.
DeepSpeed's converters read with `torch.load(weights_only=False)`: these are the test's own files."""

import math
import os
import subprocess
import sys

import pytest
import torch
from dist_harness import run_ranks
from memory_data import SHARD_ALL, TINY, MemoryLoader

from megacoca.checkpoint.consolidate import consolidated_state_dict
from megacoca.checkpoint.files import safe_load
from megacoca.checkpoint.full_state import KINDS, adam_step, iter_full_state
from megacoca.checkpoint.tags import tag_for
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

pytestmark = pytest.mark.slow  # DeepSpeed's own tools on a trained checkpoint (~25 s): CI runs them (make test)

CFG = TINY.replace(vocab_size=65)
TAG = tag_for(2)
# run: (DeepSpeed config, ZeRO stage override, tp); 2 ranks each, dp = 2 / tp
RUNS = {"zero0": ("zero0_fp32", None, 1), "zero1": ("zero0_fp32", 1, 1), "zero2": ("zero0_fp32", 2, 1),
        "zero3": ("zero3_fp32", None, 1), "zero1_tp2": ("zero0_fp32", 1, 2)}


def _job(run_dir, ds_name, stage, tp, world_size, steps=2, extra=()):
    overrides = [f"parallel.deepspeed_config={ds_name}", f"parallel.tp={tp}", f"schedule.steps={steps}",
                 "schedule.global_batch_size=8", f"schedule.micro_batch_size={8 * tp // world_size}",
                 "schedule.warmup_steps=1", "optim.lr=1e-3", "optim.grad_clip=1.0", f"logging.run_dir={run_dir}",
                 "logging.tensorboard=false", SHARD_ALL, *extra]
    if stage is not None:
        overrides.append(f"parallel.deepspeed_overrides.zero_optimization.stage={stage}")
    job = build_config(overrides=overrides)
    job.model.overrides = CFG.to_dict()
    return job


def _train(rank, world_size, tmp):
    for run, (ds_name, stage, tp) in RUNS.items():
        job = _job(os.path.join(tmp, run), ds_name, stage, tp, world_size)
        dims = ParallelDims.from_config(job.parallel, world_size).build()
        trainer = Trainer(job, MemoryLoader(job.schedule.micro_batch_size, dims.dp_rank, dims.dp_size, CFG), dims=dims)
        trainer.train()
        trainer.close()


LOADS = {"tp1_from_tp2": ("zero1_tp2", 1), "tp2_from_tp1": ("zero1", 2)}  # run: (universal source, tp)


def _load_universal(rank, world_size, tmp):
    """Each universal checkpoint through DeepSpeed's universal loader at ZeRO-1 under another tensor-parallel
    degree; megacoca's save of the loaded state (step 2), then a third step. Returns the module's weights at TP=1."""
    out = {}
    for run, (source, tp) in LOADS.items():
        job = _job(os.path.join(tmp, run), "zero0_fp32", 1, tp, world_size, steps=3,
                   extra=["parallel.deepspeed_overrides.checkpoint.load_universal=true"])
        dims = ParallelDims.from_config(job.parallel, world_size).build()
        loader = MemoryLoader(job.schedule.micro_batch_size, dims.dp_rank, dims.dp_size, CFG)
        trainer = Trainer(job, loader, dims=dims)
        load_path, client_state = trainer.engine.load_checkpoint(os.path.join(tmp, source, "universal"), tag=TAG)
        assert load_path is not None
        weights = {name: param.detach().clone() for name, param in trainer.engine.module.named_parameters()}
        trainer.step = loader.position = client_state["step"]
        trainer.save()
        losses = [record["loss"] for record in trainer.train()]
        trainer.close()
        out[run] = (weights if tp == 1 else None, losses)
    return out


def _start(*args):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc) -> str:
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited with {proc.returncode}:\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The runs' directory, and zero_to_fp32's (exit status, output) at TP=2: the runs' checkpoints, then (in
    parallel) zero_to_fp32 on ZeRO-1/2/3 and TP=2, ds_to_universal on both ZeRO-1 runs, the way a user runs them;
    each spends most of its time importing torch and DeepSpeed."""
    tmp_path = tmp_path_factory.mktemp("deepspeed_tools")
    run_ranks(_train, 2, tmp_path, str(tmp_path))
    procs = [_start(str(tmp_path / run / "checkpoints" / "zero_to_fp32.py"), str(tmp_path / run / "checkpoints"),
                    str(tmp_path / run / "fp32"), "--safe_serialization")
             for run in ("zero1", "zero2", "zero3", "zero1_tp2")]
    procs += [_start("-m", "deepspeed.checkpoint.ds_to_universal",
                     "--input_folder", str(tmp_path / run / "checkpoints" / TAG),
                     "--output_folder", str(tmp_path / run / "universal" / TAG),
                     "--num_extract_workers", "1", "--num_merge_workers", "1") for run in ("zero1_tp2", "zero1")]
    refused = procs.pop(3)
    for proc in procs:
        _finish(proc)
    output, _ = refused.communicate(timeout=120)
    return tmp_path, (refused.returncode, output)


def test_zero_to_fp32_equals_megacoca_consolidation(trained):
    from safetensors.torch import load_file

    trained, (returncode, output) = trained
    # at TP=2 it refuses (it reads one model-parallel rank, and counts more optimizer files than dp ranks)
    assert returncode != 0 and "Expected 1 of '*_optim_states.pt'" in output, output[-2000:]
    assert not (trained / "zero1_tp2" / "fp32").exists()
    assert not (trained / "zero0" / "checkpoints" / "zero_to_fp32.py").exists()  # ZeRO-0: nothing to merge
    for run in ("zero1", "zero2", "zero3"):
        theirs = load_file(str(trained / run / "fp32" / "model.safetensors"))
        ours = consolidated_state_dict(str(trained / run / "checkpoints"))
        assert theirs.keys() == ours.keys(), run
        for name, tensor in ours.items():
            assert torch.equal(theirs[name], tensor), (run, name)


def test_ds_to_universal_at_tp2_writes_the_single_device_state(trained):
    """Per parameter: the consolidated fp32 weight (the vocabulary unpadded), full_state's moments, Adam's step."""
    trained = trained[0]
    checkpoints = str(trained / "zero1_tp2" / "checkpoints")
    consolidated, full = consolidated_state_dict(checkpoints), dict(iter_full_state(checkpoints))
    zero = trained / "zero1_tp2" / "universal" / TAG / "zero"
    assert sorted(os.listdir(zero)) == sorted([*consolidated, "optimizer_state.pt"])
    for name, tensor in consolidated.items():
        assert torch.equal(safe_load(str(zero / name / "fp32.pt"))["param"], tensor), name
        for kind in KINDS[1:]:
            assert torch.equal(safe_load(str(zero / name / f"{kind}.pt"))["param"], full[name][kind]), (name, kind)
        assert int(safe_load(str(zero / name / "step.pt"))) == 2, name
    assert safe_load(str(zero / "caption_head.weight" / "fp32.pt"))["param"].shape[0] == CFG.vocab_size


def test_universal_checkpoint_loads_under_another_tensor_parallel_degree(trained):
    """TP=2 loaded at TP=1 (dp=2), TP=1 (dp=2) at TP=2 (dp=1, the vocabulary padded again): the source's state
    exactly (weights, moments, Adam's step), then a step trains."""
    trained = trained[0]
    results = run_ranks(_load_universal, 2, trained, str(trained))[0]
    consolidated = consolidated_state_dict(str(trained / "zero1_tp2" / "checkpoints"))
    weights = results["tp1_from_tp2"][0]
    assert weights.keys() == consolidated.keys()
    for name, tensor in consolidated.items():
        assert torch.equal(weights[name], tensor), name
    for run, (source, _) in LOADS.items():
        full = dict(iter_full_state(str(trained / source / "checkpoints")))
        loaded = str(trained / run / "checkpoints" / TAG)
        reloaded = dict(iter_full_state(loaded))
        assert reloaded.keys() == full.keys(), run
        for name, kinds in full.items():
            for kind in KINDS:
                assert torch.equal(reloaded[name][kind], kinds[kind]), (run, name, kind)
        assert adam_step(loaded) == 2, run
        losses = results[run][1]
        assert len(losses) == 1 and math.isfinite(losses[0]), run
