"""Hung ranks and stragglers for real, on 2 gloo ranks training a tiny CoCa (ZeRO-1 bf16) with the rendezvous
store served from rank 0's process (a TCPStore, as under the deepspeed launcher's env:// rendezvous; its port
handed over in a file, so no port is guessed).

- MEGACOCA_FAULTS stall=rankR@4 SIGSTOPs rank R as step 4 begins. The other rank, blocked in the step's
  collectives, ends itself with exit status STALL_EXIT_CODE within fault.watchdog_timeout_s plus a few
  heartbeats (what a launcher turns into the end of the job: tests/e2e), and its one stderr line names the
  stalled rank: from the heartbeats when rank 1 stopped, from the store that no longer answers when rank 0
  (the store's host) did. Nothing waits for the collective timeout.
- slow=rank1@SECONDS delays every input batch of rank 1: rank 0's records name rank 1 as the straggler; without
  the fault no record names one.
"""

import json
import os
import time
from datetime import timedelta

import pytest
from dist_harness import _context
from memory_data import TINY, MemoryLoader

from megacoca.launch.watchdog import STALL_EXIT_CODE

TIMEOUT_S = 3.0
STALL_AT = 4


def _rank_main(rank, world_size, tmp, env, extra=()):
    err = os.open(os.path.join(tmp, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 1)
    os.dup2(err, 2)
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")
    import torch
    import torch.distributed as dist

    from megacoca.config.recipes import build_config
    from megacoca.parallel.dims import ParallelDims
    from megacoca.trainer import Trainer

    torch.set_num_threads(1)
    port_file = os.path.join(tmp, "port")
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=timedelta(seconds=60),
                              wait_for_workers=False)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(store.port))
        os.replace(port_file + ".tmp", port_file)
    else:
        while not os.path.exists(port_file):
            time.sleep(0.05)
        store = dist.TCPStore("127.0.0.1", int(open(port_file).read()), world_size, False,
                              timeout=timedelta(seconds=60))
    job = build_config(overrides=[
        "parallel.deepspeed_config=zero1_bf16", "schedule.steps=8", "schedule.global_batch_size=8",
        "schedule.micro_batch_size=4", "schedule.warmup_steps=2", "checkpoint.save_final=false",
        f"logging.run_dir={tmp}/run", "logging.log_every=1", "logging.tensorboard=false",
        f"fault.watchdog_timeout_s={TIMEOUT_S}", "fault.collective_timeout_s=60", *extra])
    job.model.overrides = TINY.to_dict()
    timeout = timedelta(seconds=job.fault.collective_timeout_s)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    dims = ParallelDims.from_config(job.parallel, world_size).build(timeout=timeout)
    # an eval that waits for every rank, as the real one does (the ranks evaluate in lockstep)
    eval_fn = (lambda engine, step: (dist.barrier(), {"done": 1.0})[1]) if job.eval.every else None
    Trainer(job, MemoryLoader(4, dims.dp_rank, dims.dp_size), dims=dims, eval_fn=eval_fn).train()
    os._exit(0)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("stalled, faults", [pytest.param(1, "slow=rank1@0.4", id="rank1"),
                                             pytest.param(0, "", id="rank0-store-host", marks=pytest.mark.slow)])
def test_stalled_rank_ends_the_job_and_is_named(tmp_path, stalled, faults):
    env = {"MEGACOCA_FAULTS": ";".join(filter(None, [faults, f"stall=rank{stalled}@{STALL_AT}"])),
           "OMP_NUM_THREADS": "1"}
    ctx = _context()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, str(tmp_path), env)) for rank in range(2)]
    for proc in procs:
        proc.start()
    healthy = procs[1 - stalled]
    try:
        deadline = time.monotonic() + 180
        while not _stopped(procs[stalled].pid):
            assert time.monotonic() < deadline and healthy.is_alive(), _logs(tmp_path)
            time.sleep(0.02)
        stopped_at = time.monotonic()
        healthy.join(timeout=TIMEOUT_S + 30)
        detected_s = time.monotonic() - stopped_at
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL ends a stopped process too
            proc.join()
    assert healthy.exitcode == STALL_EXIT_CODE, _logs(tmp_path)
    assert TIMEOUT_S <= detected_s <= TIMEOUT_S + 5, detected_s
    lines = [line for line in _logs(tmp_path, 1 - stalled).splitlines() if "megacoca watchdog:" in line]
    assert len(lines) == 1, _logs(tmp_path)
    line = lines[0]
    assert f"rank {1 - stalled} " in line and f"in step {STALL_AT} " in line, line
    assert f"stalled: rank {stalled} (" in line, line
    assert ("no heartbeat" if stalled == 1 else "does not answer") in line, line
    assert f"stops itself (SIGSTOP) as step {STALL_AT} begins" in _logs(tmp_path, stalled)
    print(f"stalled rank {stalled}: detected {detected_s:.1f} s after SIGSTOP (watchdog_timeout_s={TIMEOUT_S}): "
          f"{line}")

    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in records] == list(range(1, STALL_AT))
    if faults:  # rank 1 waits 0.4 s more for each batch: named from step 2 on (step 1 is the warm-up)
        assert [r["straggler"]["rank"] for r in records[1:]] == [1] * (STALL_AT - 2), records
        assert all(r["straggler"]["step_s"] > 1.5 * r["straggler"]["median_s"] for r in records[1:])
        print("stragglers:", [r["straggler"] for r in records])
    else:
        assert not any("straggler" in r for r in records), records


def _logs(tmp_path, rank=None) -> str:
    ranks = [rank] if rank is not None else [0, 1]
    return "\n".join(open(tmp_path / f"rank{r}.log").read() for r in ranks if (tmp_path / f"rank{r}.log").exists())


# (the phase, the fault that stops rank 1 in it, its timeout key, the step the line names)
# (~4.5 s each: the first-step case is in make test-fast, the eval and save cases in make test)
PHASE_STALLS = [
    pytest.param("first step", "stall=rank1@1", "fault.first_step_timeout_s", 1, id="first_step"),
    pytest.param("eval", "stall_at=rank1@eval:begin", "fault.eval_timeout_s", 2, id="eval", marks=pytest.mark.slow),
    pytest.param("save", "stall_at=rank1@save:begin", "fault.save_timeout_s", 2, id="save", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("phase, fault, key, step", PHASE_STALLS)
def test_a_rank_stalled_in_a_phase_is_named_and_ends_the_job(tmp_path, phase, fault, key, step):
    """Rank 1 stops in the first step, in an evaluation, in a save: rank 0 ends itself with STALL_EXIT_CODE within
    that phase's own timeout plus a few heartbeats, and its one line names the phase and rank 1."""
    extra = [f"{key}={TIMEOUT_S}", "eval.every=2", "checkpoint.every=2"]
    env = {"MEGACOCA_FAULTS": fault, "OMP_NUM_THREADS": "1"}
    ctx = _context()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, str(tmp_path), env, extra)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 180
        while not _stopped(procs[1].pid):
            assert time.monotonic() < deadline and procs[0].is_alive(), _logs(tmp_path)
            time.sleep(0.02)
        stopped_at = time.monotonic()
        procs[0].join(timeout=TIMEOUT_S + 30)
        detected_s = time.monotonic() - stopped_at
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    assert procs[0].exitcode == STALL_EXIT_CODE, _logs(tmp_path)
    assert TIMEOUT_S <= detected_s <= TIMEOUT_S + 10, detected_s
    lines = [line for line in _logs(tmp_path, 0).splitlines() if "megacoca watchdog:" in line]
    assert len(lines) == 1, _logs(tmp_path)
    assert f"made no progress in {phase} (step {step}) for " in lines[0] and f"({key}={TIMEOUT_S:g})" in lines[0]
    assert "stalled: rank 1 (" in lines[0], lines[0]
    print(f"{phase}: detected {detected_s:.1f} s after SIGSTOP: {lines[0]}")
