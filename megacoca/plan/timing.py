"""Step time of a CoCa training layout on a device profile (megacoca.plan.profile).

Per micro-batch of b samples on pipeline stage s and one tensor rank:
- compute: the stage's forward FLOPs (megacoca.metrics.flops; the pipeline split's cost model) x b / tp, three
  times (backward = 2 x forward), plus the recomputed block forwards under activation checkpointing, at the
  profile's matmul rate; the memory-bound work between the matmuls (LayerNorms, residual adds, GELU:
  `_elementwise_elements`) at the profile's memory bandwidth (a calibrated profile's whole-block rate holds both);
  the profile's fixed costs per transformer block, per parameter tensor and per micro-batch (DeepSpeed's engine);
- tensor parallelism: the all-reduces Megatron's scheme issues (megacoca.plan.comm.analytic_comm, split between
  the stages like the blocks), each a ring: latency + 2 (t-1)/t x bytes / bandwidth, on the critical path;
- pipeline: the stage's activations (b x image tokens x width) sent forward and their gradient back.
The step: without a pipeline, m micro-batches one after the other; with one, the 1F1B (+ text-ahead) schedule
simulated by megacoca.parallel.pipeline.schedule.simulate with each stage's times. Then data parallelism:
- ZeRO-0: an all-reduce of the gradients after backward (not overlapped); ZeRO-1/2: a reduce-scatter of the
  gradients overlapped with the last micro-batch's backward (what exceeds OVERLAP of it is exposed), then an
  all-gather of the updated weights; ZeRO-3: per micro-batch, the weights gathered in forward and again in
  backward and the gradients reduce-scattered, prefetched under compute (what exceeds OVERLAP of the
  micro-batch's compute is exposed).
- the optimizer step: 32 bytes per parameter of its partition streamed (fp32 master, gradient, two moments, read
  and written), plus the profile's fixed step cost.
Bandwidths: a group within one node (its ranks span at most gpus_per_node consecutive ranks) uses the intra-node
figure, else the inter-node one. Ranks are laid out (dp, pp, tp) with tp fastest (megacoca.parallel.dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megacoca.metrics.flops import forward_flops_breakdown, train_flops_per_sample
from megacoca.plan.comm import analytic_comm
from megacoca.plan.memory import Layout
from megacoca.plan.params import pipeline_split, stage_tensors
from megacoca.plan.profile import DeviceProfile


@dataclass
class StepTime:
    seconds: float
    samples_per_s: float
    samples_per_s_per_gpu: float
    mfu: float | None
    parts: dict = field(default_factory=dict)  # seconds by cause, for "what limits it"


def _ring(nbytes: float, ranks: int, bandwidth: float, latency: float, factor: float = 2.0) -> float:
    """A ring collective over `ranks`: all-reduce (factor 2) or reduce-scatter / all-gather (factor 1)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return latency + factor * (ranks - 1) / ranks * nbytes / bandwidth


def _bandwidth(span: int, profile: DeviceProfile) -> float:
    """A group whose ranks lie within `span` consecutive global ranks: inside one node if span fits in one."""
    return profile.intra_node_bw if span <= profile.gpus_per_node else profile.inter_node_bw


def _stage_shapes(cfg, pp: int):
    """Per stage: (forward FLOPs per sample, ViT blocks, other blocks, text tower FLOPs, ViT-block FLOPs share)."""
    parts = forward_flops_breakdown(cfg)
    total = sum(parts.values())
    text_blocks = cfg.text_layers + cfg.decoder_layers
    if pp == 1:
        text_tower = parts.get("text", 0) + parts.get("text_attention", 0)
        return [(total, cfg.vision_layers, text_blocks + 2, text_tower)]
    split = pipeline_split(cfg, pp)
    flops = split.stage_flops()
    out = []
    for s, blocks in enumerate(split.blocks):
        last = s == pp - 1
        out.append((flops[s], len(blocks), text_blocks + 2 if last else 0, split.text_tower_flops if last else 0))
    return out


def _elementwise_elements(cfg, vit_blocks: int, text_side: bool, checkpointing: bool) -> float:
    """Elements per sample that the non-matmul work (LayerNorms, residual adds, GELU, the attention output's
    transpose) reads and writes in forward + backward, memory-bound: per token of a block with width W and MLP
    width M about 26 W + 5 M (two LayerNorms 2 x 5W, two residual adds 2 x 6W, GELU 5M, the transpose 4W), and
    11 W + 2 M more when the block's forward is recomputed."""
    def block(tokens: int, w: int, m: int) -> float:
        return tokens * ((26 * w + 5 * m) + ((11 * w + 2 * m) if checkpointing else 0))

    elements = vit_blocks * block(cfg.image_tokens, cfg.vision_width, cfg.vision_mlp_dim)
    if text_side:
        elements += cfg.text_layers * block(cfg.context_length + 1, cfg.text_width, cfg.text_mlp_dim)
        elements += cfg.decoder_layers * (block(cfg.context_length - 1, cfg.text_width, cfg.text_mlp_dim)
                                          + (cfg.context_length - 1) * 10 * cfg.text_width)
    return elements


def _tp_comm_seconds(cfg, layout: Layout, profile: DeviceProfile, e: int) -> tuple[float, float]:
    """(seconds of tensor-parallel all-reduces per micro-batch for the ViT blocks, for everything else)."""
    t = layout.tp
    if t == 1:
        return 0.0, 0.0
    bandwidth = _bandwidth(t, profile)
    vit = rest = 0.0
    for term in analytic_comm(cfg, layout.micro_batch, e, layout.checkpointing):
        seconds = term["calls"] * _ring(term["elements"] * term["element_bytes"], t, bandwidth,
                                        profile.collective_latency_s)
        if "ViT" in term["what"] and "pooler" not in term["what"]:
            vit += seconds
        else:
            rest += seconds
    return vit, rest


# The share of the compute that data-parallel communication can hide behind (ZeRO-1/2's reduce-scatter under the
# last micro-batch's backward, ZeRO-3's prefetched gathers and reduce-scatters under each micro-batch's compute):
# an assumption (streams contend for memory bandwidth, the first gather and the last reduce are never hidden), not
# measured on a GPU here.
OVERLAP = 0.7
SIMULATED = 64  # micro-batches simulated; beyond, every more one adds the bottleneck stage's forward + backward


def _makespan(pp: int, m: int, text_ahead: int, forward: tuple, text: float, ratio: float, period: float) -> float:
    """The 1F1B (+ text-ahead) step's makespan, simulated; for m > SIMULATED the steady state is extrapolated
    (exact once the schedule is periodic: each extra micro-batch costs the slowest stage one forward + backward)."""
    from megacoca.parallel.pipeline.schedule import simulate

    simulated = min(m, SIMULATED)
    makespan = simulate(pp, simulated, min(text_ahead, simulated), forward=list(forward), text=text,
                        backward_ratio=ratio)["makespan"]
    return makespan + (m - simulated) * period


def predict_time(cfg, layout: Layout, profile: DeviceProfile) -> StepTime:
    e = 2 if layout.precision == "bf16" else 4
    rate = profile.matmul_flops[layout.precision]
    b, t, pp, m = layout.micro_batch, layout.tp, layout.pp, layout.grad_accum
    shapes = _stage_shapes(cfg, pp)
    vit_comm, rest_comm = _tp_comm_seconds(cfg, layout, profile, e)
    p2p = 0.0
    if pp > 1:
        p2p = _ring(b * cfg.image_tokens * cfg.vision_width * e, 2, _bandwidth(t * pp, profile),
                    profile.collective_latency_s, factor=1.0)  # one send: 2 ranks, (n-1)/n = 1/2 x 2
    tensors = [len(stage.numels) for stage in stage_tensors(cfg, t, pp)]
    forward, backward = [], []
    compute_total = 0.0
    for s, (flops, vit_blocks, other_blocks, text_tower) in enumerate(shapes):
        recompute = 0.0
        if layout.checkpointing:
            recompute = flops  # every block's forward again (the poolers and heads are not recomputed: small)
        measured_blocks = (profile.block_flops or {}).get(layout.precision)
        block_rate = measured_blocks or rate
        fwd = flops * b / t / block_rate
        bwd = (2 * flops + recompute) * b / t / block_rate
        overhead = (vit_blocks + other_blocks) * profile.block_overhead(layout.precision) \
            * (4 / 3 if layout.checkpointing else 1) + tensors[s] * profile.tensor_overhead(layout.zero) \
            + (profile.micro_overhead(layout.zero) if s == pp - 1 else 0.0)  # the loss's side of the model
        if not measured_blocks:  # the work between the matmuls, unless the block rate already holds it
            overhead += e * b / t * _elementwise_elements(cfg, vit_blocks, s == pp - 1,
                                                          layout.checkpointing) / profile.memory_bw
        comm = vit_comm * (vit_blocks / max(cfg.vision_layers, 1)) + (rest_comm if s == pp - 1 else 0.0)
        fwd += overhead / 3 + comm / 2 + (p2p if s > 0 else 0.0)
        bwd += 2 * overhead / 3 + comm / 2 + (p2p if s < pp - 1 else 0.0)
        forward.append(fwd)
        backward.append(bwd)
        compute_total = max(compute_total, fwd + bwd)
    if pp == 1:
        pipeline = m * (forward[0] + backward[0])
        text = 0.0
    else:
        rate_per_sample = b / t / rate
        text = shapes[-1][3] * rate_per_sample
        ratio = max(backward[s] / forward[s] for s in range(pp))
        last_forward = [f for f in forward]
        last_forward[-1] = max(forward[-1] - text, 0.0)
        pipeline = _makespan(pp, m, layout.text_ahead, tuple(last_forward), text, ratio,
                             max(f + b for f, b in zip(forward, backward)))

    # data parallelism, per rank of the largest stage
    stages = stage_tensors(cfg, t, pp)
    params = max(stage.elements for stage in stages)
    dp = layout.dp
    dp_bw = _bandwidth(dp * t * pp, profile) if dp > 1 else profile.intra_node_bw
    grad_bytes = e * params
    latency = profile.collective_latency_s
    last_backward = max(backward)
    if layout.zero == 0:
        dp_exposed = _ring(grad_bytes, dp, dp_bw, latency)
        after_step = 0.0
        partition = params
    elif layout.zero in (1, 2):
        reduce = _ring(grad_bytes, dp, dp_bw, latency, factor=1.0)
        dp_exposed = max(reduce - OVERLAP * last_backward, 0.0) + (latency if dp > 1 else 0.0)
        after_step = _ring(e * params, dp, dp_bw, latency, factor=1.0)
        partition = -(-params // dp)
    else:
        per_micro = 3 * _ring(e * params, dp, dp_bw, latency, factor=1.0)
        exposed_per_micro = max(per_micro - OVERLAP * (max(forward) + last_backward), 0.0)
        dp_exposed = m * exposed_per_micro + (_ring(e * params / max(cfg.vision_layers, 1), dp, dp_bw, latency,
                                                   factor=1.0) if dp > 1 else 0.0)
        after_step = 0.0
        partition = -(-params // dp)
    optimizer = 32 * partition / profile.memory_bw + profile.step_overhead(layout.zero)
    seconds = pipeline + dp_exposed + after_step + optimizer
    samples = layout.global_batch / seconds
    peak = profile.peak_flops.get(layout.precision)
    mfu = train_flops_per_sample(cfg) * samples / (layout.world * peak) if peak else None
    parts = {"compute and TP (pipeline makespan)" if pp > 1 else "compute and TP": pipeline,
             "tensor-parallel all-reduces": m * (vit_comm + rest_comm) if pp == 1 else (vit_comm + rest_comm) * m,
             "data-parallel exposed": dp_exposed + after_step, "optimizer step": optimizer,
             "pipeline bubble": pipeline - m * compute_total if pp > 1 else 0.0}
    return StepTime(seconds, samples, samples / layout.world, mfu, parts)
