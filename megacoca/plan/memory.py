"""Memory per rank of a CoCa training layout: model states by ZeRO stage, activations by tower, DeepSpeed's buffers.

Model states (per rank of pipeline stage s, tensor rank 0; P = that stage's parameter elements on one tensor rank,
from the project's own meta-device build: megacoca.plan.params; e = 2 bytes in bf16, 4 in fp32; dp = the
data-parallel size; B = `reduce_bucket_size`), as DeepSpeed 0.19.8 keeps them with megacoca's configs, and as
measured by megacoca.profiling.measure on CPU ranks:

| ZeRO | weights | gradients | fp32 masters + Adam m, v | step temporaries (G: largest param group) |
|---|---|---|---|---|
| 0 (fp32 only) | 4P | 4P after backward (+ 4P flattened for the all-reduce) | 8P (the weights are the masters) | 3 x 4 x largest tensor |
| 1 | eP | 2eB (both reduce buckets, allocated whole) (+ eP carried between micro-batches) | 12P/dp | 2 x 4G/dp |
| 2 | eP | 2eB + eP/dp | 12P/dp | 2 x 4G/dp |
| 3 | eP/dp + persistent tensors whole | eB + eP/dp | 12P/dp | 3 x 4G/dp |

ZeRO-1/2 allocate two reduce buckets with `overlap_comm` (the shipped configs), one without (DeepSpeed's default for
those stages); a config that leaves reduce_bucket_size out gets DeepSpeed's 5e8 (`ZeroBuffers.from_ds_config`).

ZeRO-3 gathers the weights for forward and backward; with DeepSpeed's default `stage3_max_live_parameters` (1e9)
a model up to that size stays gathered whole through both, and at the end of forward the all-gather's output and
the parameters' storage are both live (2eP; eP in backward). Larger models hold up to max_live + prefetch bucket.
Under a pipeline with `parallel.pipeline_keep_gathered`, a stage's whole parameters (eP, less the persistent ones)
stay gathered from the step's first forward to just before the optimizer step, whatever max_live says.

Activations (saved for backward; the per-layer counts follow megacoca/models/coca/layers.py, the Korthikanti et
al. 2022 accounting without dropout and with a fused attention kernel that saves q, k, v, its output and the
log-sum-exp but no L x L scores; checked against what autograd really saves, tests/unit/plan/test_memory.py). A
self-attention block over s tokens of width W, MLP width M, tensor degree t keeps, in elements:

    b * s * (2W + (4 or 5) W / t) + b * s * (2W + 2M / t)    (LayerNorm in/out stay whole on every tensor rank;
                                                              q, k, v, the attention output (+ its transpose copy
                                                              for causal attention); fc1 out, GELU out)

A cross-attention block over c context tokens of width D: b s (W + 3W/t) + b c (D + 2W/t) + b s (W + 2M/t). With
activation checkpointing (each ViT block, text block and decoder layer) a block keeps only its input, b s W, and
the block being recomputed in backward holds its full activations. The caption loss on torch kernels keeps fp32
log-probabilities (4 b (L-1) V/t bytes) and, while it runs backward, (8 + e) b (L-1) V/t; the Triton kernel keeps
none. Under a pipeline stage s of pp holds min(m, pp - s) micro-batches' activations (1F1B), the last stage also
the text towers run ahead of the micro-batch in flight (`text_ahead` - 1 more); stage 0 holds the images and token
ids of all m micro-batches (it reads them up front and sends the token ids to the last stage, which holds them too;
the stages between read nothing); without a pipeline, micro-batches run one after the other.

The peak is the largest of four moments: the end of forward, backward, ZeRO-0's gradient all-reduce and the
optimizer step, each the always-live states plus what that moment adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megacoca.config.layout import Layout
from megacoca.parallel.overlap import text_tower_tensor_numels
from megacoca.parallel.pipeline.schedule import auto_text_ahead
from megacoca.plan.params import pipeline_split, stage_tensors, vit_blocks_per_stage

MB = 1e6


@dataclass(frozen=True)
class ZeroBuffers:
    """The DeepSpeed buffer sizes (elements) that memory depends on; defaults as in ds_configs/*.json and
    DeepSpeed 0.19.8's own defaults."""

    reduce_bucket: int = 50_000_000
    prefetch_bucket: int = 50_000_000
    persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    allreduce_bucket: int = 500_000_000  # ZeRO-0's flattened gradient all-reduce
    reduce_buffers: int = 2  # ZeRO-1/2: two reduce buckets with overlap_comm (the shipped configs), else one

    @classmethod
    def from_ds_config(cls, ds: dict) -> "ZeroBuffers":
        """The sizes a DeepSpeed config sets; a key it leaves out takes DeepSpeed's own default (reduce_bucket_size
        5e8, not the shipped configs' 5e7: ds_configs/zero0_fp32.json with its stage raised allocates 5e8)."""
        zero = ds.get("zero_optimization", {})
        overlap = zero.get("overlap_comm", int(zero.get("stage", 0)) == 3)  # DeepSpeed: on for ZeRO-3 only
        return cls(int(float(zero.get("reduce_bucket_size", 500_000_000))),
                   int(float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket))),
                   int(float(zero.get("stage3_param_persistence_threshold", cls.persistence_threshold))),
                   int(float(zero.get("stage3_max_live_parameters", cls.max_live_parameters))),
                   reduce_buffers=2 if overlap else 1)


@dataclass
class StageMemory:
    """Bytes per rank of one pipeline stage at its peak, by category (the tracker's categories,
    megacoca.profiling.memory_tracker): `phase` is when the peak falls ("forward/backward", "gradient all-reduce",
    "step")."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    phase: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> float:
        return self.states + self.activations + self.transient


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def state_bytes(numels, layout: Layout, buffers: ZeroBuffers, groups=(), text_held: int = 0) -> dict:
    """What one rank holding the parameters `numels` (one tensor rank of one stage) keeps: "params", "grads" and
    "optimizer" at all times, and what the moments of a step add (measured with megacoca.profiling.measure):
    "gathered" / "gathered_backward" (ZeRO-3's whole weights: at the end of forward both the all-gather's output
    and the parameters' storage are live, in backward one copy), "accumulated" (gradients carried between
    micro-batches), "buckets" (ZeRO-1/2's reduce buckets and gradient partition, allocated in backward after the
    loss's, freed before the step), "step_grads" and "step" (the optimizer step's gradient partition and
    temporaries: three buffers the size of the largest param group's fp32 partition), "all_grads" and "reduce"
    (ZeRO-0's gradients after backward and their flattened all-reduce copy). `text_held`: elements of the text
    tower that ZeRO-3 partitions, held whole for the step when `layout.text_overlap`."""
    e = 2 if layout.precision == "bf16" else 4
    p = sum(numels)
    dp = layout.dp
    part = sum(_ceil_div(n, dp) for n in numels)  # ZeRO-3 pads each tensor; ZeRO-1/2 pad the flat group (tiny)
    step = 3 * 4 * _ceil_div(max(groups) if groups else p, dp)
    accumulating = layout.grad_accum > 1
    out = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "gathered": 0.0, "gathered_backward": 0.0,
           "accumulated": 0.0, "buckets": 0.0, "step_grads": 0.0, "step": step, "all_grads": 0.0, "reduce": 0.0}
    if layout.zero_stage == 0:
        if layout.precision != "fp32":
            raise ValueError("ZeRO-0 trains in fp32 here (bf16 needs ZeRO-1 or more)")
        out.update(params=4 * p, optimizer=8 * p, accumulated=4 * p if accumulating else 0.0, all_grads=4 * p,
                   reduce=4 * min(p, buffers.allreduce_bucket), step=3 * 4 * (max(numels) if numels else 0),
                   step_grads=4 * p)
    elif layout.zero_stage in (1, 2):
        out.update(params=e * p, optimizer=12 * _ceil_div(p, dp),
                   accumulated=e * p if layout.zero_stage == 1 and accumulating else 0.0,
                   buckets=buffers.reduce_buffers * e * buffers.reduce_bucket
                   + (e * _ceil_div(p, dp) if layout.zero_stage == 2 else 0.0),
                   step_grads=e * _ceil_div(p, dp))
    else:
        persistent = sum(n for n in numels if n <= buffers.persistence_threshold)
        # the text tower overlapped under ZeRO-3 is held gathered for the step outside DeepSpeed's live budget
        # (megacoca.parallel.overlap: gathered once per step); below max_live it was gathered whole anyway
        held = text_held if layout.text_overlap and layout.pp == 1 else 0
        live = min(p - persistent, buffers.max_live_parameters + buffers.prefetch_bucket + held)
        gathered, gathered_backward = 2 * e * live, e * live
        if layout.keep_gathered and layout.pp > 1:
            # parallel.pipeline_keep_gathered (megacoca.parallel.pipeline.zero3.GatheredForStep): the stage's whole
            # parameters gathered at the start of the step into one coalesced buffer and held until just before
            # the optimizer step, whatever max_live_parameters says; the per-module gathers then find them whole
            gathered = gathered_backward = e * (p - persistent)
        out.update(params=e * part + e * persistent, grads=e * buffers.reduce_bucket + e * part,
                   optimizer=12 * part, gathered=gathered, gathered_backward=gathered_backward)
    return out


def _self_block(b: int, s: int, w: int, m: int | None, t: int, copy: bool = True) -> float:
    """Elements a self-attention block saves (m None: no MLP). `copy`: the attention output's transpose back to
    (B, L, width) is a copy (measured on CPU for causal attention; not for the ViT's, whose kernel output is
    already in that layout)."""
    elements = b * s * (2 * w + (5 if copy else 4) * w / t)  # ln_1 in/out; q, k, v, attention out (+ copy)
    if m:
        elements += b * s * (2 * w + 2 * m / t)  # ln_2 in/out; fc1 out, GELU out
    return elements


def _cross_block(b: int, s: int, w: int, m: int, c: int, d: int, t: int) -> float:
    """Elements a cross-attention block saves: queries s x w, context c x d (the context itself is saved once
    for all layers, by the poolers' count). Measured on CPU: the LayerNorm outputs, q, the attention output and
    its copy; the context's LayerNorm output, k, v; the MLP's input, fc1 out, GELU out."""
    return b * s * (w + 3 * w / t) + b * c * (d + 2 * w / t) + b * s * (w + 2 * m / t)


def activation_parts(cfg, layout: Layout, text_tokens: int | None = None) -> dict[str, dict]:
    """Per part of the model: {"saved": elements one micro-batch keeps without recompute, "blocks": how many
    repeated blocks, "block": elements of one block, "block_input": elements of one block's input}."""
    b, t = layout.micro_batch, layout.tp
    n, wv, mv = cfg.image_tokens, cfg.vision_width, cfg.vision_mlp_dim
    length = cfg.context_length if text_tokens is None else text_tokens
    wt, mt, d = cfg.text_width, cfg.text_mlp_dim, cfg.pooled_width
    q = cfg.caption_queries
    caption_tokens = q if cfg.pooler_layout == "paper" else q - 1
    parts = {}
    parts["vision_embed"] = {"saved": b * cfg.in_channels * cfg.image_size ** 2 + (1 if cfg.vision_ln_pre else 0)
                             * b * n * wv, "blocks": 0, "block": 0, "block_input": 0}
    vit = _self_block(b, n, wv, mv, t, copy=False)
    parts["vision_blocks"] = {"saved": cfg.vision_layers * vit, "blocks": cfg.vision_layers, "block": vit,
                              "block_input": b * n * wv}
    pooler = b * n * 2 * wv + b * n * 2 * d / t + b * q * 3 * d / t  # ln_k in/out, k, v; q, out, copy
    if cfg.pooler_layout == "paper" and cfg.pooler_cascade:
        pooler += b * q * 2 * d + b * q * 2 * d / t + 3 * b * d / t + 2 * b * d
    elif cfg.pooler_layout == "paper":  # the contrastive pooler over the image tokens: its ln_k output, k, v
        pooler += b * n * wv + b * n * 2 * d / t + 3 * b * d / t + 2 * b * d
    else:
        pooler += 2 * b * q * d  # ln_post in/out
    parts["poolers"] = {"saved": pooler, "blocks": 0, "block": 0, "block_input": 0}
    text = _self_block(b, length + 1, wt, mt, t)
    parts["text_blocks"] = {"saved": cfg.text_layers * text + b * (length + 1) * wt, "blocks": cfg.text_layers,
                            "block": text, "block_input": b * (length + 1) * wt}
    self_mlp = mt if cfg.decoder_mlp_after_self_attn else None
    layer = _self_block(b, length - 1, wt, self_mlp, t) + _cross_block(b, length - 1, wt, mt, caption_tokens, d, t)
    parts["decoder"] = {"saved": cfg.decoder_layers * layer + b * (length - 1) * wt, "blocks": cfg.decoder_layers,
                        "block": layer, "block_input": b * (length - 1) * wt}
    return parts


def _stage_parts(cfg, layout: Layout, stage: int, parts: dict) -> dict[str, dict]:
    """The parts (ViT blocks scaled to the stage's share) that pipeline stage `stage` runs."""
    if layout.pp == 1:
        return parts
    blocks = vit_blocks_per_stage(cfg, layout.pp)[stage]
    out = {}
    if stage == 0:
        out["vision_embed"] = parts["vision_embed"]
    vit = dict(parts["vision_blocks"])
    vit["saved"] = blocks * vit["block"]
    vit["blocks"] = blocks
    out["vision_blocks"] = vit
    if stage == layout.pp - 1:
        for name in ("poolers", "text_blocks", "decoder"):
            out[name] = parts[name]
    return out


def predict(cfg, layout: Layout, buffers: ZeroBuffers | None = None, *, text_tokens: int | None = None
            ) -> list[StageMemory]:
    """Memory per rank at the peak of every pipeline stage (tensor rank 0) of `layout`; the job's peak is the
    largest. The peak is the largest of three moments: forward/backward (the weights, as ZeRO-3 gathers them,
    the live activations, the gradients carried between micro-batches, the backward's transient), ZeRO-0's
    gradient all-reduce (every gradient plus its flattened copy) and the optimizer step (its temporaries)."""
    buffers = buffers or ZeroBuffers()
    e = 2 if layout.precision == "bf16" else 4
    parts = activation_parts(cfg, layout, text_tokens)
    stages = stage_tensors(cfg, layout.tp, layout.pp)
    loss_saved = loss_transient = 0.0
    if layout.kernels != "triton":
        logits = layout.micro_batch * (cfg.context_length - 1 if text_tokens is None else text_tokens - 1) \
            * _ceil_div(cfg.vocab_size, layout.tp)
        loss_saved, loss_transient = 4 * logits, 8 * logits  # log-probabilities; their and the logits' gradient

    out = []
    for s, tensors in enumerate(stages):
        held = 0
        if layout.text_overlap and layout.zero_stage == 3 and layout.pp == 1:
            held = sum(n for n in text_tower_tensor_numels(cfg, layout.tp) if n > buffers.persistence_threshold)
        states = state_bytes(tensors.numels, layout, buffers, tensors.groups, held)
        mine = _stage_parts(cfg, layout, s, parts)
        if layout.checkpointing:
            saved = sum(part["blocks"] * part["block_input"] + part["saved"] - part["blocks"] * part["block"]
                        for part in mine.values())
            recompute = max((part["block"] for part in mine.values() if part["blocks"]), default=0.0)
        else:
            saved = sum(part["saved"] for part in mine.values())
            recompute = 0.0
        in_flight = 1 if layout.pp == 1 else min(layout.grad_accum, layout.pp - s)
        last = s == len(stages) - 1
        kept, solve = _global_negatives_bytes(cfg, layout, e) if last else (0.0, 0.0)
        activations = e * saved * in_flight + _batch_input_bytes(cfg, layout, s, e) + kept
        if last and layout.text_ahead > 0:
            # the text towers run ahead of the forward in flight (T(k) up to T(text_ahead - 1) while F(0) runs);
            # the in-flight micro-batch's own is in `saved`
            activations += e * parts["text_blocks"]["saved"] * (min(layout.text_ahead, layout.grad_accum) - 1)
        if last:
            activations += loss_saved * in_flight
        without_loss = activations - (loss_saved * in_flight if last else 0.0)
        recomputed = e * recompute
        moments = {  # (params, grads, activations, transient) added to the always-live states
            "end of forward": (states["gathered"], 0.0, activations, states["accumulated"]),
            # the buckets exist from the first micro-batch's backward until the step: in a later micro-batch's
            # loss backward too
            "loss backward": (states["gathered_backward"], states["buckets"] if layout.grad_accum > 1 else 0.0,
                              activations, states["accumulated"] + (loss_transient if last else 0.0)),
            "backward": (states["gathered_backward"], states["buckets"], without_loss,
                         states["accumulated"] + recomputed),
            "gradient all-reduce": (0.0, states["all_grads"], 0.0, states["reduce"]),
            # global negatives: between the two passes, the contrastive loss over the gathered embeddings
            "global contrastive loss": (0.0, 0.0, _batch_input_bytes(cfg, layout, s, e) + kept, solve),
            "step": (0.0, states["step_grads"], 0.0, states["step"]),
        }
        phase = max(moments, key=lambda k: sum(moments[k]))
        more_params, more_grads, live, transient = moments[phase]
        out.append(StageMemory(stage=s, params=states["params"] + more_params, grads=states["grads"] + more_grads,
                               optimizer=states["optimizer"], activations=live, transient=transient, phase=phase,
                               detail={"parameters": tensors.elements, "in_flight": in_flight,
                                       "activations": activations, "recompute": e * recompute,
                                       "gathered": states["gathered"], "step": states["step"],
                                       "loss": loss_saved if last else 0.0}))
    return out


def peak(cfg, layout: Layout, buffers: ZeroBuffers | None = None, **kwargs) -> float:
    return max(stage.peak for stage in predict(cfg, layout, buffers, **kwargs))


def _batch_input_bytes(cfg, layout: Layout, stage: int, e: int) -> float:
    """The step's input batches a rank of `stage` holds: every schedule reads a step's m micro-batches up front
    (their caption tokens are counted before the first backward). Without a pipeline, all m as the loader gives
    them (fp32 images, int64 token ids; on a GPU they wait in host memory: an overestimate of the device's by m - 1
    micro-batches of images); under one, stage 0 holds them (images cast to the training dtype, and their token ids
    stacked into the one message it sends), the last stage those token ids, the stages between none
    (megacoca.schedules.pipeline)."""
    images = layout.micro_batch * cfg.in_channels * cfg.image_size ** 2
    tokens = layout.micro_batch * cfg.context_length
    if layout.pp == 1:
        return layout.grad_accum * (4 * images + 8 * tokens)
    first, last = stage == 0, stage == layout.pp - 1
    return layout.grad_accum * ((e * images if first else 0) + (8 * tokens if first or last else 0))


def _global_negatives_bytes(cfg, layout: Layout, e: int) -> tuple[float, float]:
    """(bytes kept through pass 2, bytes of the loss between the passes) of `loss.negatives: global` on the stage
    that computes the loss (megacoca.schedules.negatives): pass 1's normalised image and text embeddings of the
    step's m micro-batches (training dtype) and their cached fp32 gradients; for the loss, the embeddings gathered
    over the data-parallel group in fp32 and their gradients (the gather's backward all-reduces them whole), and this
    rank's rows' logits against every row, both directions, with their softmax gradients."""
    if layout.negatives != "global":
        return 0.0, 0.0
    rows, total = layout.micro_batch * layout.grad_accum, layout.global_batch
    kept = 2 * rows * cfg.embed_dim * (e + 4)
    solve = 2 * 2 * total * cfg.embed_dim * 4 + 2 * 2 * rows * total * 4 + 2 * 2 * rows * cfg.embed_dim * 4
    return kept, solve


def default_text_ahead(cfg, pp: int, micro_batches: int, zero_stage: int = 1, keep_gathered: bool = False) -> int:
    """The text-ahead the trainer runs with by default (parallel.text_ahead = -1): the pipeline's FLOP-proportional
    simulation, 0 under ZeRO-3 without keep-gathered (megacoca.parallel.pipeline.schedule.auto_text_ahead)."""
    if pp == 1:
        return 0
    return auto_text_ahead(pipeline_split(cfg, pp), pp, micro_batches,
                           separate_forward_costs=zero_stage == 3 and not keep_gathered)
