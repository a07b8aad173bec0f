"""Straggler report: which rank makes every step wait, gathered every log interval (as Megatron's).

In synchronous data parallelism every rank's step takes the same wall time, the slowest rank's: the others
wait for it inside the step's collectives. So a rank's wall time per step cannot name a straggler; what differs
is the time each rank spends on work of its own before the others can go on. The trainer measures one such
part exactly, the time each rank waits for its input batches (`InputTimer`, which the `slow` fault of
megacoca.launch.faults delays), and every log interval gathers it from every rank (one all_gather of a float).
A rank's step time is then its input wait plus the step's common part (the wall time per step less the
slowest rank's input wait, which every rank spends waiting for that rank or computing):

    step_s[r] = input_s[r] + (wall_s - max(input_s))

A rank whose step_s exceeds `fault.straggler_factor` x the median rank's (the lower median: with two ranks, the
faster one) is the straggler: the log line names it and the train record carries
`"straggler": {"rank": r, "step_s": ..., "median_s": ..., "input_s": ...}`, only when there is one. A rank slow
in its device compute is not told apart this way (its delay falls in the common part every rank shares).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from megacoca.launch import faults


class InputTimer:
    """Wraps the batch iterator: counts the seconds spent getting batches, and applies the `slow` fault."""

    def __init__(self, batches, delay_s: float = 0.0):
        self.batches = batches
        self.delay_s = delay_s
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.seconds += time.perf_counter() - start
        return batch


def find_straggler(input_s: list[float], wall_s: float, factor: float) -> dict | None:
    """The straggler among the ranks' input waits per step (seconds, rank order) with a step of `wall_s`, or
    None. Pure: every rank computes the same answer from the gathered values."""
    if factor <= 0 or len(input_s) < 2:
        return None
    common = max(wall_s - max(input_s), 0.0)
    step_s = [wait + common for wait in input_s]
    median = statistics.median_low(step_s)
    rank = max(range(len(step_s)), key=step_s.__getitem__)
    if step_s[rank] <= factor * median or step_s[rank] <= 0:
        return None
    return {"rank": rank, "step_s": round(step_s[rank], 4), "median_s": round(median, 4),
            "input_s": round(input_s[rank], 4)}


class StragglerMonitor:
    """`batches = monitor.timed(batches, step)`, then `monitor.report(step, wall_s)` at every logged step on every
    rank (a collective over `group`, default the world)."""

    def __init__(self, factor: float, device, group=None):
        self.factor = factor
        self.device = device
        self.group = group
        self.timer: InputTimer | None = None
        self.delay_s = faults.slow_s()
        self._last = (0.0, 0)  # (input seconds, step) at the last report

    def timed(self, batches, step: int) -> InputTimer:
        """Time `batches`, the input of the steps after `step` (the step training starts from)."""
        self.timer = InputTimer(batches, self.delay_s)
        self._last = (0.0, step)
        return self.timer

    def report(self, step: int, wall_s: float) -> dict | None:
        """The straggler over the steps since the last report, `wall_s` the wall time per step among them."""
        seconds, last_step = self._last
        self._last = (self.timer.seconds, step)
        if self.factor <= 0 or not dist.is_initialized() or dist.get_world_size(self.group) < 2:
            return None
        steps = max(step - last_step, 1)
        own = torch.tensor([(self.timer.seconds - seconds) / steps], dtype=torch.float64, device=self.device)
        gathered = torch.zeros(dist.get_world_size(self.group), dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(gathered, own, group=self.group)
        found = find_straggler(gathered.tolist(), wall_s, self.factor)
        if found is not None and self.group is not None:
            found["rank"] = dist.get_global_rank(self.group, found["rank"])
        return found
