"""The planner's view of a training job: the Layout and DeepSpeed buffers of a `megacoca train` config on a number of
ranks, as the trainer derives them (megacoca.config.layout.job_layout over megacoca.config.deepspeed's built config),
with `text_ahead = -1` resolved as the trainer resolves it. What benchmarks/plan_validate.py and the time check in
tests/unit/plan/test_time_measured.py predict a measured run with."""

from __future__ import annotations

from types import SimpleNamespace

from megacoca.config.deepspeed import build_deepspeed_config
from megacoca.config.layout import Layout, infer_dp, job_layout
from megacoca.config.recipes import build_config
from megacoca.parallel.overlap import choose_overlap
from megacoca.plan.memory import ZeroBuffers, default_text_ahead


def job_inputs(overrides: list[str], world_size: int, model_cfg, device_type: str = "cpu"
               ) -> tuple[Layout, ZeroBuffers]:
    """(Layout, ZeroBuffers) of the job `build_config(overrides=...)` on `world_size` ranks of `device_type` training
    `model_cfg` (the text tower's overlap as the trainer chooses it there: megacoca.parallel.overlap)."""
    job = build_config(overrides=list(overrides))
    dp = infer_dp(job.parallel.dp, job.parallel.tp, job.parallel.pp, world_size)
    ds = build_deepspeed_config(job, dp)
    layout = job_layout(job, world_size, ds).replace(kernels=model_cfg.kernels)
    degrees = SimpleNamespace(tp_size=layout.tp, pp_size=layout.pp, dp_size=layout.dp)
    overlap = choose_overlap(job.parallel.overlap_text_tower, degrees, layout.zero_stage, device_type)
    layout = layout.replace(text_overlap=overlap.on)
    if layout.text_ahead < 0:
        layout = layout.replace(text_ahead=default_text_ahead(model_cfg, layout.pp, layout.grad_accum,
                                                              layout.zero_stage, layout.keep_gathered))
    return layout, ZeroBuffers.from_ds_config(ds)
