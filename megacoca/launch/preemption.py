"""Preemption and wall-time limits: stop at a step boundary with a complete checkpoint, and say "requeue me".

A cluster warns a job before it ends it: SLURM sends the signal `--signal=[B:]USR1@SECONDS` asks for, a
preempting scheduler or `scancel` sends SIGTERM. On either signal a rank only raises a flag; the Trainer then
finishes the step it is in, and after every step the ranks agree (one all-reduce of a flag: the step at which
the first signal arrived anywhere) to stop together at the same step, write a complete checkpoint there, and
exit with REQUEUE_EXIT_CODE. The batch script recognises that status and requeues the job, which resumes with
`--resume auto` exactly where it stopped: the same losses as an uninterrupted run (tested).

A signal can come at any moment, so `python -m megacoca.train` installs the handlers as the first thing it does
(before torch is imported: this module imports it only in `agreed`), and `megacoca train` as the first thing
its command does, and they stay installed for the rest of the process:

- while the input is checked (no process group yet): the ranks agree as soon as they have a process group and
  stop there, before building anything; bad input is still exit status 2 (a requeue would fail the same way);
- while the process groups, the model and the engine are built or the checkpoint is resumed (a reshape of a
  whole checkpoint can take minutes): the ranks agree before the first step and stop there without saving,
  since nothing is new (the checkpoint resumed, or nothing, is the state to resume from);
- while a checkpoint is written: the save completes, then the agreement after the step stops without saving
  it again; the same for a second signal then, and for the SIGTERM a launcher sends the other ranks when the
  first one exits with REQUEUE_EXIT_CODE (srun --kill-on-bad-exit, the deepspeed launcher), so that every
  rank exits with it.

Every one of these ends with REQUEUE_EXIT_CODE and nothing lost (tests/distributed/test_preemption.py,
tests/e2e/test_preemption_entry.py). A run that has no step left to take ends with 0 as usual.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatch:
    """Raise a flag on SIGUSR1/SIGTERM; `agreed(device)` tells every rank whether any rank got one."""

    def __init__(self, signals=SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: list[str] = []
        self._previous: dict = {}

    def install(self) -> "PreemptionWatch":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def ignore_from_now_on(self) -> None:
        """After a preemption stop: ignore these signals at the OS level. A Python handler would not do: CPython
        resets Python-handled signals to their default action when the interpreter shuts down, and a launcher's
        SIGTERM arriving then (the other ranks are exiting with REQUEUE_EXIT_CODE) would kill this rank with
        status 143, which the batch script does not requeue (seen under srun)."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)

    def agreed(self, device, group=None) -> bool:
        """Collective: True on every rank if any rank has received a signal (call it at the same step everywhere)."""
        import torch  # heavy: the entry installs the watch before anything imports torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
