"""Preemption and wall-time limits: stop at a step boundary with a complete checkpoint, and say "requeue me".

A cluster warns a job before it ends it: SLURM sends the signal `--signal=[B:]USR1@SECONDS` asks for, a
preempting scheduler or `scancel` sends SIGTERM. On either signal a rank only raises a flag; the Trainer then
finishes the step it is in, and after every step the ranks agree (one all-reduce of a flag: the step at which
the first signal arrived anywhere) to stop together at the same step, write a complete checkpoint there, and
exit with REQUEUE_EXIT_CODE. The batch script recognises that status and requeues the job, which resumes with
`--resume auto` exactly where it stopped: the same losses as an uninterrupted run (tested).

`megacoca.train` installs the handlers for the rest of the process: a second signal while the checkpoint is
being written is recorded and otherwise ignored (the save finishes), and so is the SIGTERM a launcher sends
the other ranks when the first one exits with REQUEUE_EXIT_CODE (srun --kill-on-bad-exit, the deepspeed
launcher), so that every rank exits with it.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

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
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
