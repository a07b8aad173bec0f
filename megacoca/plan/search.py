"""Every valid layout of a CoCa on a cluster, with its memory and step time, best first.

Valid: the tensor degree splits every attention and MLP (megacoca.parallel.tensor.check_tensor_parallel) and
stays inside a node; the pipeline has no more stages than ViT blocks allow and at least as many micro-batches
as stages; tp x pp divides the GPU count; the data-parallel size divides the global batch; the per-rank
micro-batch divides what is left. ZeRO 1-3 in bf16 (0-3 in fp32), activation checkpointing off and on, under a
pipeline with ZeRO-3 keep-gathered off and on, without one the text tower overlapped with the image tower (what
`parallel.overlap_text_tower: auto` does on a GPU; its memory counted, its time gain not: no GPU has measured it),
and the pipeline's text-ahead chosen by the time model: off, or the
count the pipeline's FLOP simulation picks (`auto_text_ahead`), whichever the time model predicts faster (off on a
tie). A layout fits when its largest stage's peak memory is at most `memory_fraction` of the device's (the rest: the
CUDA context, the allocator's fragmentation, NCCL's buffers).

`pin` predicts one layout a user names (`megacoca plan --layout`), after `check_pinned` has refused an impossible
one with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from megacoca.config.layout import Layout
from megacoca.parallel.parallelize import check_layout
from megacoca.parallel.pipeline.schedule import auto_text_ahead
from megacoca.parallel.pipeline.split import check_pipeline
from megacoca.parallel.tensor import check_tensor_parallel
from megacoca.plan.memory import StageMemory, ZeroBuffers, predict
from megacoca.plan.params import pipeline_split
from megacoca.plan.profile import DeviceProfile
from megacoca.plan.timing import StepTime, predict_time

MAX_MICRO_BATCH = 512  # per-rank micro-batches tried: every divisor of the per-rank batch up to this


@dataclass
class Plan:
    layout: Layout
    memory: list[StageMemory]
    time: StepTime

    @property
    def peak_bytes(self) -> float:
        return max(stage.peak for stage in self.memory)

    @property
    def negatives(self) -> int:
        """Contrastive negatives per image: the micro-batch gathered over the data-parallel ranks, or (global
        negatives) the whole global batch."""
        return self.layout.contrastive_negatives

    def limit(self) -> str:
        """What limits the layout: the largest share of its step time beyond the matmuls."""
        parts = {k: v for k, v in self.time.parts.items() if not k.startswith("compute")}
        main = max(parts, key=lambda k: parts[k])
        share = parts[main] / self.time.seconds
        if share < 0.05:
            return "compute (every other cost < 5%)"
        return f"{main} {100 * share:.0f}%"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg, gpus: int, global_batch: int, precision: str, gpus_per_node: int, *, kernels: str = "torch",
            zero_stages=None, tp_values=None, pp_values=None, checkpointing=(False, True), negatives: str = "micro"):
    stages = zero_stages or ((0, 1, 2, 3) if precision == "fp32" else (1, 2, 3))
    for tp in tp_values or [d for d in _divisors(gpus_per_node) if gpus % d == 0]:
        try:
            check_tensor_parallel(cfg, tp)
        except ValueError:
            continue
        for pp in pp_values or [p for p in (1, 2, 4, 8, 16) if gpus % (tp * p) == 0]:
            if gpus % (tp * pp):
                continue
            try:
                check_pipeline(cfg, pp)
            except ValueError:
                continue
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            split = pipeline_split(cfg, pp) if pp > 1 else None
            for micro in _divisors(per_rank):  # 88 per rank: 1, 2, 4, 8, 11, 22, 44, 88
                if micro > MAX_MICRO_BATCH:
                    break
                accum = per_rank // micro
                if pp > 1 and accum < pp:
                    continue
                text_ahead = auto_text_ahead(split, pp, accum) if pp > 1 else 0
                for zero in stages:
                    for keep_gathered in ((False, True) if pp > 1 and zero == 3 else (False,)):
                        for ckpt in checkpointing:
                            yield Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=micro,
                                         grad_accum=accum, precision=precision, checkpointing=ckpt,
                                         text_ahead=text_ahead, keep_gathered=keep_gathered, kernels=kernels,
                                         negatives=negatives, text_overlap=pp == 1)


def text_ahead_choices(cfg, layout: Layout, profile: DeviceProfile) -> list[tuple[Layout, StepTime]]:
    """`layout` with each text-ahead worth trying (off, and the pipeline's FLOP-simulated count: `layout`'s own when
    it has one), with its predicted step time, fastest first (off first on a tie). Without a pipeline: itself."""
    if layout.pp == 1:
        return [(layout, predict_time(cfg, layout, profile))]
    own = layout.text_ahead  # the search's layouts carry the simulation's count already
    counts = sorted({0, own if own > 0 else auto_text_ahead(pipeline_split(cfg, layout.pp), layout.pp,
                                                            layout.grad_accum)})
    timed = [(layout.replace(text_ahead=count), predict_time(cfg, layout.replace(text_ahead=count), profile))
             for count in counts]
    return sorted(timed, key=lambda item: (item[1].seconds, item[0].text_ahead))


def plan(cfg, profile: DeviceProfile, gpus: int, global_batch: int, precision: str = "bf16", *,
         kernels: str = "triton", buffers: ZeroBuffers | None = None, memory_fraction: float = 0.9,
         min_negatives: int = 0, **choices) -> tuple[list[Plan], int]:
    """(the layouts that fit, fastest first; how many valid layouts did not fit). Under a pipeline the text-ahead
    is the fastest that fits (`text_ahead_choices`)."""
    fitting, too_big = [], 0
    budget = memory_fraction * profile.memory_bytes
    for layout in layouts(cfg, gpus, global_batch, precision, profile.gpus_per_node, kernels=kernels, **choices):
        if layout.contrastive_negatives < min_negatives:
            continue
        for candidate, time in text_ahead_choices(cfg, layout, profile):
            memory = predict(cfg, candidate, buffers)
            if max(stage.peak for stage in memory) <= budget:
                fitting.append(Plan(candidate, memory, time))
                break
        else:
            too_big += 1
    fitting.sort(key=lambda p: (-p.time.samples_per_s, p.peak_bytes))
    return fitting, too_big


def check_pinned(cfg, layout: Layout) -> None:
    """Whether megacoca can run `layout` for `cfg`: ValueError with a one-line reason if not (the tensor degree
    splits every head and MLP, the pipeline has ViT blocks and micro-batches for its stages, the precision and the
    ZeRO stage go together, keep-gathered and text-ahead have a pipeline to act on)."""
    check_layout(cfg, layout)
    if layout.zero_stage == 0 and layout.precision != "fp32":
        raise ValueError("ZeRO-0 trains in fp32 here (ds_configs/zero0_fp32.json); bf16 needs ZeRO-1, 2 or 3")
    if layout.keep_gathered and (layout.zero_stage != 3 or layout.pp == 1):
        raise ValueError(f"keep_gathered holds a pipeline stage's ZeRO-3 parameters for the step: it needs zero=3 "
                         f"and pp > 1 (got zero={layout.zero_stage}, pp={layout.pp})")
    if layout.text_ahead > 0 and layout.pp == 1:
        raise ValueError(f"text_ahead={layout.text_ahead} runs the last pipeline stage's text tower early: it needs "
                         "pp > 1")
    if layout.text_overlap and layout.pp > 1:
        raise ValueError("overlap runs the text tower beside the image tower without a pipeline: it needs pp = 1 "
                         "(with a pipeline, text_ahead does that job)")
    if layout.text_ahead > layout.grad_accum:
        raise ValueError(f"text_ahead={layout.text_ahead} is more than the step's {layout.grad_accum} micro-batches")


def pin(cfg, layout: Layout, profile: DeviceProfile, buffers: ZeroBuffers | None = None) -> Plan:
    """The prediction for one named layout (`megacoca plan --layout`): checked (`check_pinned`), its text-ahead
    chosen by the time model when it is negative (-1, "auto"), every stage's memory and the step's time."""
    check_pinned(cfg, layout)
    if layout.text_ahead < 0:
        layout, time = text_ahead_choices(cfg, layout.replace(text_ahead=0), profile)[0]
    else:
        time = predict_time(cfg, layout, profile)
    return Plan(layout, predict(cfg, layout, buffers), time)


def emit_config(plan_: Plan, flavor: str | None, model_overrides: dict | None = None) -> dict:
    """The chosen layout as nested overrides for `megacoca train --config FILE`."""
    layout = plan_.layout
    ds = {0: "zero0_fp32", 1: "zero1_bf16", 2: "zero2_bf16", 3: "zero3_bf16" if layout.precision == "bf16"
          else "zero3_fp32"}[layout.zero_stage]
    parallel = {"deepspeed_config": ds, "tp": layout.tp, "pp": layout.pp,
                "activation_checkpointing": layout.checkpointing}
    if layout.precision == "fp32" and layout.zero_stage in (1, 2):
        # zero0_fp32.json has no buckets: raised to ZeRO-1/2, DeepSpeed would allocate its default 5e8-element
        # reduce buckets (4 GB in fp32), not the 5e7 the memory model assumed (ZeroBuffers)
        parallel["deepspeed_config"] = "zero0_fp32"
        parallel["deepspeed_overrides"] = {"zero_optimization.stage": layout.zero_stage,
                                           "zero_optimization.reduce_bucket_size": ZeroBuffers.reduce_bucket,
                                           "zero_optimization.allgather_bucket_size": ZeroBuffers.reduce_bucket,
                                           "zero_optimization.overlap_comm": True}
    if layout.pp > 1:
        parallel["text_ahead"] = layout.text_ahead
        parallel["pipeline_keep_gathered"] = layout.keep_gathered
    if layout.pp == 1 and not layout.text_overlap:
        parallel["overlap_text_tower"] = "off"
    loss = {"loss": {"negatives": "global"}} if layout.negatives == "global" else {}
    model = {"flavor": flavor} if flavor else {}
    if model_overrides:
        model["overrides"] = dict(model_overrides)
    if layout.kernels != "torch":
        model.setdefault("overrides", {})["kernels"] = "auto"
    return {"model": model, "parallel": parallel, **loss,
            "schedule": {"global_batch_size": layout.global_batch, "micro_batch_size": layout.micro_batch}}
