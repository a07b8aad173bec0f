"""The pipeline schedule: which work each stage does, in order, for one optimizer step of `m` micro-batches.

1F1B (PipeDream-flush, Megatron's default): stage s of p runs min(p - s - 1, m) warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards. Backwards run in micro-batch
order on every stage, so the last backward of a step is micro-batch m - 1 everywhere.

Text-ahead: the last stage holds the unimodal text tower, whose input (the caption) is there from the start,
while its image input arrives only after the p - 1 stages before it have run their forwards. Plain 1F1B runs
the last stage's forward as one piece once the image activations are in (the text tower on the critical path).
With text-ahead the text-tower forward ("T") is its own action that runs *before* the stage waits for the image
activations: the first `text_ahead` of them up front (filling the warm-up bubble), then each remaining T(k)
just before F(k) waits for its input (overlapping that wait whenever the stage before is the slower one). The
same operations run on the same data: text-ahead changes only the order of work, never a result.

Actions: ("T", k) text-tower forward of micro-batch k (last stage, text-ahead only); ("F", k) forward of k (on
the last stage: from the received image activations to the loss, including the text tower when there is no
T(k)); ("B", k) backward of k.
"""

from __future__ import annotations

from collections import deque

Action = tuple[str, int]


def stage_actions(stage: int, pp: int, micro_batches: int, text_ahead: int = 0) -> list[Action]:
    """Stage `stage`'s actions for one step, in the order it runs them."""
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    if micro_batches < 1:
        raise ValueError(f"need at least one micro-batch, got {micro_batches}")
    m = micro_batches
    warmup = min(pp - stage - 1, m)
    order: list[Action] = [("F", k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [("F", warmup + k), ("B", k)]
    order += [("B", k) for k in range(m - warmup, m)]
    if stage != pp - 1 or text_ahead <= 0:
        return order
    ahead = min(text_ahead, m)
    out: list[Action] = [("T", k) for k in range(ahead)]
    for action in order:
        if action[0] == "F" and action[1] >= ahead:
            out.append(("T", action[1]))
        out.append(action)
    return out


def auto_text_ahead(split, pp: int, micro_batches: int, *, separate_forward_costs: bool = False) -> int:
    """The text-ahead `parallel.text_ahead = -1` runs with: the smallest count whose simulated step (`simulate`,
    each stage's forward in proportion to its FLOPs, the text tower's forward apart, backward 2x forward) is
    shorter than plain 1F1B's, 0 where none is (the stage that waits is not the last one) and without a pipeline.
    Counts beyond the last stage's warm-up wait (the forwards of the stages before it, in text-tower forwards)
    plus one cannot shorten it and are not tried; a step of more than 64 micro-batches is judged on its first 64.
    `separate_forward_costs`: each text-tower forward run apart is an engine forward of its own that costs more
    than its FLOPs, which a FLOP count cannot weigh (ZeRO-3 without parallel.pipeline_keep_gathered gathers and
    releases the tower again and loses its prefetch trace: measured 1.78x against 1.58x of DeepSpeed's step at
    m = 8, docs/benchmarks.md "Pipeline parallelism"): 0. megacoca.plan chooses with its time model instead."""
    text = float(split.text_tower_flops)
    if pp == 1 or text <= 0 or separate_forward_costs:
        return 0
    stage = [float(flops) for flops in split.stage_flops()]
    forward = [*stage[:-1], max(stage[-1] - text, 0.0)]
    m = min(micro_batches, 64)
    reach = min(m, int(sum(stage[:-1]) // text) + 1)
    best, chosen = simulate(pp, m, 0, forward=forward, text=text)["makespan"], 0
    for ahead in range(1, reach + 1):
        makespan = simulate(pp, m, ahead, forward=forward, text=text)["makespan"]
        if makespan < best * (1 - 1e-9):
            best, chosen = makespan, ahead
    return chosen


def simulate(pp: int, micro_batches: int, text_ahead: int = 0, *, forward: list[float] | None = None,
             text: float = 0.0, backward_ratio: float = 2.0) -> dict:
    """Timeline of one step under the schedule above with the given per-stage forward times (default 1 each;
    the last stage's `forward` excludes the text tower, whose forward takes `text` (inside F(k) when there is
    no T(k)); backwards take
    `backward_ratio` x forward, the last stage's including the text tower's backward). Sends are free and
    a stage waits for its inputs. Returns {"slots": per stage a list of (start, end, action)}, "makespan",
    "idle": per stage the idle fraction of the makespan}. For the docs' schedule table and bubble figures."""
    forward = list(forward or [1.0] * pp)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    queues = [deque(stage_actions(s, pp, micro_batches, text_ahead)) for s in range(pp)]
    slots: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for s in range(pp):
            while queues[s]:
                kind, k = queues[s][0]
                ready = clock[s]
                if kind == "F" and s > 0:
                    if ("F", s - 1, k) not in done:
                        break
                    ready = max(ready, done[("F", s - 1, k)])
                if kind == "B" and s < pp - 1:
                    if ("B", s + 1, k) not in done:
                        break
                    ready = max(ready, done[("B", s + 1, k)])
                if kind == "T":
                    cost = text
                elif kind == "F":
                    cost = forward[s] + (text if s == pp - 1 and text_ahead <= 0 else 0.0)
                else:
                    cost = backward_ratio * (forward[s] + (text if s == pp - 1 else 0.0))
                slots[s].append((ready, ready + cost, (kind, k)))
                clock[s] = ready + cost
                done[(kind, s, k)] = clock[s]
                queues[s].popleft()
                progress = True
    if any(queues):
        raise RuntimeError(f"schedule deadlocks: {[list(q)[:1] for q in queues]}")
    makespan = max(clock)
    idle = [1.0 - sum(end - start for start, end, _ in stage) / makespan for stage in slots]
    return {"slots": slots, "makespan": makespan, "idle": idle}


def schedule_table(pp: int, micro_batches: int, text_ahead: int = 0) -> str:
    """A markdown table of the actions per stage in order (unit-time view): row = stage, column = slot."""
    rows = [stage_actions(s, pp, micro_batches, text_ahead) for s in range(pp)]
    width = max(len(r) for r in rows)
    head = "| stage | " + " | ".join(str(i) for i in range(width)) + " |"
    lines = [head, "|---" * (width + 1) + "|"]
    for s, row in enumerate(rows):
        cells = [f"{kind}{k}" for kind, k in row] + [""] * (width - len(row))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timeline_table(pp: int, micro_batches: int, text_ahead: int = 0) -> str:
    """A markdown table on a common clock: every action takes one slot (a textbook simplification: forward =
    backward = text forward), a stage waits for its inputs, blank cells are its bubble."""
    result = simulate(pp, micro_batches, text_ahead, text=1.0, backward_ratio=1.0)
    width = int(round(result["makespan"]))
    lines = ["| stage | " + " | ".join(str(t) for t in range(width)) + " |", "|---" * (width + 1) + "|"]
    for stage, slots in enumerate(result["slots"]):
        cells = [""] * width
        for start, end, (kind, k) in slots:
            for t in range(int(round(start)), int(round(end))):
                cells[t] = f"{kind}{k}"
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
