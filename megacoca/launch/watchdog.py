"""Hung ranks: a step watchdog on every rank that ends the job, naming the rank that stalled.

A rank that stops (SIGSTOP, a dead NFS read, a wedged device) leaves every other rank blocked in its next
collective. Two settings bound how long that lasts (megacoca.config.train.FaultConfig):

    fault.collective_timeout_s  every collective, and the rendezvous, of the process group (given to
                                `deepspeed.init_distributed`; gloo raises, NCCL's own watchdog aborts the rank)
    fault.watchdog_timeout_s    a train step that makes no progress this long ends the rank (0: off); must be
                                below the collective timeout, so the watchdog speaks first and names the rank

`StepWatchdog` runs two daemon threads per rank from the model's build to the end of training. The trainer arms
it as each step begins and disarms it after the step's logging; eval, checkpoint saves, the build, the resume and
the first step of `train()` (compilation, first gathers, a resume's warm-up) are timed as phases, below.
- The heartbeat thread publishes `beat step state where` to the c10d store every `heartbeat_s` (a tenth of
  the timeout, 0.1-5 s): a counter, the step this rank is in, and where its main thread is (its innermost
  Python frame). A stopped process stops beating; a rank stuck in a read beats on, showing where it waits.
- The watch thread: when an armed step has run for the timeout it reads every rank's record twice, a few
  heartbeats apart, prints ONE line on stderr and ends the process with `os._exit(STALL_EXIT_CODE)`; the
  launcher (deepspeed, torchrun, srun --kill-on-bad-exit) then ends the others. The line names this rank, the
  step, where it waits, and the rank at fault when one can be told apart: a rank whose heartbeat stopped
  ("not responding": stopped or dead, or its host is down), else one behind in steps, else one busy outside
  a collective while the others wait in one. When the store itself does not answer and it lives in rank 0's
  process (env:// rendezvous, as under the deepspeed launcher), rank 0 is named. A SIGSTOPped rank cannot
  print; its peers name it.

Phases (`timing(phase)`: build, resume, eval, save; and the first step) are timed the same way, each with its own
timeout (fault.build_timeout_s, ...: PHASES), and the line names the phase. Before the process group exists there is
no store: `RendezvousDeadline` bounds the rendezvous and the groups' set-up (fault.rendezvous_timeout_s), so a rank
that never joins or dies while connecting ends the others after that long, not after the collective timeout.

The job ends within watchdog_timeout_s plus about three heartbeats, then the launcher's teardown: the
deepspeed launcher and torchrun SIGTERM the other ranks and SIGKILL those still there 30 s later, which a
stopped rank (it cannot run its SIGTERM handler) always is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from megacoca.launch import faults

# What timeout(1) returns: the job timed out. Not megacoca.launch.preemption.REQUEUE_EXIT_CODE, so the batch
# scripts do not requeue a job that hung (a requeue lands on the same broken node as often as not).
STALL_EXIT_CODE = 124
KEY = "megacoca/watchdog/{rank}"
# The phases timed besides the steps, and the FaultConfig key that holds each one's timeout.
PHASES = {"build": "build_timeout_s", "resume": "resume_timeout_s", "first step": "first_step_timeout_s",
          "eval": "eval_timeout_s", "save": "save_timeout_s"}


def where(frame) -> str:
    """`func (file:line)` of the innermost Python frame, `<- func (megacoca/...:line)` of the innermost
    megacoca frame when that is another one: where a thread waits, on one line."""
    if frame is None:
        return "?"
    inner = outer = _describe(frame)
    while frame is not None and "(megacoca/" not in outer:
        frame = frame.f_back
        outer = _describe(frame) if frame is not None else ""
    return inner if outer in ("", inner) else f"{inner} <- {outer}"


def _describe(frame) -> str:
    parts = frame.f_code.co_filename.split(os.sep)
    for top, keep in (("site-packages", 0), ("megacoca", 1)):  # torch/..., deepspeed/..., megacoca/...
        if top in parts:
            parts = parts[len(parts) - parts[::-1].index(top) - keep:]
            break
    short = "/".join(parts[-4:])
    return f"{frame.f_code.co_name} ({short}:{frame.f_lineno})"


class StepWatchdog:
    """Arm with `begin_step(step)`, disarm with `end_step()`; `with watchdog:` runs the threads.

    store: a c10d store all ranks share (None: no heartbeats; the line then names only this rank).
    store_on_rank0: the store is served from rank 0's process (env:// rendezvous without an agent store).
    exit_fn: called with STALL_EXIT_CODE after the line is printed (os._exit; tests pass their own).
    """

    def __init__(self, timeout_s: float, *, rank: int = 0, world_size: int = 1, store=None,
                 store_on_rank0: bool = False, exit_fn=None, stream=None, phase_timeouts: dict | None = None):
        self.timeout_s = float(timeout_s)
        # {phase: seconds}, for the phases of PHASES (0 or absent: that phase is not timed)
        self.phase_timeouts = {name: float(value) for name, value in (phase_timeouts or {}).items()}
        self.phase = "step"  # what the armed clock times: "step", or one of PHASES
        self._limit = self.timeout_s
        self.rank, self.world_size = rank, world_size
        self.store = store if world_size > 1 else None
        self.store_on_rank0 = store_on_rank0
        self.heartbeat_s = min(max(self.timeout_s / 10, 0.1), 5.0)
        self.probe_s = max(2.0, 4 * self.heartbeat_s)  # a store read taking longer: the store does not answer
        self.exit_fn = exit_fn or os._exit
        self.stream = stream
        self.step = 0
        self.steps_begun = 0
        self.fired: str | None = None  # the line, once printed
        self._armed_at: float | None = None
        self._paused = 0
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_job(cls, job, rank: int, world_size: int) -> "StepWatchdog":
        """The watchdog `job.fault` asks for (the step timeout and every phase's), over the default process group's
        store."""
        store = None
        if world_size > 1:
            try:
                store = dist.distributed_c10d._get_default_store()
            except (AttributeError, ValueError, RuntimeError):  # a private API: without it, no heartbeats
                store = None
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        phases = {name: getattr(job.fault, key) for name, key in PHASES.items()}
        return cls(job.fault.watchdog_timeout_s, rank=rank, world_size=world_size, store=store,
                   store_on_rank0=not agent_store and "MASTER_ADDR" in os.environ, phase_timeouts=phases)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0 or any(value > 0 for value in self.phase_timeouts.values())

    def _arm(self, phase: str, limit: float) -> None:
        self.phase, self._limit = phase, limit
        self._armed_at = time.monotonic() if limit > 0 else None

    @contextlib.contextmanager
    def timing(self, phase: str):
        """Time `phase` (one of PHASES: build, resume, eval, save) with its own timeout; a phase without one is not
        timed. Nested in an armed step (a save from inside a step), the step's clock restarts after it."""
        outer = (self.phase, self._limit, self._armed_at)
        self._arm(phase, self.phase_timeouts.get(phase, 0.0))
        try:
            yield
        finally:
            self.phase, self._limit = outer[0], outer[1]
            self._armed_at = time.monotonic() if outer[2] is not None else None

    # ------------------------------------------------------------------------------ the training loop's side

    def begin_step(self, step: int) -> None:
        """A train step begins (every rank, the same step): timed with fault.watchdog_timeout_s, the first of this
        watchdog (compilation, first gathers, a resume's warm-up) with fault.first_step_timeout_s."""
        self.step = step
        self.steps_begun += 1
        if faults.at_step("kill", step) is not None:
            _write(f"{faults.ENV}: rank {self.rank} kills itself (SIGKILL) as step {step} begins\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.at_step("signal", step) is not None:
            os.kill(os.getpid(), signal.SIGUSR1)  # the preemption watch's handler raises its flag
        if faults.at_step("stall", step) is not None:
            _write(f"{faults.ENV}: rank {self.rank} stops itself (SIGSTOP) as step {step} begins\n")
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.steps_begun > 1:
            self._arm("step", self.timeout_s)
        else:
            self._arm("first step", self.phase_timeouts.get("first step", 0.0))

    def end_step(self) -> None:
        """The step and its logging are done: what follows (eval, a checkpoint) is not timed."""
        self._armed_at = None

    @contextlib.contextmanager
    def paused(self):
        """Not timed inside (a checkpoint written from inside a step); the step's clock restarts after it."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._armed_at is not None:
                self._armed_at = time.monotonic()

    # ------------------------------------------------------------------------------------------- threads

    def __enter__(self) -> "StepWatchdog":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "StepWatchdog":
        if not self.enabled or self._threads:
            return self
        self._stop.clear()
        targets = [self._watch] + ([self._beat] if self.store is not None else [])
        self._threads = [threading.Thread(target=target, name=f"megacoca-watchdog-{target.__name__[1:]}",
                                          daemon=True) for target in targets]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Disarm and end the threads (a heartbeat blocked on a dead store is left behind: it is a daemon)."""
        self._armed_at = None
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads = []

    def _state(self) -> str:
        """What this rank's heartbeat says: `step armed where`."""
        frame = sys._current_frames().get(self._main)
        return f"{self.step} {int(self._armed_at is not None)} {where(frame)}"

    def _beat(self) -> None:
        beat, key = 0, KEY.format(rank=self.rank)
        while not self._stop.is_set():
            beat += 1
            with contextlib.suppress(Exception):  # a store gone with rank 0: the watch thread reports it
                self.store.set(key, f"{beat} {self._state()}")
            self._stop.wait(self.heartbeat_s)

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(tick):
            armed_at, limit = self._armed_at, self._limit
            if armed_at is None or self._paused or time.monotonic() - armed_at < limit:
                continue
            line = self.diagnose(time.monotonic() - armed_at)
            if self._armed_at != armed_at or self._paused:  # the step ended while the peers were read
                continue
            self.fired = line
            _write(self.fired + "\n", self.stream)
            self.exit_fn(STALL_EXIT_CODE)
            return

    # ------------------------------------------------------------------------------------------ the report

    def _read_peers(self) -> dict[int, tuple[int, int, bool, str]] | None:
        """{rank: (beat, step, armed, where)} of every rank that has published one; None when the store does
        not answer within a few heartbeats (run in a helper thread: a stopped store server blocks a read)."""
        result: list = []

        def read():
            peers = {}
            for rank in range(self.world_size):
                key = KEY.format(rank=rank)
                if self.store.check([key]):
                    beat, step, armed, place = self.store.get(key).decode().split(" ", 3)
                    peers[rank] = (int(beat), int(step), armed == "1", place)
            result.append(peers)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=self.probe_s)
        return result[0] if result else None

    def diagnose(self, stalled_for: float) -> str:
        """The one line: this rank, its step and where it waits, and the rank at fault where it can be told."""
        here = where(sys._current_frames().get(self._main))
        what = f"step {self.step}" if self.phase == "step" else f"{self.phase} (step {self.step})"
        key = "watchdog_timeout_s" if self.phase == "step" else PHASES[self.phase]
        line = (f"megacoca watchdog: rank {self.rank} ({socket.gethostname()}) made no progress in {what} "
                f"for {stalled_for:.1f} s (fault.{key}={self._limit:g}), waiting in {here}")
        if self.store is not None:
            line += "; " + self._culprit()
        return line + f"; ending this rank (exit {STALL_EXIT_CODE}) so the launcher ends the job"

    def _culprit(self) -> str:
        first = self._read_peers()
        if first is not None:
            time.sleep(3 * self.heartbeat_s)
            second = self._read_peers()
        if first is None or second is None:
            if self.store_on_rank0 and self.rank != 0:
                return ("stalled: rank 0 (the c10d store, served from rank 0's process, does not answer: rank 0 is "
                        "stopped or dead, or its host is down)")
            return "the c10d store does not answer: the stalled rank cannot be told"
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        silent = [rank for rank in others if rank not in second or second[rank][0] == first.get(rank, (None,))[0]]
        if silent:
            return (f"stalled: rank {_ranks(silent)} (no heartbeat for {3 * self.heartbeat_s:.1f} s: stopped or "
                    f"dead, or its host is down)")
        behind = [rank for rank in others if second[rank][1] < self.step]
        if behind:
            steps = sorted({second[rank][1] for rank in behind})
            return f"stalled: rank {_ranks(behind)} (still at step {_ranks(steps)})"
        busy = [rank for rank in others if not _in_collective(second[rank][3])]
        if busy and _in_collective(where(sys._current_frames().get(self._main))):
            shown = "; ".join(f"rank {rank} in {second[rank][3]}" for rank in busy[:4])
            return f"stalled: rank {_ranks(busy)} (outside any collective while this rank waits in one: {shown})"
        return f"every other rank is alive at step {self.step}; no single rank is behind"


def _in_collective(place: str) -> bool:
    """Whether a `where()` string's innermost frame is in torch.distributed, deepspeed.comm or ZeRO's handles."""
    inner = place.split(" <- ")[0]
    return any(part in inner for part in ("(torch/distributed/", "(deepspeed/comm/", "(deepspeed/runtime/zero/"))


def _ranks(values: list[int]) -> str:
    shown = ", ".join(str(value) for value in values[:16])
    return shown + (f" and {len(values) - 16} more" if len(values) > 16 else "")


def _write(text: str, stream=None) -> None:
    """Straight to the file descriptor: the process may end with os._exit right after."""
    if stream is not None:
        stream.write(text)
        stream.flush()
        return
    # stdout's buffered lines first, but never wait on it: the main thread may hold its lock, blocked in a write
    flush = threading.Thread(target=_flush_stdout, daemon=True)
    flush.start()
    flush.join(timeout=0.5)
    os.write(2, text.encode())


def _flush_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()


class RendezvousDeadline:
    """`with RendezvousDeadline(timeout_s, rank, world_size):` around the process group's set-up (the rendezvous,
    gloo's or NCCL's connections, the parallel groups): when it has not finished after `timeout_s`
    (fault.rendezvous_timeout_s; 0: none), one line on stderr and the process ends with STALL_EXIT_CODE, so a rank
    that never joins, or dies while connecting (a host that cannot reach the others), ends every other rank after
    this long instead of the collective timeout. No store exists yet to tell which rank is missing: the line says
    where this rank waits and whom it waits for (MASTER_ADDR:MASTER_PORT, the world size)."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, *, exit_fn=None, stream=None):
        self.timeout_s, self.rank, self.world_size = float(timeout_s), rank, world_size
        self.exit_fn, self.stream = exit_fn or os._exit, stream
        self._done = threading.Event()
        self._main = threading.main_thread().ident
        self.fired: str | None = None

    def __enter__(self) -> "RendezvousDeadline":
        if self.timeout_s > 0 and self.world_size > 1:
            threading.Thread(target=self._watch, name="megacoca-rendezvous-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        self.fired = (f"megacoca watchdog: rank {self.rank} ({socket.gethostname()}) could not set up the process "
                      f"group of {self.world_size} ranks within {self.timeout_s:g} s (fault.rendezvous_timeout_s), "
                      f"waiting in {where(sys._current_frames().get(self._main))}: a rank did not join or died "
                      f"while connecting (the rendezvous is {master}); ending this rank (exit {STALL_EXIT_CODE})")
        _write(self.fired + "\n", self.stream)
        self.exit_fn(STALL_EXIT_CODE)
