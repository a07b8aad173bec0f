"""Fault injection for tests: inert unless MEGACOCA_FAULTS is set, read here and nowhere else.

    MEGACOCA_FAULTS="kill_at=save:after_model_states;enospc_at=rank1@save:after_optim_states#2"

The value is `kind=value` entries joined by `;`; a value may list several targets joined by `,`. A kind this
module does not know is an error (a typo must not make a fault test pass without its fault). Kinds:

    kill_at=POINT      SIGKILL this process when it reaches POINT, as a node dying or `kill -9` would
    enospc_at=POINT    raise OSError(ENOSPC) at POINT, as a full disk would
    stall_at=POINT     SIGSTOP this process at POINT (a rank hung in an eval, a save, a resume: the others' watchdogs
                       must end the job naming it)
    signal_at=POINT    send SIGUSR1 to this process at POINT, as SLURM's warning before the time limit would (a
                       preemption at that moment: megacoca.launch.preemption)
    nan_loss=STEP      the loss of optimizer step STEP (1-based, the step being computed) becomes NaN
    nan_grad=STEP      one gradient of step STEP becomes NaN in backward (the loss stays finite)
    inf_loss=STEP      the loss of step STEP becomes +inf
    loss_scale=STEP:F  the loss of step STEP is multiplied by F (a loss spike)
    kill=STEP          SIGKILL this process as train step STEP begins (`kill -9` at a step: a resume must lose
                       nothing but the steps after the last checkpoint)
    signal=STEP        send SIGUSR1 to this process as train step STEP begins (a preemption warning mid-run)
    stall=STEP         SIGSTOP this process as train step STEP begins (a hung rank: it can print nothing more; the
                       other ranks' watchdogs must end the job, megacoca.launch.watchdog)
    slow=SECONDS       every input batch arrives SECONDS later (a straggler: a slow disk or decoder)

A STEP target is `[rankR@]STEP` (`[rankR@]STEP:F` for loss_scale): on global rank R only (default: every
rank). The trainer reads them with `at_step(kind, step)`. `slow` takes `[rankR@]SECONDS`, read with `slow_s()`.

A POINT target is `[rankR@]NAME[#N]`: on global rank R only (default: every rank), the N-th time this process
reaches NAME (default: the first). The code marks its points with `faults.point(NAME)`; the names are listed
in POINTS. Kinds that are not points (a NaN loss at given steps, a rank that stalls) go in KINDS with their
own value syntax, and the code that acts on them reads them with `faults.targets(kind)`.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "MEGACOCA_FAULTS"

# kind -> what it does; the point kinds act in point(), others are read by the code they concern.
KINDS = {
    "kill_at": "SIGKILL this process at a point",
    "enospc_at": "raise OSError(ENOSPC) at a point",
    "signal_at": "send SIGUSR1 to this process at a point",
    "stall_at": "SIGSTOP this process at a point",
    "nan_loss": "the loss of a step becomes NaN",
    "nan_grad": "a gradient of a step becomes NaN",
    "inf_loss": "the loss of a step becomes +inf",
    "loss_scale": "the loss of a step is multiplied by a factor",
    "kill": "SIGKILL this process as a step begins",
    "signal": "send SIGUSR1 to this process as a step begins",
    "stall": "SIGSTOP this process as a step begins",
    "slow": "delay every input batch by SECONDS",
}
STEP_KINDS = ("nan_loss", "nan_grad", "inf_loss", "loss_scale", "kill", "signal", "stall")
POINT_KINDS = ("kill_at", "enospc_at", "signal_at", "stall_at")

# Where point() is called: the start of `megacoca train` (megacoca.cli.train), then the order a save goes through
# (megacoca.checkpoint.state).
POINTS = (
    "check:begin",                # the config parsed; its layout and files not checked yet, no process group
    "build:begin",                # the process group made; the groups, the loader and the Trainer not built yet
    "resume:begin",               # the Trainer built; the checkpoint to resume (if any) not looked for yet
    "eval:begin",                 # an evaluation (Trainer.evaluate) begins
    "save:begin",                 # earlier files of the tag removed, DeepSpeed has written nothing yet
    "save:after_model_states",    # after each DeepSpeed *model_states.pt this rank writes
    "save:after_optim_states",    # after each DeepSpeed *optim_states.pt this rank writes
    "save:after_rank_file",       # after megacoca_rank*.pt (data position, RNG), before the barrier
    "save:before_complete",       # rank 0, every rank's files on disk, COMPLETE not yet written
    "save:after_complete",        # rank 0, COMPLETE written, `latest` not yet updated
    "save:after_latest",          # rank 0, `latest` updated, old checkpoints not yet pruned
    "remove:after_unmark",        # rank 0, removing a checkpoint (pruned, or a partial one re-saved): its
                                  # COMPLETE marker is gone, its files not yet
)

_parsed: tuple[str | None, dict[str, list[str]]] = (None, {})
_reached: Counter = Counter()


class FaultSpecError(ValueError):
    """MEGACOCA_FAULTS does not parse; the message is one line."""


def parse(text: str) -> dict[str, list[str]]:
    """`kind=value[,value];...` -> {kind: [value, ...]}; raises FaultSpecError naming the bad entry."""
    faults: dict[str, list[str]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        kind, sep, value = entry.partition("=")
        kind = kind.strip()
        if not sep or not value.strip():
            raise FaultSpecError(f"{ENV}: entry {entry!r} is not kind=value")
        if kind not in KINDS:
            raise FaultSpecError(f"{ENV}: unknown fault kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        targets = [target.strip() for target in value.split(",") if target.strip()]
        if kind in STEP_KINDS:
            for target in targets:
                _step_target(kind, target)
        if kind == "slow":
            for target in targets:
                _seconds_target(kind, target)
        if kind in POINT_KINDS:
            for target in targets:
                name = _point_target(target)[1]
                if name not in POINTS:
                    raise FaultSpecError(f"{ENV}: {kind}={target}: unknown point {name!r} (known: {', '.join(POINTS)})")
        faults.setdefault(kind, []).extend(targets)
    return faults


def _rank_prefix(target: str) -> tuple[int | None, str]:
    """`[rankR@]REST` -> (R or None, REST)."""
    if "@" not in target:
        return None, target
    head, rest = target.split("@", 1)
    if not head.startswith("rank") or not head[4:].isdigit():
        raise FaultSpecError(f"{ENV}: {head!r} in {head}@{rest} is not rankR")
    return int(head[4:]), rest


def _point_target(target: str) -> tuple[int | None, str, int]:
    """`[rankR@]NAME[#N]` -> (R or None, NAME, N)."""
    rank, target = _rank_prefix(target)
    name, _, count = target.partition("#")
    if count and not count.isdigit():
        raise FaultSpecError(f"{ENV}: {target!r}: the count after # is not a number")
    return rank, name, int(count or 1)


def _step_target(kind: str, target: str) -> tuple[int | None, int, float]:
    """`[rankR@]STEP[:F]` -> (R or None, STEP, F); F only for loss_scale (1.0 for the others)."""
    rank, rest = _rank_prefix(target)
    step, _, factor = rest.partition(":")
    if not step.isdigit() or (kind == "loss_scale") != bool(factor):
        syntax = "[rankR@]STEP:FACTOR" if kind == "loss_scale" else "[rankR@]STEP"
        raise FaultSpecError(f"{ENV}: {kind}={target}: expected {syntax}")
    try:
        value = float(factor) if factor else 1.0
    except ValueError:
        raise FaultSpecError(f"{ENV}: {kind}={target}: {factor!r} is not a number") from None
    return rank, int(step), value


def _seconds_target(kind: str, target: str) -> tuple[int | None, float]:
    """`[rankR@]SECONDS` -> (R or None, SECONDS)."""
    rank, seconds = _rank_prefix(target)
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise FaultSpecError(f"{ENV}: {kind}={target}: expected [rankR@]SECONDS (a number >= 0)")
    return rank, value


def slow_s() -> float:
    """Seconds every input batch of this rank is delayed by (`slow`; 0.0 unless MEGACOCA_FAULTS names this rank)."""
    return sum(seconds for rank, seconds in (_seconds_target("slow", t) for t in targets("slow"))
               if rank is None or rank == _rank())


def at_step(kind: str, step: int) -> float | None:
    """For a STEP kind: None unless MEGACOCA_FAULTS names `step` for this rank, else its factor (1.0 for the
    kinds without one)."""
    for target in targets(kind):
        rank, target_step, factor = _step_target(kind, target)
        if target_step == step and (rank is None or rank == _rank()):
            return factor
    return None


def active() -> dict[str, list[str]]:
    """The parsed MEGACOCA_FAULTS ({} when unset); parsed again only when the variable changes."""
    global _parsed
    text = os.environ.get(ENV, "")
    if _parsed[0] != text:
        _parsed = (text, parse(text) if text else {})
        _reached.clear()
    return _parsed[1]


def targets(kind: str) -> list[str]:
    """The raw values given for `kind` (for kinds acted on elsewhere)."""
    if kind not in KINDS:
        raise KeyError(f"unknown fault kind {kind!r}")
    return list(active().get(kind, ()))


def _rank() -> int:
    import torch.distributed as dist  # heavy: `megacoca --help` imports this module

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def point(name: str) -> None:
    """Mark a place where a test may inject a fault. Does nothing unless MEGACOCA_FAULTS names this point."""
    faults = active()
    if not faults:
        return
    _reached[name] += 1
    for kind in POINT_KINDS:
        for target in faults.get(kind, ()):
            rank, target_name, count = _point_target(target)
            if target_name != name or _reached[name] != count or (rank is not None and rank != _rank()):
                continue
            if kind == "kill_at":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "signal_at":
                os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs in the main thread, then this goes on
            elif kind == "stall_at":
                os.write(2, f"{ENV}: rank {_rank()} stops itself (SIGSTOP) at {name}\n".encode())
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV} at {name})")
