"""megacoca.launch.watchdog and megacoca.metrics.stragglers without a process group: when the watchdog fires
(never in the first step, in eval or saves, or while paused), how its line names the rank at fault from the
heartbeats in a store, the straggler arithmetic, and the fault and config syntax they read. The 2-rank runs
with a real SIGSTOP: tests/distributed/test_watchdog_stall.py."""

import threading
import time

import pytest
import torch.distributed as dist

from megacoca.config.recipes import build_config
from megacoca.config.train import ConfigError
from megacoca.launch import faults
from megacoca.launch.watchdog import KEY, STALL_EXIT_CODE, StepWatchdog, where
from megacoca.metrics.stragglers import InputTimer, find_straggler


class Exits:
    """An exit_fn that records instead of ending pytest."""

    def __init__(self):
        self.codes = []
        self.done = threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.done.set()


def _watchdog(timeout_s=0.3, **kwargs):
    exits = Exits()
    return StepWatchdog(timeout_s, exit_fn=exits, stream=open("/dev/null", "w"), **kwargs), exits


def test_fires_only_in_an_armed_step_after_the_first():
    watchdog, exits = _watchdog()
    with watchdog:
        watchdog.begin_step(1)  # the first step of the process (compilation, first gathers): not timed
        assert not exits.done.wait(0.6)
        watchdog.end_step()
        watchdog.begin_step(2)
        watchdog.end_step()
        assert not exits.done.wait(0.6)  # between steps: eval, a checkpoint save
        watchdog.begin_step(3)
        with watchdog.paused():  # a save from inside a step
            assert not exits.done.wait(0.6)
        started = time.monotonic()
        assert exits.done.wait(2.0)
        assert 0.25 <= time.monotonic() - started < 1.5
    assert exits.codes == [STALL_EXIT_CODE]
    assert watchdog.fired.startswith("megacoca watchdog: rank 0 (") and "in step 3 for " in watchdog.fired
    assert "waiting in wait (" in watchdog.fired and "\n" not in watchdog.fired


def test_off_at_zero_timeout():
    watchdog, exits = _watchdog(timeout_s=0)
    with watchdog:
        watchdog.begin_step(1)
        watchdog.begin_step(2)
        assert not watchdog._threads and not exits.done.wait(0.3)


COLLECTIVE = "all_gather (torch/distributed/distributed_c10d.py:1)"


def _publish(store, rank, beat, step, place=COLLECTIVE):
    store.set(KEY.format(rank=rank), f"{beat} {step} 1 {place}")


def _beating(store, rank, step, place=COLLECTIVE):
    stop = threading.Event()

    def beat():
        count = 0
        while not stop.wait(0.02):
            count += 1
            _publish(store, rank, count, step, place)

    threading.Thread(target=beat, daemon=True).start()
    return stop


@pytest.mark.parametrize("case, expected", [
    ("silent", "stalled: rank 1 (no heartbeat for"),
    ("behind", "stalled: rank 2 (still at step 3)"),
    ("busy", "stalled: rank 1 (outside any collective while this rank waits in one: rank 1 in read (megacoca/"),
    ("all_alive", "every other rank is alive at step 4; no single rank is behind"),
])
def test_names_the_rank_at_fault_from_the_heartbeats(case, expected):
    store = dist.HashStore()
    watchdog, _ = _watchdog(timeout_s=0.5, rank=0, world_size=3, store=store)
    watchdog.step = 4
    steps = {"behind": {1: 4, 2: 3}}.get(case, {1: 4, 2: 4})
    place = "read (megacoca/data/shards.py:99)" if case == "busy" else COLLECTIVE
    stops = [_beating(store, 2, steps[2])]
    if case == "silent":
        _publish(store, 1, 7, 4)  # one beat, then nothing: a stopped process
    else:
        stops.append(_beating(store, 1, steps[1], place))
    if case == "busy":  # the watch thread reports while this (main) thread waits in a collective
        _publish(store, 0, 1, 4)
        namespace = {"time": time}
        exec(compile("def all_gather(result):\n    while not result:\n        time.sleep(0.01)\n",
                     "/venv/site-packages/torch/distributed/distributed_c10d.py", "exec"), namespace)
        result = []
        threading.Thread(target=lambda: result.append(watchdog._culprit()), daemon=True).start()
        namespace["all_gather"](result)
        line = result[0]
    else:
        line = watchdog.diagnose(3.0)
    for stop in stops:
        stop.set()
    assert expected in line, line


class DeadStore:
    """A store whose server is stopped: every call blocks."""

    def check(self, keys):
        threading.Event().wait()

    def set(self, key, value):
        threading.Event().wait()


def test_a_store_that_does_not_answer_names_rank_0_when_it_serves_the_store():
    watchdog, _ = _watchdog(timeout_s=0.5, rank=1, world_size=2, store=DeadStore(), store_on_rank0=True)
    watchdog.probe_s = 0.2
    line = watchdog.diagnose(3.0)
    assert "stalled: rank 0 (the c10d store, served from rank 0's process, does not answer" in line
    watchdog, _ = _watchdog(timeout_s=0.5, rank=1, world_size=2, store=DeadStore(), store_on_rank0=False)
    watchdog.probe_s = 0.2
    assert "the c10d store does not answer: the stalled rank cannot be told" in watchdog.diagnose(3.0)


def test_where_names_the_innermost_and_the_megacoca_frame():
    namespace = {"where": where, "sys": __import__("sys")}
    exec(compile("def wait():\n    return where(sys._getframe())\n", "/venv/lib/site-packages/torch/distributed/"
                 "distributed_c10d.py", "exec"), namespace)
    exec(compile("def _reduce(f):\n    return f()\n", "/src/megacoca/megacoca/trainer.py", "exec"), namespace)
    assert namespace["_reduce"](namespace["wait"]) == ("wait (torch/distributed/distributed_c10d.py:2) <- "
                                                      "_reduce (megacoca/trainer.py:2)")


# ---------------------------------------------------------------------------------------------- stragglers


def test_find_straggler():
    # rank 1 waits 0.4 s for input on a 0.5 s step: without it the step would take 0.1 s + its own wait
    assert find_straggler([0.01, 0.4], 0.5, 1.5) == {"rank": 1, "step_s": 0.5, "median_s": 0.11, "input_s": 0.4}
    assert find_straggler([0.01, 0.02, 0.01, 0.3], 0.4, 1.5)["rank"] == 3
    assert find_straggler([0.01, 0.03], 0.5, 1.5) is None  # jitter of a few ms: no straggler
    assert find_straggler([0.01, 0.4], 0.5, 0) is None  # off
    assert find_straggler([0.4], 0.5, 1.5) is None  # one rank
    assert find_straggler([0.0, 0.0], 0.0, 1.5) is None


def test_input_timer_counts_and_delays():
    timer = InputTimer(iter(range(3)), delay_s=0.05)
    assert list(timer) == [0, 1, 2]
    assert 0.15 <= timer.seconds < 0.5


# ------------------------------------------------------------------------------------------ fault, config


def test_stall_and_slow_faults(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(faults.ENV, "stall=rank1@4,rank0@2;slow=rank1@0.25,rank0@1")
    assert faults.at_step("stall", 4) == 1.0 and faults.at_step("stall", 2) is None
    assert faults.slow_s() == 0.25
    for bad in ("slow=rank1@x", "slow=rank1@-1", "slow=node1@1", "stall=rank1@x"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)


@pytest.mark.parametrize("override, message", [
    ("fault.collective_timeout_s=0", "fault.collective_timeout_s must be > 0 seconds"),
    ("fault.watchdog_timeout_s=-1", "fault.watchdog_timeout_s must be >= 0 (0: off) and below"),
    ("fault.watchdog_timeout_s=1800", "below fault.collective_timeout_s 1800"),
    ("fault.straggler_factor=1", "fault.straggler_factor must be 0 (off) or > 1"),
    ("fault.straggler_factor=nan", "fault.straggler_factor must be 0 (off) or > 1"),
    ("fault.rendezvous_timeout_s=-1", "fault.rendezvous_timeout_s must be >= 0 seconds (0: not timed)"),
    ("fault.save_timeout_s=inf", "fault.save_timeout_s must be >= 0 seconds"),
])
def test_fault_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(overrides=[override])
    build_config(overrides=["fault.watchdog_timeout_s=0", "fault.straggler_factor=0"])


def test_phases_and_the_first_step_have_their_own_timeouts():
    """The first step, a save, an eval: each timed with its own timeout and named in the line; a phase without one
    is not timed; a phase inside an armed step gives the step its clock back after it."""
    from megacoca.launch.watchdog import PHASES

    assert set(PHASES) == {"build", "resume", "first step", "eval", "save"}
    watchdog, exits = _watchdog(timeout_s=5.0, phase_timeouts={"first step": 0.3, "save": 0.3, "eval": 0})
    with watchdog:
        watchdog.begin_step(1)
        assert exits.done.wait(2.0)
    assert "made no progress in first step (step 1) for " in watchdog.fired
    assert "(fault.first_step_timeout_s=0.3)" in watchdog.fired

    watchdog, exits = _watchdog(timeout_s=5.0, phase_timeouts={"first step": 0, "save": 0.3, "eval": 0})
    with watchdog:
        watchdog.begin_step(1)  # not timed
        assert not exits.done.wait(0.5)
        watchdog.end_step()
        with watchdog.timing("eval"):  # not timed
            assert not exits.done.wait(0.5)
        watchdog.begin_step(2)
        with watchdog.timing("save"):
            assert exits.done.wait(2.0)
    assert "made no progress in save (step 2) for " in watchdog.fired and "(fault.save_timeout_s=0.3)" in watchdog.fired


def test_a_phase_ends_in_time_and_the_step_clock_restarts():
    watchdog, exits = _watchdog(timeout_s=0.6, phase_timeouts={"save": 5.0})
    with watchdog:
        watchdog.begin_step(1)
        watchdog.end_step()
        watchdog.begin_step(2)
        with watchdog.timing("save"):
            time.sleep(0.8)  # past the step's timeout, within the save's
        assert watchdog.phase == "step" and not exits.codes
        started = time.monotonic()
        assert exits.done.wait(2.0)
        assert time.monotonic() - started >= 0.5
    assert "in step 2 for " in watchdog.fired


def test_the_rendezvous_deadline_ends_a_rank_whose_peers_never_join():
    from megacoca.launch.watchdog import RendezvousDeadline

    exits = Exits()
    with RendezvousDeadline(0.3, 1, 4, exit_fn=exits, stream=open("/dev/null", "w")) as deadline:
        assert exits.done.wait(2.0)
    assert exits.codes == [STALL_EXIT_CODE]
    assert "rank 1 (" in deadline.fired and "process group of 4 ranks within 0.3 s (fault.rendezvous_timeout_s)" \
        in deadline.fired
    exits = Exits()
    with RendezvousDeadline(0.3, 0, 4, exit_fn=exits):
        pass  # set up in time
    assert not exits.done.wait(0.6)
