"""Layout: how one training run is spread over its ranks, the one description every part of megacoca uses.

The trainer derives it from the job (`job_layout`), ParallelDims builds its process groups from it, the planner
predicts memory and time for it, a checkpoint records the layout that wrote it (`record()`), and a resume
compares that record with its own to decide whether to reshape. Plain data: no process group, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Layout:
    """Degrees (data x pipeline x tensor), the DeepSpeed ZeRO stage and precision, each rank's micro-batch and
    accumulation, and the per-step switches that change memory or time (activation checkpointing, pipeline
    text-ahead and keep-gathered, the kernels)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    precision: str = "bf16"
    micro_batch: int = 1
    grad_accum: int = 1
    checkpointing: bool = False
    text_ahead: int = 0
    keep_gathered: bool = False
    kernels: str = "torch"  # "triton": the fused caption loss keeps no logits
    # the unimodal text tower run alongside the image tower (parallel.overlap_text_tower; pp = 1): under ZeRO-3 its
    # parameters are held gathered for the step (megacoca.parallel.overlap)
    text_overlap: bool = False
    negatives: str = "micro"  # "global": the contrastive loss over the whole global batch (an extra tower forward)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout: {name} must be a positive integer, got {value!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"Layout: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Layout: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.negatives not in ("micro", "global"):
            raise ValueError(f"Layout: negatives must be 'micro' or 'global', got {self.negatives!r}")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def contrastive_negatives(self) -> int:
        """Negatives per image: the micro-batch gathered over dp, or (global) the whole global batch, less itself."""
        return (self.global_batch if self.negatives == "global" else self.micro_batch * self.dp) - 1

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    def degrees(self) -> str:
        """The part a checkpoint's files depend on: `dp=2 x pp=1 x tp=2 ZeRO-3`."""
        return f"dp={self.dp} x pp={self.pp} x tp={self.tp} ZeRO-{self.zero_stage}"

    def same_shards(self, other: "Layout") -> bool:
        """Whether a checkpoint written under `other` loads into this layout as it is (else it is reshaped)."""
        return (self.dp, self.pp, self.tp, self.zero_stage) == (other.dp, other.pp, other.tp, other.zero_stage)

    def describe(self) -> str:
        return (f"tp={self.tp} pp={self.pp} dp={self.dp} ZeRO-{self.zero_stage} {self.precision} "
                f"micro={self.micro_batch} x accum {self.grad_accum}" + (" ckpt" if self.checkpointing else "")
                + (f" text-ahead {self.text_ahead if self.text_ahead >= 0 else 'auto'}" if self.text_ahead else "")
                + (" keep-gathered" if self.keep_gathered else "")
                + (" text-overlap" if self.text_overlap else "")
                + (" global negatives" if self.negatives == "global" else ""))

    def record(self) -> dict:
        """Plain data for a checkpoint's client state or a JSON file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, values: dict) -> "Layout":
        """A layout from `record()`'s dict; unknown keys are ignored and missing ones take their defaults, so older
        records (`{"dp", "pp", "tp", "zero_stage"}`) read too."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def infer_dp(dp: int, tp: int, pp: int, world_size: int) -> int:
    """The data-parallel degree of `dp` x `tp` x `pp` over `world_size` ranks (`dp` -1: inferred); ValueError (one
    line) when a degree is not a positive integer or the degrees do not fill the world exactly."""
    for name, value in (("tp", tp), ("pp", pp), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(dp, int) or isinstance(dp, bool) or (dp < 1 and dp != -1):
        raise ValueError(f"dp must be a positive integer or -1 (inferred), got {dp!r}")
    if tp * pp > world_size:
        raise ValueError(f"tp {tp} x pp {pp} = {tp * pp} exceeds the world size {world_size}")
    if dp == -1:
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp {tp} x pp {pp} = {tp * pp}")
        return world_size // (tp * pp)
    if dp * tp * pp != world_size:
        raise ValueError(f"dp {dp} x pp {pp} x tp {tp} = {dp * pp * tp} != world size {world_size}")
    return dp


def job_layout(job, world_size: int, ds_config: dict) -> Layout:
    """The layout a JobConfig asks for over `world_size` ranks, with the DeepSpeed config built for it
    (megacoca.config.deepspeed.build_deepspeed_config: the ZeRO stage and precision come from there).
    `text_ahead` is the job's value as given (-1: chosen by the pipeline's cost model when the schedule is built)."""
    p = job.parallel
    dp = infer_dp(p.dp, p.tp, p.pp, world_size)
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    return Layout(dp=dp, tp=p.tp, pp=p.pp, zero_stage=zero,
                  precision="bf16" if ds_config.get("bf16", {}).get("enabled", False) else "fp32",
                  micro_batch=job.schedule.micro_batch_size, grad_accum=job.grad_accum_steps(dp),
                  checkpointing=p.activation_checkpointing, text_ahead=p.text_ahead,
                  keep_gathered=p.pipeline_keep_gathered and zero == 3, negatives=job.loss.negatives)
