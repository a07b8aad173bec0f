"""Checkpoints under faults, for real on 2 gloo ranks (ZeRO-1 bf16: DeepSpeed's model file is written by rank 0
alone, each rank writes its optimizer shard); the faults come from MEGACOCA_FAULTS (megacoca.launch.faults).

- SIGKILL at points inside the save of step 4: each killed run leaves that tag without COMPLETE; the next run's
  `resume auto` ignores it, resumes from step 2 and logs the same losses as a run never killed, and its own
  save of step 4 replaces the partial one. After the last kill the run completes with the uninterrupted run's
  weights, bit for bit. A kill after COMPLETE makes step 4 the one resumed (a kill while pruning:
  tests/unit/checkpoint/test_save_faults.py).
- A full disk: ENOSPC injected on one rank while DeepSpeed writes its optimizer shard, and (where this process
  may mount a filesystem) a real tmpfs too small for the second checkpoint, then the same tmpfs read-only. Every
  rank stops with the same one-line CheckpointError naming the rank and the cause, the partial tag is removed,
  the previous checkpoint stays complete, and the run resumed from it ends as the run without the fault did.
- A checkpoint file whose pickle would run code: resume refuses it on every rank, one line naming the file,
  before DeepSpeed reads anything; the code never runs.
"""

import json
import os
import shutil
import subprocess

import pytest
import torch
from dist_harness import run_ranks
from gather import fp32_master, full_tensors
from memory_data import TINY, MemoryLoader
from needs import skip_or_fail

from megacoca.checkpoint import CheckpointError, complete_checkpoints
from megacoca.checkpoint.tags import incomplete_checkpoints, tag_for
from megacoca.config.recipes import build_config
from megacoca.parallel.dims import ParallelDims
from megacoca.trainer import Trainer

STEPS, EVERY = 4, 2


def _run(rank, world_size, run_dir, keep, checkpoint_dir=""):
    job = build_config(overrides=[f"checkpoint.dir={checkpoint_dir}",
        "parallel.deepspeed_config=zero1_bf16", f"schedule.steps={STEPS}", "schedule.global_batch_size=8",
        "schedule.micro_batch_size=2", "schedule.warmup_steps=2", f"checkpoint.every={EVERY}",
        f"checkpoint.keep={keep}", "checkpoint.resume=auto", f"logging.run_dir={run_dir}", "logging.log_every=1",
        "logging.tensorboard=false"])
    job.model.overrides = TINY.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size), dims=dims)
    said, info = [], trainer.logger.info
    trainer.logger.info = lambda line: (said.append(line), info(line))
    error = resumed = None
    try:
        resumed = trainer.step if trainer.resume() else None
        trainer.train()
    except CheckpointError as exc:
        error = (type(exc).__name__, str(exc))
    masters = full_tensors(trainer.engine.module, dims, fp32_master)
    trainer.close()
    return {"resumed": resumed, "steps": [r["step"] for r in trainer.history],
            "loss": [r["loss"] for r in trainer.history], "masters": masters, "error": error, "said": said}


def _records(run_dir) -> dict:
    """{step: loss} of metrics.jsonl (written line by line: what a killed run logged survives it)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _start_from_step2(reference, run_dir):
    """A copy of the reference run as it was after its step-2 save."""
    shutil.copytree(reference, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", tag_for(4)))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(tag_for(2))


def _assert_same_as(result, whole, resumed_at=2):
    for rank in range(2):
        assert result[rank]["error"] is None and result[rank]["resumed"] == resumed_at
        assert result[rank]["steps"] == list(range(resumed_at + 1, STEPS + 1))
        assert result[rank]["loss"] == whole[rank]["loss"][resumed_at:]
        for name, value in whole[rank]["masters"].items():
            assert torch.equal(result[rank]["masters"][name], value), name


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run without faults: steps 1-4, complete checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("whole")
    result = run_ranks(_run, 2, root, str(root / "run"), 0)
    assert [s for s, _ in complete_checkpoints(str(root / "run" / "checkpoints"))] == [2, 4]
    return str(root / "run"), result


# A kill in each phase of the save of step 4, with the file that shows the save was under way when it came.
KILLS = [
    ("save:after_model_states", "mp_rank_00_model_states.pt"),  # rank 0 dies; rank 1's barrier fails
    ("rank1@save:after_optim_states", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # rank 1 alone
    ("save:after_rank_file", "megacoca_rank00001.pt"),  # both, every file but COMPLETE written
    ("save:before_complete", "megacoca_rank00000.pt"),  # rank 0, after the ranks agreed
]


def test_killed_saves_are_never_resumed_and_lose_nothing(tmp_path, whole):
    reference, full = whole
    expected = _records(reference)
    run_dir = str(tmp_path / "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    _start_from_step2(reference, run_dir)
    for kill_at, written in KILLS:
        with pytest.raises(AssertionError) as info:  # the harness reports the dead rank(s)
            run_ranks(_run, 2, tmp_path, run_dir, 0, timeout=120, env={"MEGACOCA_FAULTS": f"kill_at={kill_at}"})
        died = str(info.value)  # killed ranks exit with -9; a survivor's next collective finds its peer gone
        assert "exit codes [-9, -9]" in died or "by peer" in died.splitlines()[-1], (kill_at, died[-500:])
        # Resumed from step 2 (the previous kill's partial step 4 ignored), it trained steps 3-4 exactly as the
        # run without faults did, and died while saving step 4.
        assert {s: v for s, v in _records(run_dir).items() if s > 2} == {3: expected[3], 4: expected[4]}, kill_at
        assert [s for s, _ in complete_checkpoints(checkpoints)] == [2], kill_at
        assert [s for s, _ in incomplete_checkpoints(checkpoints)] == [4], kill_at
        assert os.path.isfile(os.path.join(checkpoints, tag_for(4), written)), kill_at
        assert open(os.path.join(checkpoints, "latest")).read() == tag_for(2)
    result = run_ranks(_run, 2, tmp_path, run_dir, 0)
    _assert_same_as(result, full)
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [2, 4] and not incomplete_checkpoints(checkpoints)


def test_killed_after_complete_resumes_that_checkpoint(tmp_path, whole):
    """Killed once COMPLETE is written but before `latest` is updated and old checkpoints pruned: step 4 is
    complete, and it is what `resume auto` loads (COMPLETE decides, not `latest`)."""
    reference, full = whole
    run_dir = str(tmp_path / "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    _start_from_step2(reference, run_dir)
    with pytest.raises(AssertionError, match="by peer"):  # rank 0 killed, rank 1 waiting for it
        run_ranks(_run, 2, tmp_path, run_dir, 1, timeout=120, env={"MEGACOCA_FAULTS": "kill_at=save:after_complete"})
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [2, 4]  # keep=1, but the kill came before pruning
    assert open(os.path.join(checkpoints, "latest")).read() == tag_for(2)
    _assert_same_as(run_ranks(_run, 2, tmp_path, run_dir, 1), full, resumed_at=4)


@pytest.mark.parametrize("cut", ["megacoca_rank00001.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_file_cut_short_after_complete_falls_back_to_the_previous_checkpoint(tmp_path, whole, cut):
    """What a power loss can leave when nothing is fsynced: COMPLETE on disk, a file it vouches for cut short.
    `resume auto` finds it in verification, says so in one line, resumes from the previous complete checkpoint
    and ends as the run without the fault did (its own save of step 4 replaces the broken one)."""
    reference, full = whole
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    broken = os.path.join(run_dir, "checkpoints", tag_for(4), cut)
    size = os.path.getsize(broken)
    with open(broken, "r+b") as handle:
        handle.truncate(size // 2)
    result = run_ranks(_run, 2, tmp_path, run_dir, 0)
    _assert_same_as(result, full, resumed_at=2)
    fallback = [line for line in result[0]["said"] if "fails verification" in line]
    assert len(fallback) == 1 and tag_for(4) in fallback[0] and cut in fallback[0] and tag_for(2) in fallback[0]
    assert os.path.getsize(broken) > size // 2  # saved again, whole


def test_a_named_checkpoint_that_fails_verification_is_refused_not_replaced(tmp_path, whole):
    reference, _ = whole
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    broken = os.path.join(run_dir, "checkpoints", tag_for(4), "megacoca_rank00000.pt")
    open(broken, "w").close()  # empty: COMPLETE survived, the file did not

    with pytest.raises(AssertionError, match="megacoca_rank00000.pt"):
        run_ranks(_run_named, 2, tmp_path, run_dir, os.path.join(run_dir, "checkpoints", tag_for(4)))


def _run_named(rank, world_size, run_dir, tag_dir):
    job = build_config(overrides=["parallel.deepspeed_config=zero1_bf16", f"schedule.steps={STEPS}",
                                  "schedule.global_batch_size=8", "schedule.micro_batch_size=2",
                                  f"checkpoint.resume={tag_dir}", f"logging.run_dir={run_dir}",
                                  "logging.tensorboard=false"])
    job.model.overrides = TINY.to_dict()
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size), dims=dims)
    try:
        trainer.resume()
    finally:
        trainer.close()


def test_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path, whole):
    reference, full = whole
    run_dir = str(tmp_path / "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    _start_from_step2(reference, run_dir)
    failed = run_ranks(_run, 2, tmp_path, run_dir, 0,
                       env={"MEGACOCA_FAULTS": "enospc_at=rank1@save:after_optim_states"})
    for rank in range(2):
        kind, message = failed[rank]["error"]
        assert kind == "CheckpointError" and message == failed[0]["error"][1] and "\n" not in message
        assert message.startswith("checkpoint save of step 4 failed on rank 1: No space left on device")
        assert message.endswith("the previous complete checkpoint (step 2) is intact")
        assert failed[rank]["loss"] == full[rank]["loss"][2:]  # it trained steps 3-4 before the save
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [2] and not incomplete_checkpoints(checkpoints)
    _assert_same_as(run_ranks(_run, 2, tmp_path, run_dir, 0), full)


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {' '.join(done.stderr.decode().split())}",
                     "run it as root: sudo make test (CI does)")


def test_real_full_then_read_only_filesystem(tmp_path, whole):
    """On a tmpfs with room for one checkpoint only, the save of step 4 meets a real ENOSPC; remounted read-only,
    the next run resumes from step 2 (intact and loadable) and its save meets EROFS. Both end on every rank with
    one line; the losses before the failed save are the run's without faults."""
    reference, full = whole
    step2 = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(reference, "checkpoints",
                                                                                          tag_for(2))) for f in fs)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        run_dir, checkpoints = str(tmp_path / "run"), str(disk / "checkpoints")
        _start_from_step2(reference, run_dir)
        shutil.move(os.path.join(run_dir, "checkpoints"), checkpoints)  # the logs stay writable
        fs = os.statvfs(disk)  # shrink it to what is there now plus half a checkpoint
        used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + step2 // 2}", str(disk)], check=True)
        for cause in ("No space left on device", "Read-only file system"):
            result = run_ranks(_run, 2, tmp_path, run_dir, 0, checkpoints)
            for rank in range(2):
                kind, message = result[rank]["error"]
                assert kind == "CheckpointError" and "\n" not in message, message
                assert message.startswith("checkpoint save of step 4 failed on rank ") and cause in message, message
                assert result[rank]["loss"] == full[rank]["loss"][2:]
            assert [s for s, _ in complete_checkpoints(checkpoints)] == [2]
            if cause.startswith("No space"):
                assert not incomplete_checkpoints(checkpoints)  # removed: the space is free again
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


class RunsCode:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_file_that_would_run_code(tmp_path, whole):
    reference, _ = whole
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    marker = tmp_path / "code_ran"
    evil = os.path.join(run_dir, "checkpoints", tag_for(4), "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": RunsCode(marker)}, evil)
    result = run_ranks(_run, 2, tmp_path, run_dir, 0)
    for rank in range(2):
        kind, message = result[rank]["error"]
        assert kind == "UnsafeCheckpointError" and "\n" not in message
        assert message.startswith(f"resume from {os.path.dirname(evil)}: refused to load {evil}: it holds posix.system")
        assert result[rank]["resumed"] is None and result[rank]["steps"] == []
    assert not marker.exists()


def _run_recording_fsyncs(rank, world_size, run_dir):
    """A 2-step run saving at step 2, with every fsync and the COMPLETE / `latest` writes recorded in order."""
    import megacoca.checkpoint.state as state

    events = []
    real_fsync, real_write_text = os.fsync, state._write_text

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def write_text(path, text):
        events.append(("write", os.path.basename(path)))
        real_write_text(path, text)

    os.fsync, state._write_text = fsync, write_text
    try:
        job = build_config(overrides=["parallel.deepspeed_config=zero1_bf16", "schedule.steps=2",
                                      "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
                                      "checkpoint.every=2", f"logging.run_dir={run_dir}", "logging.tensorboard=false"])
        job.model.overrides = TINY.to_dict()
        dims = ParallelDims.from_config(job.parallel, world_size).build()
        trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size), dims=dims)
        trainer.train()
        trainer.close()
    finally:
        os.fsync, state._write_text = real_fsync, real_write_text
    return events


def test_every_file_is_on_the_device_before_complete_vouches_for_it(tmp_path):
    """Rank 0's view of a save on 2 ranks: each file it wrote (DeepSpeed's and its own), the tag directory and the
    checkpoint directory are fsynced before COMPLETE is written; COMPLETE and `latest` are fsynced themselves (as
    their temporary files, before the rename) with their directory after."""
    run_dir = str(tmp_path / "run")
    events = run_ranks(_run_recording_fsyncs, 2, tmp_path, run_dir)[0]
    tag_dir = os.path.realpath(os.path.join(run_dir, "checkpoints", tag_for(2)))
    complete = events.index(("write", "COMPLETE"))
    synced_before = {path for kind, path in events[:complete] if kind == "fsync"}
    written_by_rank0 = {os.path.join(tag_dir, name) for name in ("mp_rank_00_model_states.pt",
                                                                 "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                 "megacoca_rank00000.pt.tmp")}  # synced, renamed
    assert written_by_rank0 | {tag_dir, os.path.dirname(tag_dir)} <= synced_before
    after = [path for kind, path in events[complete:] if kind == "fsync"]
    assert after[:2] == [os.path.join(tag_dir, "COMPLETE.tmp"), tag_dir]
    assert after[2:4] == [os.path.join(os.path.dirname(tag_dir), "latest.tmp"), os.path.dirname(tag_dir)]
