"""Step time of a CoCa training layout on a device profile (megacoca.plan.profile).

Per micro-batch of b samples on pipeline stage s and one tensor rank:
- compute: the stage's `Work` per sample (`stage_work`): matmul FLOPs (megacoca.metrics.flops, x 3 for forward +
  backward, + the recomputed forwards under activation checkpointing) / tp; the elements the memory-bound work
  between the matmuls reads and writes (LayerNorms and residual adds whole on every tensor rank, GELU and the rest
  split); attention-score elements and rows / tp. A calibrated profile divides each by its own rate, fitted on
  real blocks and fused attention calls (megacoca.plan.fit); a preset divides the FLOPs by its matmul rate
  and the elementwise bytes by its memory bandwidth. Plus the profile's fixed costs per transformer block, per
  parameter tensor, per parameter and per micro-batch (DeepSpeed's engine: measured on real engines), and per
  sample and micro-batch on the stage that holds the losses (megacoca's Trainer beyond the blocks: measured on
  real Trainer steps);
- tensor parallelism: the all-reduces Megatron's scheme issues (megacoca.plan.comm.analytic_comm, split between
  the stages like the blocks), each a ring: latency + 2 (t-1)/t x bytes / bandwidth, plus the profile's measured
  cost per call, on the critical path;
- pipeline: the stage's activations (b x image tokens x width) sent forward and their gradient back, and the
  profile's measured cost per micro-batch of the runner.
The step: without a pipeline, m micro-batches one after the other; with one, the 1F1B (+ text-ahead) schedule
simulated by megacoca.parallel.pipeline.schedule.simulate with each stage's times. Then data parallelism
(`dp_comm`, rings):
- ZeRO-0: an all-reduce of the gradients after backward (not overlapped); ZeRO-1: a reduce-scatter of the
  gradients under the last micro-batch's backward (what exceeds `profile.overlap` of it is exposed), then an
  all-gather of the updated weights; ZeRO-2: the reduce-scatter under every backward, the all-gather after the
  step; ZeRO-3: per micro-batch, the weights gathered in forward and again in backward (and for the recompute
  under checkpointing) and the gradients reduce-scattered, prefetched under compute (what exceeds
  `profile.overlap` of the micro-batch's compute is exposed).
- the optimizer step: the profile's seconds per parameter of its partition (measured, or Adam's 32 bytes
  streamed at memory_bw), plus its fixed step cost.
Bandwidths: a group within one node (its ranks span at most gpus_per_node consecutive ranks) uses the intra-node
figure, else the inter-node one; a ring's latency grows with its ranks (`DeviceProfile.latency`). Ranks are laid
out (dp, pp, tp) with tp fastest (megacoca.parallel.dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megacoca.config.layout import Layout
from megacoca.metrics.flops import forward_flops_breakdown, train_flops_per_sample
from megacoca.parallel.pipeline.schedule import simulate
from megacoca.plan.comm import analytic_comm
from megacoca.plan.params import pipeline_split, stage_tensors, text_tower_tensors
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


def _stages(cfg, pp: int) -> list[tuple[int, bool]]:
    """Per pipeline stage: (ViT blocks it holds, whether it holds the text side), as the trainer splits them."""
    if pp == 1:
        return [(cfg.vision_layers, True)]
    split = pipeline_split(cfg, pp)
    return [(len(blocks), s == pp - 1) for s, blocks in enumerate(split.blocks)]


@dataclass(frozen=True)
class Work:
    """What one sample costs on one tensor rank, forward + backward (+ recompute), in the quantities a block's time
    is fitted to (megacoca.plan.fit): matmul FLOPs, elements the memory-bound work between the matmuls
    reads and writes (LayerNorms, residual adds, GELU, the attention output's transpose, the caption logits'
    softmax), and attention-score elements (heads x queries x keys) and rows (heads x queries): a fused attention
    kernel on a CPU costs per block of query rows whatever their length, and per score element."""

    flops: float
    elementwise: float
    attention: float = 0.0
    attention_rows: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.elementwise + other.elementwise, self.attention + other.attention,
                    self.attention_rows + other.attention_rows)


def block_elementwise(tokens: int, width: int, mlp_dim: int, tp: int = 1, checkpointing: bool = False) -> float:
    """Elements per sample one transformer block's memory-bound work reads and writes in forward + backward, on one
    of `tp` tensor ranks: per token, replicated on every tensor rank (Megatron's layout without sequence
    parallelism) two LayerNorms (2 x 5W) and two residual adds (2 x 6W); split over the tensor ranks GELU (5M) and
    the attention output's transpose (4W); when the block's forward is recomputed, 9W + (2W + 2M) / tp more."""
    replicated = 22 * width + (9 * width if checkpointing else 0)
    split = 5 * mlp_dim + 4 * width + ((2 * width + 2 * mlp_dim) if checkpointing else 0)
    return tokens * (replicated + split / tp)


def stage_work(cfg, vit_blocks: int, text_side: bool, tp: int = 1, checkpointing: bool = False,
               text_tower_only: bool = False, patch_embedding: bool = False) -> Work:
    """Work per sample of a pipeline stage holding `vit_blocks` ViT blocks (and the text side: poolers, text tower,
    decoder, heads and losses, if `text_side`) on one of `tp` tensor ranks; `text_tower_only`: the unimodal text
    tower alone (what text-ahead runs early); `patch_embedding`: the stage embeds the patches. Matmul FLOPs are
    megacoca.metrics.flops' (x 3 for forward + backward, + one forward of every recomputed block). A block's own
    forward is a third of its work without checkpointing (`embedding_pass_work` uses that)."""
    parts = forward_flops_breakdown(cfg)
    passes = 4 if checkpointing else 3
    n, s = cfg.image_tokens, cfg.context_length
    heads_v, heads_t = cfg.vision_heads, cfg.text_heads
    text = Work(passes * (parts["text"] + parts["text_attention"]) / tp,
                cfg.text_layers * block_elementwise(s + 1, cfg.text_width, cfg.text_mlp_dim, tp, checkpointing),
                passes * cfg.text_layers * heads_t * (s + 1) ** 2 / tp,
                passes * cfg.text_layers * heads_t * (s + 1) / tp)
    if text_tower_only:
        return text
    work = Work(0.0, 0.0, 0.0)
    if vit_blocks:
        patch = 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * cfg.vision_width
        per_block = (parts["vision"] - patch + parts["vision_attention"]) / max(cfg.vision_layers, 1)
        work += Work((passes * vit_blocks * per_block + (3 * patch if patch_embedding else 0)) / tp,
                     vit_blocks * block_elementwise(n, cfg.vision_width, cfg.vision_mlp_dim, tp, checkpointing),
                     passes * vit_blocks * heads_v * n * n / tp, passes * vit_blocks * heads_v * n / tp)
    if text_side:
        d, q = cfg.pooled_width, cfg.caption_queries
        pooled = q if cfg.pooler_layout == "paper" else q - 1
        side_flops = (parts["poolers"] + parts["poolers_attention"] + parts["decoder"] + parts["decoder_attention"]
                      + parts["heads"])
        mlps = 2 if cfg.decoder_mlp_after_self_attn else 1
        decoder = cfg.decoder_layers * (block_elementwise(s, cfg.text_width, mlps * cfg.text_mlp_dim, tp,
                                                          checkpointing) + s * 10 * cfg.text_width)
        poolers = 10 * n * cfg.vision_width + block_elementwise(q, d, 0, tp)  # the image LayerNorm; the queries
        logits = 6 * (s - 1) * cfg.vocab_size / tp  # the caption cross-entropy's softmax, forward and backward
        contrastive_pooler = cfg.pooler_layout == "paper"  # its one query over the caption queries (or the image)
        contrastive_keys = (q if cfg.pooler_cascade else n) if contrastive_pooler else 0
        attention = 3 * cfg.pooler_heads * (q * n + contrastive_keys) / tp \
            + passes * cfg.decoder_layers * heads_t * (s * s + s * pooled) / tp
        rows = 3 * cfg.pooler_heads * (q + (1 if contrastive_pooler else 0)) / tp \
            + passes * cfg.decoder_layers * heads_t * 2 * s / tp
        work += text + Work(3 * side_flops / tp + (passes - 3) * (parts["decoder"] + parts["decoder_attention"]) / tp,
                            decoder + poolers + logits, attention, rows)
    return work


def embedding_pass_work(cfg, vit_blocks: int, text_side: bool, tp: int = 1, patch_embedding: bool = False) -> Work:
    """Work per sample of global negatives' first pass on a stage (megacoca.schedules.negatives): the forward of its
    ViT blocks and, on the last stage, of the poolers and the text tower; no multimodal decoder, heads or backward."""
    work = stage_work(cfg, vit_blocks, False, tp, patch_embedding=patch_embedding)
    if text_side:
        parts = forward_flops_breakdown(cfg)
        n, q, d = cfg.image_tokens, cfg.caption_queries, cfg.pooled_width
        keys = q if cfg.pooler_layout == "paper" and cfg.pooler_cascade else n
        poolers = Work(3 * (parts["poolers"] + parts["poolers_attention"]) / tp,
                       10 * n * cfg.vision_width + block_elementwise(q, d, 0, tp),
                       3 * cfg.pooler_heads * (q * n + keys) / tp, 3 * cfg.pooler_heads * (q + 1) / tp)
        work += stage_work(cfg, 0, True, tp, text_tower_only=True) + poolers
    return Work(work.flops / 3, work.elementwise / 3, work.attention / 3, work.attention_rows / 3)


def work_seconds(work: Work, profile: DeviceProfile, precision: str) -> float:
    """Seconds per sample of `work`: with a calibrated profile's block rates, each quantity at its own fitted rate;
    else (a preset) the matmul FLOPs at the matmul rate and the elementwise elements' bytes at the memory bandwidth
    (a fused attention kernel keeps its scores on chip: no separate cost)."""
    rates = (profile.block_rates or {}).get(precision)
    if rates:
        return sum(getattr(work, kind) / rate for kind, rate in rates.items() if rate)
    element_bytes = 4 if precision == "fp32" else 2
    return work.flops / profile.matmul_flops[precision] + element_bytes * work.elementwise / profile.memory_bw


def _tp_comm_seconds(cfg, layout: Layout, profile: DeviceProfile, e: int) -> tuple[float, float]:
    """(seconds of tensor-parallel all-reduces per micro-batch for the ViT blocks, for everything else): rings, plus
    the profile's measured cost per call beyond the ring."""
    t = layout.tp
    if t == 1:
        return 0.0, 0.0
    bandwidth = _bandwidth(t, profile)
    vit = rest = 0.0
    for term in analytic_comm(cfg, layout.micro_batch, e, layout.checkpointing):
        seconds = term["calls"] * (_ring(term["elements"] * term["element_bytes"], t, bandwidth, profile.latency(t))
                                   + profile.parallel_overhead("tp"))
        if term["part"] == "vision":
            vit += seconds
        else:
            rest += seconds
    return vit, rest


def dp_comm(zero: int, nbytes: float, dp: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """Data-parallel traffic of one rank holding `nbytes` of gradients (and as many of weights) under a ZeRO stage,
    as rings: (per micro-batch, per step). ZeRO-0: an all-reduce per step; ZeRO-1: a reduce-scatter and the updated
    weights' all-gather per step; ZeRO-2: a reduce-scatter per micro-batch, the all-gather per step; ZeRO-3: the
    weights gathered in forward and again in backward and the gradients reduce-scattered, per micro-batch."""
    one = _ring(nbytes, dp, bandwidth, latency, factor=1.0)
    return {0: (0.0, _ring(nbytes, dp, bandwidth, latency)), 1: (0.0, 2 * one), 2: (one, one),
            3: (3 * one, 0.0)}[zero]


SIMULATED = 64  # micro-batches simulated; beyond, every more one adds the bottleneck stage's forward + backward


def _makespan(pp: int, m: int, text_ahead: int, forward: tuple, text: float, ratio: float, period: float) -> float:
    """The 1F1B (+ text-ahead) step's makespan, simulated; for m > SIMULATED the steady state is extrapolated
    (exact once the schedule is periodic: each extra micro-batch costs the slowest stage one forward + backward)."""
    simulated = min(m, SIMULATED)
    makespan = simulate(pp, simulated, min(text_ahead, simulated), forward=list(forward), text=text,
                        backward_ratio=ratio)["makespan"]
    return makespan + (m - simulated) * period


def _zero3_passes(layout: Layout) -> float:
    """ZeRO-3 gathers a block's parameters (with its hooks, per tensor) for every forward it runs: a recomputed
    forward is a fourth pass over them after forward, backward and the gradients' reduce-scatter."""
    return 4 / 3 if layout.zero_stage == 3 and layout.checkpointing else 1.0


def _stage_times(cfg, layout: Layout, profile: DeviceProfile, e: int, comm: tuple[float, float]
                 ) -> tuple[list[float], list[float], float]:
    """Seconds of one micro-batch's forward and of its backward on every pipeline stage (compute, the engine's and
    the Trainer's fixed costs, the stage's share of the tensor-parallel all-reduces `comm` (ViT, the rest), the
    pipeline's sends), and the longest forward + backward of a stage."""
    b, t, pp = layout.micro_batch, layout.tp, layout.pp
    vit_comm, rest_comm = comm
    p2p = 0.0
    if pp > 1:
        p2p = _ring(b * cfg.image_tokens * cfg.vision_width * e, 2, _bandwidth(t * pp, profile),
                    profile.latency(2), factor=1.0)  # one send: 2 ranks, (n-1)/n = 1/2 x 2
    shards = stage_tensors(cfg, t, pp)  # each stage's parameters on one tensor rank
    zero, zero3_passes, precision = layout.zero_stage, _zero3_passes(layout), layout.precision
    forward, backward = [], []
    compute_total = 0.0
    text_blocks = cfg.text_layers + cfg.decoder_layers + 2  # + the poolers
    for s, (vit_blocks, text_side) in enumerate(_stages(cfg, pp)):
        work = stage_work(cfg, vit_blocks, text_side, t, layout.checkpointing, patch_embedding=s == 0)
        per_sample = work_seconds(work, profile, layout.precision) + (profile.sample_overhead_s if text_side else 0.0)
        compute = b * per_sample \
            + shards[s].elements * profile.micro_param(zero, precision) * zero3_passes  # the engine, per parameter
        blocks = vit_blocks + (text_blocks if text_side else 0)
        overhead = blocks * profile.block_overhead(layout.precision) * (4 / 3 if layout.checkpointing else 1) \
            + len(shards[s].numels) * profile.tensor_overhead(zero, precision) * zero3_passes \
            + (profile.micro_overhead(zero, precision) if text_side else 0.0) \
            + (profile.parallel_overhead("pp") if pp > 1 else 0.0)
        stage_comm = vit_comm * (vit_blocks / max(cfg.vision_layers, 1)) + (rest_comm if text_side else 0.0)
        # backward = 2 x forward in FLOPs; a recomputed forward runs inside backward
        forward_share = 1 / (4 if layout.checkpointing else 3)
        fwd = (compute + overhead) * forward_share + stage_comm / 2 + (p2p if s > 0 else 0.0)
        bwd = (compute + overhead) * (1 - forward_share) + stage_comm / 2 + (p2p if s < pp - 1 else 0.0)
        forward.append(fwd)
        backward.append(bwd)
        compute_total = max(compute_total, fwd + bwd)
    return forward, backward, compute_total


def _pipeline_seconds(cfg, layout: Layout, profile: DeviceProfile, forward: list[float],
                      backward: list[float]) -> float:
    """The step's micro-batches: one after the other without a pipeline, else the simulated 1F1B (+ text-ahead)
    makespan, the last stage's text tower (what text-ahead runs early) taken out of its forward."""
    pp, m = layout.pp, layout.grad_accum
    if pp == 1:
        return m * (forward[0] + backward[0])
    text_work = stage_work(cfg, 0, True, layout.tp, layout.checkpointing, text_tower_only=True)
    text = layout.micro_batch * work_seconds(text_work, profile, layout.precision) \
        / (4 if layout.checkpointing else 3)
    ratio = max(backward[s] / forward[s] for s in range(pp))
    last_forward = list(forward)
    last_forward[-1] = max(forward[-1] - text, 0.0)
    apart = separate_text_forward_s(cfg, layout, profile)  # a text-ahead forward's own cost, beyond its compute
    periods = [f + b for f, b in zip(forward, backward)]
    periods[-1] += apart
    return _makespan(pp, m, layout.text_ahead, tuple(last_forward), text + apart, ratio, max(periods))


def separate_text_forward_s(cfg, layout: Layout, profile: DeviceProfile) -> float:
    """What a text-ahead forward run apart costs beyond its compute: under ZeRO-3 without keep-gathered it is an
    engine forward of its own (the forward's share, a third, of the engine's fixed cost per micro-batch and of its
    per-tensor gather and release for the text tower's tensors; measured on CPU ranks: text-ahead under ZeRO-3 took a
    pipelined step from 1.58x to 1.78x of DeepSpeed's at m = 8, docs/benchmarks.md "Pipeline parallelism"); nothing
    otherwise (ZeRO-1/2 keep every weight whole, keep-gathered holds them for the step)."""
    if not layout.text_ahead or layout.zero_stage != 3 or layout.keep_gathered:
        return 0.0
    return (profile.micro_overhead(3, layout.precision)
            + text_tower_tensors(cfg, layout.tp) * profile.tensor_overhead(3, layout.precision)) / 3


def _dp_seconds(cfg, layout: Layout, profile: DeviceProfile, e: int, params: int, forward: list[float],
                backward: list[float]) -> tuple[float, float]:
    """(data-parallel traffic exposed during the step, traffic after the optimizer step), per rank of the largest
    stage (`params` parameters)."""
    m, t, pp, dp = layout.grad_accum, layout.tp, layout.pp, layout.dp
    dp_bw = _bandwidth(dp * t * pp, profile) if dp > 1 else profile.intra_node_bw
    per_micro, per_step = dp_comm(layout.zero_stage, e * params, dp, dp_bw, profile.latency(dp))
    per_micro *= _zero3_passes(layout)
    overlap, last_backward = profile.overlap, max(backward)
    if layout.zero_stage == 0:  # the all-reduce after the last backward
        return per_step, 0.0
    if layout.zero_stage == 1:  # the reduce-scatter under the last backward, the weights' all-gather after the step
        reduce = after_step = per_step / 2
        return max(reduce - overlap * last_backward, 0.0), after_step
    if layout.zero_stage == 2:  # a reduce-scatter under every backward, the all-gather after the step
        return m * max(per_micro - overlap * last_backward, 0.0), per_step
    # ZeRO-3: gathers and reduce-scatters prefetched under each micro-batch's compute; the first gather exposed
    dp_exposed = m * max(per_micro - overlap * (max(forward) + last_backward), 0.0) \
        + (_ring(e * params / max(cfg.vision_layers, 1), dp, dp_bw, profile.latency(dp), factor=1.0)
           if dp > 1 else 0.0)
    return dp_exposed, 0.0


def _negatives_seconds(cfg, layout: Layout, profile: DeviceProfile, e: int, params: int) -> float:
    """What `loss.negatives: global` adds to a step (megacoca.schedules.negatives): the first pass, every micro-batch
    forward through each stage's share of the towers (pipelined like a forward-only fill: the sum of the stages' times
    for the first, the slowest stage's for each other), with the engine's per-block cost; under ZeRO-3 (unless the
    pipeline keeps the stage gathered) one more gather of the stage's parameters per micro-batch, exposed beyond what
    the pass's compute hides; and the loss between the passes: the embeddings all-gathered over dp in fp32, their
    gradient all-reduced back, and the logits of this rank's rows against the global batch, forward and backward."""
    if layout.negatives != "global":
        return 0.0
    b, t, m, dp = layout.micro_batch, layout.tp, layout.grad_accum, layout.dp
    stages = []
    for s, (vit_blocks, text_side) in enumerate(_stages(cfg, layout.pp)):
        work = embedding_pass_work(cfg, vit_blocks, text_side, t, patch_embedding=s == 0)
        blocks = vit_blocks + (cfg.text_layers + 2 if text_side else 0)
        stages.append(b * work_seconds(work, profile, layout.precision)
                      + blocks * profile.block_overhead(layout.precision) / 3)
    sweep = sum(stages) + (m - 1) * max(stages)
    dp_bw = _bandwidth(dp * t * layout.pp, profile) if dp > 1 else profile.intra_node_bw
    if layout.zero_stage == 3 and not layout.keep_gathered:
        gather = _ring(e * params, dp, dp_bw, profile.latency(dp), factor=1.0)
        sweep += m * max(gather - profile.overlap * max(stages), 0.0)
    rows, total = b * m, layout.global_batch
    features = 2 * total * cfg.embed_dim * 4
    loss = _ring(features, dp, dp_bw, profile.latency(dp), factor=1.0) + _ring(features, dp, dp_bw, profile.latency(dp))
    loss += 3 * 2 * 2 * rows * total * cfg.embed_dim / profile.matmul_flops.get("fp32", profile.matmul_flops[
        layout.precision])
    return sweep + loss


def predict_time(cfg, layout: Layout, profile: DeviceProfile) -> StepTime:
    """The step time of `layout` on `profile` (see the module docstring), with its parts by cause."""
    e = 2 if layout.precision == "bf16" else 4
    pp, m = layout.pp, layout.grad_accum
    vit_comm, rest_comm = _tp_comm_seconds(cfg, layout, profile, e)
    forward, backward, compute_total = _stage_times(cfg, layout, profile, e, (vit_comm, rest_comm))
    pipeline = _pipeline_seconds(cfg, layout, profile, forward, backward)
    params = max(stage.elements for stage in stage_tensors(cfg, layout.tp, pp))  # the largest stage's, one tensor rank
    dp_exposed, after_step = _dp_seconds(cfg, layout, profile, e, params, forward, backward)
    partition = params if layout.zero_stage == 0 else -(-params // layout.dp)
    optimizer = partition * profile.step_param(layout.zero_stage, layout.precision) \
        + profile.step_overhead(layout.zero_stage, layout.precision)
    negatives = _negatives_seconds(cfg, layout, profile, e, params)
    seconds = pipeline + dp_exposed + after_step + optimizer + negatives
    samples = layout.global_batch / seconds
    peak = profile.peak_flops.get(layout.precision)
    mfu = train_flops_per_sample(cfg) * samples / (layout.world * peak) if peak else None
    parts = {"compute and TP (pipeline makespan)" if pp > 1 else "compute and TP": pipeline,
             "tensor-parallel all-reduces": m * (vit_comm + rest_comm) if pp == 1 else (vit_comm + rest_comm) * m,
             "data-parallel exposed": dp_exposed + after_step, "optimizer step": optimizer,
             "pipeline bubble": pipeline - m * compute_total if pp > 1 else 0.0,
             "global negatives' first pass and loss": negatives}
    return StepTime(seconds, samples, samples / layout.world, mfu, parts)
